"""VeRA: Vector-based Random Matrix Adaptation (Kopiczko et al., arXiv 2310.11454).

One pair of frozen random matrices is shared by every adapted layer; each layer trains only two
scaling vectors (§3, eq. 2):

    delta_y = s * Lambda_b B_l Lambda_d A_l dropout(x),   delta_W = s * diag(b) B_l diag(d) A_l

with A: (r, max_in) and B: (max_out, r) drawn once per adapter, A_l = A[:, :in] and
B_l = B[:out, :] the layer's slices, b = ``vera_lambda_b`` (out,), zeros at init, and
d = ``vera_lambda_d`` (r,), ``d_initial`` at init (so the adapter starts as the identity).

Shared projections. A and B are built by :meth:`VeraAdapter.make_shared` from
``projection_prng_key`` with exactly PEFT's draws (a CPU ``torch.Generator`` seeded with the key,
kaiming-uniform with the ReLU gain, A first, then B), so a PEFT file saved with
``save_projection=False`` loads with identical outputs. They live once per model and adapter in
a model-level holder (see :mod:`shirakit.model.inject`); layers keep a reference and slice it.
``save_projection=True`` writes them as ``base_model.vera_A`` / ``base_model.vera_B``.

Several adapters (beyond PEFT). Each adapter owns its own A/B, built from its own config (its r,
its key, the largest in/out among its own targets). This is exact (an adapter alone gives the
same numbers as on a model of its own, and as PEFT) and lets adapters with different r share a
model, which PEFT refuses for a larger r after a smaller one. The cost is one r x max_in plus one
max_out x r buffer per adapter, not per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.adapter import Adapter, LayerGeometry
from ..core.config import AdapterConfig, check_dropout, check_rank
from ..core.registry import register


@dataclass
class VeraConfig(AdapterConfig):
    """PEFT's VeraConfig fields and defaults (the subset shirakit implements)."""

    peft_type: ClassVar[str] = "VERA"
    absent_in_peft: ClassVar[frozenset[str]] = frozenset({"exclude_modules"})

    r: int = 256
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_rank("r", self.r)
        if not isinstance(self.projection_prng_key, int):
            raise ValueError(f"projection_prng_key must be an int, found {self.projection_prng_key!r}")
        check_dropout("vera_dropout", self.vera_dropout)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern is set but layers_to_transform is not; set both or neither")

    @classmethod
    def recipe(cls, r: int, target_modules, modules_to_save=None, seed: int = 0, **options) -> VeraConfig:
        """Rank ``r``; ``seed`` draws the shared projections (``projection_prng_key``)."""
        return cls(r=r, target_modules=target_modules, modules_to_save=modules_to_save,
                   projection_prng_key=seed, **options)


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(-bound, bound), bound = sqrt(3) * gain / sqrt(fan_in), gain = sqrt(2), fan_in = shape[1].

    The bound is computed in this order on purpose: it reproduces PEFT's projections bit for bit.
    """
    std = math.sqrt(2) / math.sqrt(shape[1])
    bound = math.sqrt(3.0) * std
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


@register
class VeraAdapter(Adapter):
    fuse_min_steps = 41  # a switch is a scaled B @ A per layer (docs/serving.md)
    layer_kinds_why = ("its projections shared by all layers, A (r, in) and B (out, r), act on a linear layer's "
                       "features; PEFT's VeRA adapts linear layers only, so a conv or embedding adapter would "
                       "have no file format to share")
    config_class = VeraConfig
    slot_padded = ("r",)  # zero entries of lambda_d, zero rows/columns of the projections
    slot_scaled = "vera_lambda_b"

    def init_parameters(self, base_layer: nn.Module, generator: torch.Generator | None, source: str) -> None:
        geometry, config = self.geometry, self.config
        self.r = config.r
        kwargs = self.parameter_options(base_layer)
        self.vera_lambda_b = nn.Parameter(torch.zeros(geometry.out_features, **kwargs))
        self.vera_lambda_d = nn.Parameter(torch.full((config.r,), float(config.d_initial), **kwargs))
        self.dropout = nn.Dropout(config.vera_dropout) if config.vera_dropout > 0 else nn.Identity()
        if generator is not None and not config.init_weights:
            # tests: a non-identity adapter. PEFT uses b = 1, d ~ N(0, 1), a delta ~30x larger than
            # the layer's own weights on small models; b ~ N(0, 0.1^2) keeps it at LoRA's test scale.
            with torch.no_grad():
                self.vera_lambda_b.copy_(torch.randn(geometry.out_features, generator=generator) * 0.1)
                self.vera_lambda_d.copy_(torch.randn(config.r, generator=generator))
        self.__dict__["_shared"] = None  # a plain reference, not a submodule: stored and moved once per model

    # ---- the shared projections -------------------------------------------------------------
    @classmethod
    def make_shared(cls, config: VeraConfig, geometries: list[LayerGeometry]) -> dict[str, torch.Tensor]:
        max_in = max(g.in_features for g in geometries)
        max_out = max(g.out_features for g in geometries)
        generator = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
        vera_a = kaiming_uniform((config.r, max_in), generator)
        vera_b = kaiming_uniform((max_out, config.r), generator)
        return {"vera_A": vera_a, "vera_B": vera_b}

    def bind_shared(self, shared: nn.Module) -> None:
        self.__dict__["_shared"] = shared

    @classmethod
    def shared_in_checkpoint(cls, config: VeraConfig) -> bool:
        return bool(config.save_projection)

    def projections(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's slices A[:, :in] (r, in) and B[:out, :] (out, r)."""
        shared = self._shared
        if shared is None:
            raise RuntimeError("VeRA adapter has no shared projections; it must be added with shirakit.inject")
        g = self.geometry
        a = shared.vera_A[:, : g.in_features]
        b = shared.vera_B[: g.out_features, :]
        return a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)

    # ---- the maths ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """delta_y = s * b * (B_l (d * (A_l dropout(x))))."""
        lam_d, lam_b = self.vera_lambda_d, self.vera_lambda_b
        a, b = self.projections(lam_d.dtype, x.device)
        h = F.linear(self.dropout(x.to(lam_d.dtype)), a) * lam_d
        return F.linear(h, b) * (lam_b * self.scale)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        a, b = self.projections(torch.float32, self.vera_lambda_d.device)
        lam_b = self.vera_lambda_b.detach().float().unsqueeze(1)
        lam_d = self.vera_lambda_d.detach().float().unsqueeze(1)
        return ((lam_b * b) @ (lam_d * a)) * self.scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}"
