"""The contract as a core plus capabilities.

Every method implements the core (:class:`~shirakit.core.adapter.Adapter`): ``build`` /
``init_parameters``, ``forward(x, weight)`` (the output delta), ``delta_weight(weight)``,
``merge_into`` / ``unmerge_from`` (generic in the base class) and ``load_tensors``. A feature that
needs more of a method declares it here as a small protocol and checks for it where it starts
(as torchtune checks ``AdapterModule``), with :func:`require` naming the feature, the method and
what is missing; a method that lacks a capability simply does not offer that feature.

Optional, each checked by its feature:

- :class:`CompactFiles`     ``save_adapter(compact=True)`` and loading compact files (SHiRA)
- :class:`Fusable`          ``combine_adapters``: an exact weighted sum (SHiRA, LoRA)
- :class:`DeltaFromFile`    metrics from adapter files without a base model (SHiRA, LoRA)
- :class:`HotSwappable`     ``prepare_for_hotswap`` slots (defaults in the base class: every method)
- :class:`Routable`         mixed-adapter batches: a method's groups added in one go (default: per group)
- :class:`WritesGatheredCopy`, :class:`WritesDequantizedCopy`   in-weight adapters over FSDP2 /
  ZeRO-3 gathered and bitsandbytes / torchao dequantized weights
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

import torch


@runtime_checkable
class CompactFiles(Protocol):
    """A smaller file layout than PEFT's (shirakit only; SHiRA's: shirakit.methods.shira.compact)."""

    def compact_tensors(self) -> dict[str, torch.Tensor]:
        """This adapter's tensors in the compact layout."""

    def expand_compact(self, tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
        """The inverse of :meth:`compact_tensors`: the standard (PEFT) tensors (shapes only: it may
        run on an adapter built on the meta device)."""


@runtime_checkable
class Fusable(Protocol):
    """The method's exact weighted sum of adapters (a classmethod)."""

    def combine(self, layers: dict, configs: list, weights: list[float]) -> tuple[Any, dict]:
        """``layers``: layer path -> (geometry, [adapter or None per input]). Returns the new
        adapter's config and, per layer path, its tensors (as in its ``state_dict``)."""


@runtime_checkable
class DeltaFromFile(Protocol):
    """One layer's delta from its file tensors alone, no base model (a classmethod + the keys)."""

    file_keys: ClassVar[tuple[str, ...]]

    def file_delta(self, config: Any, tensors: dict[str, torch.Tensor], compact: bool, source: str) -> Any:
        """Dense (out, in) fp32, or a :class:`~shirakit.core.sparse_delta.SparseDelta`."""


@runtime_checkable
class HotSwappable(Protocol):
    """Adapters that can take turns in a fixed hot-swap slot (compile/slots.py)."""

    slot_padded: ClassVar[tuple[str, ...]]
    slot_scaled: ClassVar[str]

    def slot_key(self) -> tuple | None: ...

    def output_scale(self) -> float: ...

    def with_unit_output_scale(self) -> None: ...


@runtime_checkable
class Routable(Protocol):
    """Adds a routed batch's groups of this method to ``y`` in place (a classmethod)."""

    def add_routed_deltas(self, layer: Any, y: torch.Tensor, x: torch.Tensor, groups: list) -> None: ...


@runtime_checkable
class WritesGatheredCopy(Protocol):
    """An in-weight adapter that writes into the weight FSDP2 / ZeRO-3 gathers for each product."""

    def gathered_forward(self, base_layer: Any, x: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class WritesDequantizedCopy(Protocol):
    """An in-weight adapter that writes into the dense copy a quantized layer makes for each product."""

    def dequantized_forward(self, base_layer: Any, x: torch.Tensor, dequantizer: Any) -> torch.Tensor: ...


def supports(method_or_adapter: Any, capability: type) -> bool:
    """Does the adapter (or the method's class) offer ``capability``?"""
    return isinstance(method_or_adapter, capability)


def require(method_or_adapter: Any, capability: type, feature: str) -> None:
    """Raise a TypeError naming ``feature``, the method and the members it lacks, unless it offers
    ``capability``."""
    if supports(method_or_adapter, capability):
        return
    cls = method_or_adapter if isinstance(method_or_adapter, type) else type(method_or_adapter)
    missing = [m for m in members(capability) if not hasattr(cls, m)]
    raise TypeError(f"{feature} needs a method with {capability.__name__} (missing: {', '.join(missing)}); "
                    f"{cls.__name__} does not offer it")


def members(capability: type) -> list[str]:
    """The names a capability protocol asks for."""
    names = [n for n, v in vars(capability).items() if callable(v) and not n.startswith("_")]
    return sorted(set(names) | set(getattr(capability, "__annotations__", {})))
