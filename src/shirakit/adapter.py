"""The contract every method implements: one adapter on one linear layer.

An :class:`Adapter` computes the output delta and the weight delta of a layer ``y = x W^T + b``.
It knows nothing about module names or models; :class:`shirakit.layer.AdapterLinear` owns it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .config import AdapterConfig


@dataclass(frozen=True)
class LayerGeometry:
    """Shape facts about the wrapped layer. ``fan_in_fan_out``: weight stored (in, out) (GPT-2 Conv1D)."""

    in_features: int
    out_features: int
    fan_in_fan_out: bool = False

    def as_out_in(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight seen as (out, in), a view (transposed for Conv1D)."""
        return weight.T if self.fan_in_fan_out else weight

    def storage_flat_index(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Flat positions in the weight's own storage of logical (out, in) entries (rows, cols)."""
        rows, cols = rows.long(), cols.long()
        if self.fan_in_fan_out:
            return cols * self.out_features + rows
        return rows * self.in_features + cols


def adapter_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """Adapter parameters of half-precision (and quantized) models are kept in fp32 (as PEFT does)."""
    if weight_dtype in (torch.float16, torch.bfloat16) or not weight_dtype.is_floating_point:
        return torch.float32  # half precision, or the integer codes of a quantized weight
    return weight_dtype


class Adapter(nn.Module):
    """One adapter on one linear layer.

    Subclasses set ``config_class`` and implement ``forward`` and ``delta_weight``. The generic
    ``merge_into``/``unmerge_from`` add/subtract the dense delta in fp32; methods that can do better
    (SHiRA's scatter, MiSS-bat's exact restore) override them.
    """

    config_class: ClassVar[type[AdapterConfig]]
    #: True when the adapter's values live scattered in the base weight while it is active
    #: (SHiRA): the layer then applies it with ``merge_into`` instead of adding ``forward``.
    lives_in_weight: ClassVar[bool] = False
    #: True when ``unmerge_from`` restores the weight bit-exactly (saved originals, not subtraction).
    exact_unmerge: ClassVar[bool] = False
    #: True when the delta depends on the base weight (MiSS bat): not computable on a quantized base.
    delta_reads_weight: ClassVar[bool] = False

    def __init__(self, geometry: LayerGeometry, config: AdapterConfig) -> None:
        super().__init__()
        self.geometry = geometry
        self.config = config
        self.scale = 1.0

    # ---- shared state across layers (VeRA's projections) -----------------------------------
    @classmethod
    def make_shared(cls, config: AdapterConfig, geometries: list[LayerGeometry]) -> dict[str, torch.Tensor]:
        """Tensors shared by every layer of one adapter (saved once as ``base_model.<key>``)."""
        return {}

    def bind_shared(self, shared: nn.Module) -> None:
        """Receive the model-level holder of :meth:`make_shared`'s tensors (kept as a reference)."""

    @classmethod
    def shared_in_checkpoint(cls, config: AdapterConfig) -> bool:
        """Does the checkpoint carry the shared tensors? (VeRA: ``save_projection``; when False they
        are rebuilt by :meth:`make_shared` from the config on load.)"""
        return True

    @classmethod
    def combine(cls, layers: dict, configs: list[AdapterConfig], weights: list[float]):
        """Exact weighted sum of adapters, for :func:`shirakit.fusion.combine_adapters`.

        ``layers``: layer path -> (geometry, [adapter or None per input]). Returns the new
        adapter's config and, per layer path, its tensors (as in its ``state_dict``).
        """
        raise NotImplementedError(f"{cls.__name__} cannot combine adapters exactly")

    # ---- the maths ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """Dense delta, shape (out, in), in fp32 (for tests, the generic merge and fusion)."""
        raise NotImplementedError

    def set_scale(self, scale: float) -> None:
        self.scale = float(scale)

    # ---- merging --------------------------------------------------------------------------
    @torch.no_grad()
    def merged_is_finite(self, weight: torch.Tensor) -> bool:
        """Would merging into ``weight`` leave it finite? (checked before a safe merge commits)"""
        merged = self.geometry.as_out_in(weight).float() + self.delta_weight(weight)
        return bool(torch.isfinite(merged).all())

    @torch.no_grad()
    def merge_into(self, weight: torch.Tensor, base_key: object = None) -> None:
        """W <- W + delta, computed in fp32 so half-precision weights round once.

        ``base_key``, when not None, names the exact state of ``weight`` (the layer guarantees
        equal keys mean bit-identical weights); methods may use it to cache work across merges.
        """
        view = self.geometry.as_out_in(weight)
        view.copy_((view.float() + self.delta_weight(weight)).to(weight.dtype))

    @torch.no_grad()
    def unmerge_from(self, weight: torch.Tensor) -> None:
        """W <- W - delta (exact up to rounding; methods that save originals restore bit-exactly)."""
        view = self.geometry.as_out_in(weight)
        view.copy_((view.float() - self.delta_weight(weight)).to(weight.dtype))

    # ---- checkpoints ----------------------------------------------------------------------
    def load_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Copy validated file tensors in. Shapes/dtypes/finiteness are checked by the caller;
        methods override to add their own checks (e.g. SHiRA's index range and uniqueness)."""
        own = self.state_dict()
        with torch.no_grad():
            for key, value in tensors.items():
                own[key].copy_(value)

    #: True when the method has a smaller file layout (:meth:`compact_tensors`, see shirakit.compact).
    has_compact_layout: ClassVar[bool] = False

    def compact_tensors(self) -> dict[str, torch.Tensor]:
        """This adapter in its smaller file layout (only when ``has_compact_layout``)."""
        raise NotImplementedError

    def expand_compact(self, tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
        """The inverse of :meth:`compact_tensors`: the standard (PEFT) tensors."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        g = self.geometry
        return f"in={g.in_features}, out={g.out_features}, scale={self.scale}"
