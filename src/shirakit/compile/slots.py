"""Hot-swap slots: the fixed tensors a compiled forward reads, and the checks before a change.

See :mod:`shirakit.model.hotswap` for the design (``prepare_for_hotswap`` builds these). A
:class:`LayerSlots` per adapted layer holds, per kind of additive adapter, one padded unit-scale
adapter made of non-persistent buffers; :class:`ModelSlots` holds the recompile policy and the
shared tensors of a kind (VeRA's projections). Both are refreshed eagerly before each call by the
model's pre-forward hook (:func:`shirakit.compile.sync.sync_model`).
"""

from __future__ import annotations

import warnings
import weakref

import torch
from torch import nn

from ..core.adapter import Adapter, InWeightAdapter, values_stamp
from ..core.layer import AdapterLinear
from ..core.state import SharedTensors, adapter_layers, shared_of, state_of
from .sync import HOTSWAP_ATTR, ran_compiled

POLICIES = ("warn", "raise", "ignore")
_POLICY = "_shirakit_on_recompile"


class RecompileWarning(UserWarning):
    """An adapter change on a compiled model will make torch.compile trace the model again."""


class RecompileError(RuntimeError):
    """An adapter change was refused: it would recompile (policy ``on_recompile="raise"``)."""


def key_name(key: tuple) -> str:
    return "_".join(str(k) for k in key).replace(".", "_")


def buffers_only(module: nn.Module) -> nn.Module:
    """Parameters become non-persistent buffers: a slot never trains nor shows in state_dict()."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                del sub._parameters[name]
                sub.register_buffer(name, param.detach().requires_grad_(False), persistent=False)
        sub._non_persistent_buffers_set.update(sub._buffers)
    return module


def needs_slot(layer: AdapterLinear, adapter: Adapter) -> bool:
    """Does a compiled forward of ``layer`` read ``adapter`` from a slot? Not when it lives in the
    layer's weight (SHiRA, MiSS bat: the weight is their slot); yes where they run additively (a
    weight tied to another module) and for every additive method."""
    if adapter.slot_key() is None:
        return False
    return not (isinstance(adapter, InWeightAdapter) and not layer.weight_shared_with)


def _stamp(adapter: Adapter) -> tuple:
    return tuple(values_stamp(p) for p in adapter.parameters())


@torch.no_grad()
def _corner_copy(dst: dict[str, torch.Tensor], src: dict[str, torch.Tensor]) -> None:
    """dst := 0, then src into dst's leading corner (every dim of src <= dst's)."""
    for tensor in dst.values():
        tensor.zero_()
    for key, value in src.items():
        dst[key][tuple(slice(0, n) for n in value.shape)].copy_(value)


def _fits(slot: Adapter, adapter: Adapter) -> bool:
    own = dict(slot.named_buffers())
    return all(
        key in own and own[key].dim() == t.dim() and all(a <= b for a, b in zip(t.shape, own[key].shape))
        for key, t in adapter.state_dict().items()
    )


class LayerSlots(nn.Module):
    """One layer's slots (slot name -> padded unit-scale adapter) and what each holds now."""

    def __init__(self, slots: dict[str, Adapter], keys: dict[tuple, str]) -> None:
        super().__init__()
        self.slots = nn.ModuleDict(slots)
        self.keys = keys
        self.fits = True  # False: the active adapters do not fit the slots (ordinary forward)
        self._loaded: dict[str, object] = {}
        self._fit: weakref.WeakKeyDictionary[Adapter, str | None] = weakref.WeakKeyDictionary()

    def forward(self, base_layer: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = base_layer(x, *args, **kwargs)
        for slot in self.slots.values():
            y = y + slot(x, base_layer.weight).to(y.dtype)
        return y

    def slot_for(self, adapter: Adapter) -> str | None:
        """The slot this adapter fits (its kind, every tensor within the slot's), or None. Cached per
        adapter object: shapes never change, and this runs before every call."""
        if adapter in self._fit:
            return self._fit[adapter]
        name = self.keys.get(adapter.slot_key())
        name = name if name in self.slots and _fits(self.slots[name], adapter) else None
        self._fit[adapter] = name
        return name

    def assignment(self, layer: AdapterLinear, active: list[str], merged: list[str]) -> dict[str, str] | None:
        """slot name -> adapter name for these active adapters; None when they do not fit."""
        if layer.disabled:
            return {}
        out: dict[str, str] = {}
        for name in active:
            adapter = layer.adapters[name] if name in layer.adapters else None
            if adapter is None or name in merged or not needs_slot(layer, adapter):
                continue
            slot = self.slot_for(adapter)
            if slot is None or slot in out:
                return None
            out[slot] = name
        return out

    def refresh(self, layer: AdapterLinear) -> None:
        """Copy the active adapters in where the slot holds something else (or stale values)."""
        wanted = self.assignment(layer, layer.active, layer.merged)
        self.fits = wanted is not None
        for slot_name, slot in self.slots.items():
            name = (wanted or {}).get(slot_name)
            adapter = layer.adapters[name] if name is not None else None
            state = None if adapter is None else (name, id(adapter), _stamp(adapter), adapter.output_scale())
            if self._loaded.get(slot_name, "empty") == state:
                continue
            _corner_copy(dict(slot.named_buffers()), {} if adapter is None else adapter.state_dict())
            if adapter is not None and adapter.slot_scaled:
                slot.get_buffer(adapter.slot_scaled).mul_(adapter.output_scale())
            self._loaded[slot_name] = state


class ModelSlots(nn.Module):
    """Model-level part: the recompile policy, and shared tensors per slot kind (VeRA's projections)."""

    def __init__(self, shared: dict[str, SharedTensors], keys_of: dict[str, tuple]) -> None:
        super().__init__()
        self.shared = nn.ModuleDict(shared)
        self.keys_of = keys_of  # adapter name -> slot key (None: lives in the weight)
        self._shared_from: dict[str, str | None] = {}

    def refresh(self, model: nn.Module) -> None:
        """The shared slot tensors hold the active adapter's of their kind (copied once per swap)."""
        if not self.shared:
            return
        active = state_of(model).active
        for slot_name, holder in self.shared.items():
            source = next((n for n in active if key_name(self.keys_of.get(n) or ()) == slot_name), None)
            if self._shared_from.get(slot_name, "empty") == source:
                continue
            own = shared_of(model, source) if source is not None else None
            _corner_copy(holder.tensors(), own.tensors() if own is not None else {})
            self._shared_from[slot_name] = source


# ---- checks before a change --------------------------------------------------------------------
def set_recompile_policy(model: nn.Module, on_recompile: str) -> None:
    """What an adapter change that would recompile a compiled model does: "warn" (default),
    "raise" (:class:`RecompileError`, nothing changed) or "ignore"."""
    if on_recompile not in POLICIES:
        raise ValueError(f"on_recompile must be one of {POLICIES}, found {on_recompile!r}")
    model.__dict__[_POLICY] = on_recompile


def is_prepared(model: nn.Module) -> bool:
    return isinstance(getattr(model, HOTSWAP_ATTR, None), ModelSlots)


def _report(model: nn.Module, why: str) -> None:
    policy = model.__dict__.get(_POLICY, "warn")
    message = (f"{why}: a compiled model recompiles for this change. Prepare the model with "
               "shirakit.prepare_for_hotswap(model, r=..., target_modules=...) before compiling, "
               "with a rank and targets that cover every adapter you will swap in")
    if policy == "raise":
        raise RecompileError(message)
    if policy == "warn":
        warnings.warn(message, RecompileWarning, stacklevel=4)


def check_swap(model: nn.Module, names: list[str], merged_after: bool = False) -> None:
    """Before making ``names`` the active adapters: would a compiled model recompile?

    Prepared models: only when the slots cannot take them. Unprepared models that ran compiled:
    whenever the active adapters change (the forward is guarded on their names).
    ``merged_after``: fused mode (``switch_adapter``), the adapters go into the weight.
    """
    if is_prepared(model):
        if merged_after:
            return
        for path, layer in adapter_layers(model):
            if layer.hotswap is None:
                _report(model, f"layer {path} has no hot-swap slots")
                return
            if layer.hotswap.assignment(layer, names, layer.merged) is None:
                _report(model, f"adapters {names} do not fit the hot-swap slots of {path} "
                        "(a larger rank, another kind, or two active adapters of one kind)")
                return
    elif ran_compiled(model) and list(names) != state_of(model).active and not _weight_only_both(model, names,
                                                                                                 merged_after):
        _report(model, f"switching the active adapters from {state_of(model).active} to {names} "
                "on a model that was not prepared for hot swapping")


def _weight_only_both(model: nn.Module, names: list[str], merged_after: bool) -> bool:
    """Was every layer's compiled forward just the base product, and will it stay so? (in-weight
    adapters, or fused mode: the compiled graph reads no adapter name, so nothing recompiles)"""
    for _, layer in adapter_layers(model):
        if not layer.weight_only:
            return False
        if not merged_after and any(layer._in_weight(n) is None for n in names if n in layer.adapters):
            return False
    return True


def check_new_adapter(model: nn.Module, name: str, layers: list[tuple[str, AdapterLinear]],
                      adapters: list[Adapter], wrapped: list[str]) -> None:
    """Before adding adapter ``name`` (inject, load_adapter) to a compiled or prepared model."""
    if not (is_prepared(model) or ran_compiled(model)):
        return
    if wrapped:
        _report(model, f"adapter {name!r} targets layers {wrapped[:4]} that were not adapted before")
        return
    if not is_prepared(model):
        return  # the switch to it is reported by check_swap
    for (path, layer), adapter in zip(layers, adapters):
        if needs_slot(layer, adapter) and (layer.hotswap is None or layer.hotswap.slot_for(adapter) is None):
            _report(model, f"adapter {name!r} does not fit the hot-swap slots of {path}")
            return
    getattr(model, HOTSWAP_ATTR).keys_of[name] = adapters[0].slot_key() if adapters else None
