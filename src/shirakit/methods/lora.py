"""LoRA: Low-Rank Adaptation (Hu et al., arXiv 2106.09685), the baseline.

    delta_y = s * B A dropout(x),  A: (r, in), B: (out, r),  s = alpha / r  (rsLoRA: alpha / sqrt(r))

A starts kaiming-uniform (a = sqrt(5), as ``nn.Linear``), B at zero, so the adapter starts as
the identity on the model. ``init_lora_weights="gaussian"`` draws A ~ N(0, 1/r);
``False`` randomizes B too (tests only).

On the layer's siblings, in PEFT's layout (so files go both ways):
- conv (``nn.Conv1d`` / ``nn.Conv2d``): ``lora_A`` is a conv in -> r with the layer's kernel, stride,
  padding, dilation and padding mode, ``lora_B`` a 1x1 conv r -> out; on the flattened kernel
  ``(out, in * prod(k))`` the delta is again ``s * B A`` (B, A flattened), so merge equals forward.
  (PEFT's A leaves out dilation and padding mode; on layers that have neither, both agree.)
  Grouped convs are refused: B A mixes channels across groups, no grouped kernel holds it.
- embedding: ``lora_embedding_A`` (r, rows) and ``lora_embedding_B`` (dim, r), delta_y = s * B^T A^T[ids]
  (the table's delta is ``s (B A)^T``); A starts at zero and B ~ N(0, 1), as in PEFT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
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

    layer_kinds = frozenset({"linear", "conv", "embedding"})

    def init_parameters(self, base_layer: nn.Module, generator: torch.Generator | None, source: str) -> None:
        geometry, config = self.geometry, self.config
        kwargs = self.parameter_options(base_layer)
        kind = geometry.kind
        if kind == "conv":
            self._conv_factors(geometry.conv, config.r, kwargs, source)
        elif kind == "embedding":
            self.lora_embedding_A = nn.Parameter(torch.zeros(config.r, geometry.out_features, **kwargs))
            self.lora_embedding_B = nn.Parameter(torch.zeros(geometry.in_features, config.r, **kwargs))
            self.slot_scaled = "lora_embedding_B"
        else:
            self.lora_A = nn.Linear(geometry.in_features, config.r, bias=False, **kwargs)
            self.lora_B = nn.Linear(config.r, geometry.out_features, bias=False, **kwargs)
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.scaling = config.scaling
        if generator is not None:  # None: the values come from a checkpoint
            self._init_weights(config.init_lora_weights, generator)

    def _conv_factors(self, spec, r: int, kwargs: dict, source: str) -> None:
        if spec.groups > 1:
            raise ValueError(
                f"{source or 'a layer'}: LoRA on a grouped conv (groups={spec.groups}) is refused: B A mixes input "
                "channels across groups, so no grouped kernel holds its delta and it could never merge or switch "
                "(PEFT warns the same); target it with SHiRA, whose K positions lie in the grouped kernel itself")
        conv = nn.Conv1d if spec.dims == 1 else nn.Conv2d
        self.lora_A = conv(spec.in_channels, r, spec.kernel_size, spec.stride, spec.padding, spec.dilation,
                           bias=False, padding_mode=spec.padding_mode, **kwargs)
        self.lora_B = conv(r, spec.out_channels, 1, 1, bias=False, **kwargs)

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as the parameters PEFT names: ``lora_A.weight`` / ``lora_B.weight``, or the embedding's."""
        if self.geometry.embedding is not None:
            return self.lora_embedding_A, self.lora_embedding_B
        return self.lora_A.weight, self.lora_B.weight

    @torch.no_grad()
    def _init_weights(self, how: bool | str, generator: torch.Generator) -> None:
        a, b = self._factors()
        if self.geometry.embedding is not None:  # PEFT: A zeros, B ~ N(0, 1); False: both random
            a.copy_(torch.randn(a.shape, generator=generator) if how is False else torch.zeros(a.shape))
            b.copy_(torch.randn(b.shape, generator=generator))
            return
        if how == "gaussian":
            a.copy_(torch.randn(a.shape, generator=generator) / self.config.r)
        else:  # kaiming_uniform(a=sqrt(5)): bound = 1/sqrt(fan_in)
            bound = 1.0 / math.sqrt(a[0].numel())
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
        A's rank is its dim 0 and B's its dim 1 in every layout (linear, conv, embedding).
        """
        rank = sum(c.r for c in configs)
        tensors = {}
        for path, (_geometry, adapters) in layers.items():
            present = next(a for a in adapters if a is not None)
            a_key, b_key = present.factor_keys()
            a_shape, b_shape = (t.shape for t in present._factors())
            blocks_a, blocks_b = [], []
            for adapter, config, w in zip(adapters, configs, weights):
                if adapter is None:
                    blocks_a.append(torch.zeros(config.r, *a_shape[1:]))
                    blocks_b.append(torch.zeros(b_shape[0], config.r, *b_shape[2:]))
                else:
                    a, b = adapter._factors()
                    blocks_a.append(a.detach().float().cpu())
                    blocks_b.append(b.detach().float().cpu() * (w * adapter.scaling * adapter.scale))
            tensors[path] = {a_key: torch.cat(blocks_a), b_key: torch.cat(blocks_b, dim=1)}
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(layers),
                            fan_in_fan_out=configs[0].fan_in_fan_out)
        return config, tensors

    def factor_keys(self) -> tuple[str, str]:
        if self.geometry.embedding is not None:
            return "lora_embedding_A", "lora_embedding_B"
        return "lora_A.weight", "lora_B.weight"

    file_keys = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B")

    @classmethod
    def file_delta(cls, config: LoraConfig, tensors: dict[str, torch.Tensor], compact: bool, source: str):
        """s * B A from the file's two factors ((out, in * prod(k)) for a conv; (rows, dim) for an embedding)."""
        if "lora_embedding_A" in tensors:
            return (tensors["lora_embedding_B"].float() @ tensors["lora_embedding_A"].float()).T * config.scaling
        a, b = tensors["lora_A.weight"].float(), tensors["lora_B.weight"].float()
        return b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1) * config.scaling

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        scale = self.scaling * self.scale
        spec = self.geometry.embedding
        if spec is not None:  # x: token ids; no dropout on ids (PEFT neither)
            a, b = self._factors()
            rows = F.embedding(x, a.T, spec.padding_idx, None, 2.0, spec.scale_grad_by_freq, spec.sparse)
            return (rows @ b.T) * scale
        x = x.to(self.lora_A.weight.dtype)
        return self.lora_B(self.lora_A(self.dropout(x))) * scale

    def output_scale(self) -> float:
        return self.scaling * self.scale

    def with_unit_output_scale(self) -> None:
        self.scaling = self.scale = 1.0

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        a, b = (t.detach().float() for t in self._factors())
        if self.geometry.embedding is not None:
            return (b @ a).T * (self.scaling * self.scale)
        return (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)) * (self.scaling * self.scale)
