"""Hot swapping adapters under ``torch.compile`` without recompiling.

dynamo guards a compiled graph on the Python state the traced code read: the active adapters'
names, dict keys, scales held as Python floats, tensor shapes. A forward that looks "the active
adapter" up by name recompiles at every ``set_adapter``, and past dynamo's cache (8 graphs) falls
back to eager. So one graph per adapter is not an answer; instead :func:`prepare_for_hotswap`
gives every adapted layer fixed **slots**, and a compiled forward reads only them:

    y = base_layer(x) + sum_k slot_k(x)

A slot is an adapter of one kind (equal :meth:`Adapter.slot_key`) built at the largest size among
the adapters that take turns in it (LoRA and VeRA: rank ``r``), holding non-persistent buffers
only. Swapping copies the new adapter's tensors into the slot's leading corner, zeros elsewhere,
its output scale folded into one tensor (``slot_scaled``): the same tensors with the same shapes,
so no guard changes. Padding is exact: LoRA's extra rows of A and columns of B are zero, VeRA's
extra ``lambda_d`` entries and projection rows are zero, a layer an adapter does not target gets
an all-zero slot. Adapters that live in the weight (SHiRA, MiSS bat) need no slot: the weight is
their slot, and a swap is the scatters it always was (fused ``switch_adapter`` too). Slots are
refreshed eagerly before each call by the model's pre-forward hook (:mod:`shirakit.compiled`),
also when the active adapter's own values change (``copy_`` into them, an optimizer step).

Only inference takes the slot path (autograd off): a training step differentiates the adapters'
own parameters, through the ordinary forward.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import torch
from torch import nn

from .adapter import Adapter
from .compiled import HOTSWAP_ATTR, forget_layers, ran_compiled
from .config import AdapterConfig
from .inject import SharedTensors, _set_submodule, adapter_layers, find_targets, shared_of, state_of
from .layer import AdapterLinear
from .methods.shira import values_stamp

POLICIES = ("warn", "raise", "ignore")
_POLICY = "_shirakit_on_recompile"


class RecompileWarning(UserWarning):
    """An adapter change on a compiled model will make torch.compile trace the model again."""


class RecompileError(RuntimeError):
    """An adapter change was refused: it would recompile (policy ``on_recompile="raise"``)."""


def _key_name(key: tuple) -> str:
    return "_".join(str(k) for k in key).replace(".", "_")


def _buffers_only(module: nn.Module) -> nn.Module:
    """Parameters become non-persistent buffers: a slot never trains nor shows in state_dict()."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                del sub._parameters[name]
                sub.register_buffer(name, param.detach().requires_grad_(False), persistent=False)
        sub._non_persistent_buffers_set.update(sub._buffers)
    return module


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

    def forward(self, base_layer: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = base_layer(x, *args, **kwargs)
        for slot in self.slots.values():
            y = y + slot(x, base_layer.weight).to(y.dtype)
        return y

    def slot_for(self, adapter: Adapter) -> str | None:
        name = self.keys.get(adapter.slot_key())
        return name if name in self.slots and _fits(self.slots[name], adapter) else None

    def assignment(self, layer: AdapterLinear, active: list[str], merged: list[str]) -> dict[str, str] | None:
        """slot name -> adapter name for these active adapters; None when they do not fit."""
        if layer.disabled:
            return {}
        out: dict[str, str] = {}
        for name in active:
            adapter = layer.adapters[name] if name in layer.adapters else None
            if adapter is None or name in merged or adapter.lives_in_weight:
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
            source = next((n for n in active if _key_name(self.keys_of.get(n) or ()) == slot_name), None)
            if self._shared_from.get(slot_name, "empty") == source:
                continue
            own = shared_of(model, source) if source is not None else None
            _corner_copy(holder.tensors(), own.tensors() if own is not None else {})
            self._shared_from[slot_name] = source


# ---- preparing --------------------------------------------------------------------------------
def prepare_for_hotswap(
    model: nn.Module,
    *,
    r: int | None = None,
    target_modules: list[str] | str | None = None,
    on_recompile: str = "warn",
) -> nn.Module:
    """Give every adapted layer fixed slots so swapping adapters under torch.compile never recompiles.

    Call it after loading the adapters (or at least one of each kind) and before compiling.
    ``r``: pad LoRA and VeRA ranks to at least this (default: the largest the model holds), so
    adapters loaded later with a rank up to ``r`` swap in. ``target_modules``: adapt these layers
    too (the union with the layers the adapters target), for adapters loaded later that target
    them. ``on_recompile``: what a later change does that the slots cannot take (a larger rank, a
    new target, a new kind, two active adapters of one kind): "warn", "raise" or "ignore".
    SHiRA and MiSS bat live in the weight and need no slot; their swaps are scatters.
    """
    set_recompile_policy(model, on_recompile)
    state = state_of(model)
    _wrap_union(model, target_modules)
    layers = adapter_layers(model)
    templates = _templates(layers)
    sizes = _max_sizes(templates, r)
    geometries = [layer.geometry for _, layer in layers]
    shared = {}
    for key, adapters in templates.items():
        tensors = type(adapters[0]).make_shared(_padded_config(adapters, sizes[key]), geometries)
        if tensors:
            shared[_key_name(key)] = SharedTensors(tensors).to(layers[0][1].weight.device)
    keys_of = {name: _key_of(layers, name) for name in state.configs}
    model_slots = ModelSlots(shared, keys_of)
    for path, layer in layers:
        layer.hotswap = _layer_slots(layer, templates, sizes, model_slots, path)
    setattr(model, HOTSWAP_ATTR, model_slots)
    forget_layers(model)
    model_slots.refresh(model)
    for _, layer in layers:
        layer.hotswap.refresh(layer)
    return model


def _wrap_union(model: nn.Module, target_modules) -> None:
    if target_modules is None:
        return
    for name in find_targets(model, AdapterConfig(target_modules=target_modules)):
        module = model.get_submodule(name)
        if not isinstance(module, AdapterLinear):
            _set_submodule(model, name, AdapterLinear(module))


def _templates(layers) -> dict[tuple, list[Adapter]]:
    """One adapter per slot key (the first met); values decide nothing, only type and config."""
    out: dict[tuple, list[Adapter]] = {}
    for _, layer in layers:
        for adapter in layer.adapters.values():
            key = adapter.slot_key()
            if key is not None:
                out.setdefault(key, []).append(adapter)
    return {key: adapters for key, adapters in out.items()}


def _max_sizes(templates: dict[tuple, list[Adapter]], r: int | None) -> dict[tuple, dict[str, int]]:
    sizes = {}
    for key, adapters in templates.items():
        fields = adapters[0].slot_padded
        sizes[key] = {f: max([getattr(a.config, f) for a in adapters] + ([r] if r else [])) for f in fields}
    return sizes


def _padded_config(adapters: list[Adapter], sizes: dict[str, int]) -> AdapterConfig:
    return replace(adapters[0].config, **sizes)


def _key_of(layers, name: str) -> tuple | None:
    for _, layer in layers:
        if name in layer.adapters:
            return layer.adapters[name].slot_key()
    return None


def _layer_slots(layer: AdapterLinear, templates, sizes, model_slots: ModelSlots, path: str) -> LayerSlots:
    slots, keys = {}, {}
    for key, adapters in templates.items():
        method = type(adapters[0])
        try:  # the loading constructor: placeholders, no init
            slot = method(layer.geometry, _padded_config(adapters, sizes[key]), layer.base_layer, None, source=path)
        except ValueError:
            continue  # this layer cannot hold an adapter of this kind (e.g. MiSS divisibility)
        slot = _buffers_only(slot).to(layer.weight.device)
        slot.with_unit_output_scale()
        slot.eval()
        name = _key_name(key)
        if name in model_slots.shared:
            slot.bind_shared(model_slots.shared[name])
        slots[name], keys[key] = slot, name
    return LayerSlots(slots, keys)


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
        if not merged_after and any(not layer.adapters[n].lives_in_weight for n in names if n in layer.adapters):
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
        if adapter.slot_key() is not None and (layer.hotswap is None or layer.hotswap.slot_for(adapter) is None):
            _report(model, f"adapter {name!r} does not fit the hot-swap slots of {path}")
            return
    getattr(model, HOTSWAP_ATTR).keys_of[name] = adapters[0].slot_key() if adapters else None
