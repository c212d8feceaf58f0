"""LoRA: Low-Rank Adaptation (Hu et al., arXiv 2106.09685), the baseline.

    delta_y = s * B A dropout(x),  A: (r, in), B: (out, r),  s = alpha / r  (rsLoRA: alpha / sqrt(r))

A starts kaiming-uniform (a = sqrt(5), as ``nn.Linear``), B at zero, so the adapter starts as
the identity on the model. ``init_lora_weights="gaussian"`` draws A ~ N(0, 1/r);
``False`` randomizes B too (tests only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core.adapter import Adapter
from ..core.config import AdapterConfig, check_dropout, check_rank
from ..core.registry import register


@dataclass
class LoraConfig(AdapterConfig):
    """PEFT's LoraConfig fields (the subset shirakit implements) with PEFT's defaults."""

    peft_type: ClassVar[str] = "LORA"

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    use_rslora: bool = False
    init_lora_weights: bool | str = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_rank("r", self.r)
        check_dropout("lora_dropout", self.lora_dropout)
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(
                f"init_lora_weights={self.init_lora_weights!r}: expected True, False or 'gaussian'"
            )

    @classmethod
    def recipe(cls, r: int, target_modules, modules_to_save=None, seed: int = 0, **options) -> LoraConfig:
        """Rank ``r`` with ``lora_alpha = 2 r`` (scale 2, the usual recipe); A's draw uses torch's seed."""
        return cls(r=r, lora_alpha=2 * r, target_modules=target_modules, modules_to_save=modules_to_save, **options)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


@register
class LoraAdapter(Adapter):
    fuse_min_steps = 38  # a switch is B @ A per layer (docs/serving.md)
    config_class = LoraConfig
    slot_padded = ("r",)  # zero rows of A, zero columns of B
    slot_scaled = "lora_B.weight"

    def init_parameters(self, base_layer: nn.Module, generator: torch.Generator | None, source: str) -> None:
        geometry, config = self.geometry, self.config
        kwargs = self.parameter_options(base_layer)
        self.lora_A = nn.Linear(geometry.in_features, config.r, bias=False, **kwargs)
        self.lora_B = nn.Linear(config.r, geometry.out_features, bias=False, **kwargs)
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.scaling = config.scaling
        if generator is not None:  # None: the values come from a checkpoint
            self._init_weights(config.init_lora_weights, generator)

    @torch.no_grad()
    def _init_weights(self, how: bool | str, generator: torch.Generator) -> None:
        a, b = self.lora_A.weight, self.lora_B.weight
        if how == "gaussian":
            a.copy_(torch.randn(a.shape, generator=generator) / self.config.r)
        else:  # kaiming_uniform(a=sqrt(5)): bound = 1/sqrt(fan_in)
            bound = 1.0 / math.sqrt(a.shape[1])
            a.copy_(torch.rand(a.shape, generator=generator) * 2 * bound - bound)
        if how is False:
            b.copy_(torch.randn(b.shape, generator=generator) * 0.1)
        else:
            b.zero_()

    @classmethod
    def combine(cls, layers: dict, configs: list[LoraConfig], weights: list[float]):
        """Concatenate ranks: sum_i w_i s_i B_i A_i = [w_1 s_1 B_1 | ...] [A_1; ...], exact.

        The result has r = sum r_i and alpha = r (scaling 1); each input's scaling, strength and
        weight are folded into its block of B. A layer an input does not adapt gets zero blocks.
        """
        rank = sum(c.r for c in configs)
        tensors = {}
        for path, (geometry, adapters) in layers.items():
            blocks_a, blocks_b = [], []
            for adapter, config, w in zip(adapters, configs, weights):
                if adapter is None:
                    blocks_a.append(torch.zeros(config.r, geometry.in_features))
                    blocks_b.append(torch.zeros(geometry.out_features, config.r))
                else:
                    blocks_a.append(adapter.lora_A.weight.detach().float().cpu())
                    factor = w * adapter.scaling * adapter.scale
                    blocks_b.append(adapter.lora_B.weight.detach().float().cpu() * factor)
            tensors[path] = {"lora_A.weight": torch.cat(blocks_a), "lora_B.weight": torch.cat(blocks_b, dim=1)}
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(layers),
                            fan_in_fan_out=configs[0].fan_in_fan_out)
        return config, tensors

    file_keys = ("lora_A.weight", "lora_B.weight")

    @classmethod
    def file_delta(cls, config: LoraConfig, tensors: dict[str, torch.Tensor], compact: bool, source: str):
        """s * B A from the file's two factors."""
        return tensors["lora_B.weight"].float() @ tensors["lora_A.weight"].float() * config.scaling

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x = x.to(self.lora_A.weight.dtype)
        return self.lora_B(self.lora_A(self.dropout(x))) * (self.scaling * self.scale)

    def output_scale(self) -> float:
        return self.scaling * self.scale

    def with_unit_output_scale(self) -> None:
        self.scaling = self.scale = 1.0

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        b, a = self.lora_B.weight.detach().float(), self.lora_A.weight.detach().float()
        return (b @ a) * (self.scaling * self.scale)
