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
refreshed eagerly before each call by the model's pre-forward hook (:mod:`shirakit.compile.sync`),
also when the active adapter's own values change (``copy_`` into them, an optimizer step).

Only inference takes the slot path (autograd off): a training step differentiates the adapters'
own parameters, through the ordinary forward.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from ..compile.slots import LayerSlots, ModelSlots, buffers_only, key_name, needs_slot, set_recompile_policy
from ..compile.sync import HOTSWAP_ATTR, forget_layers
from ..core.adapter import Adapter
from ..core.capabilities import HotSwappable, require
from ..core.config import AdapterConfig
from ..core.layer import AdapterLinear, wrap_layer
from ..core.state import SharedTensors, adapter_layers, state_of
from ..core.threads import writes_weights
from .inject import _set_submodule, _weight_sharers, find_targets


# ---- preparing --------------------------------------------------------------------------------
@writes_weights
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
            shared[key_name(key)] = SharedTensors(tensors).to(layers[0][1].weight.device)
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
    """Wrap the layers ``target_modules`` names that no adapter targets yet (no adapters on them:
    their slots stay zero until an adapter loaded later targets them)."""
    if target_modules is None:
        return
    guard = state_of(model).guard
    for name in find_targets(model, AdapterConfig(target_modules=target_modules)):
        module = model.get_submodule(name)
        if not isinstance(module, AdapterLinear):
            layer = wrap_layer(module)
            layer._guard = guard  # the model's: a compiled forward guards on it (see inject._attach)
            _set_submodule(model, name, layer)
    sharers = _weight_sharers(model)
    for name, layer in adapter_layers(model):
        layer.weight_shared_with = sharers.get(name, ())


def _templates(layers) -> dict[tuple, list[Adapter]]:
    """The adapters of each slot key that need a slot somewhere; values decide nothing, only type
    and config (the largest of the padded fields wins)."""
    out: dict[tuple, list[Adapter]] = {}
    for _, layer in layers:
        for adapter in layer.adapters.values():
            if needs_slot(layer, adapter):
                require(adapter, HotSwappable, "prepare_for_hotswap")
                out.setdefault(adapter.slot_key(), []).append(adapter)
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
        if not needs_slot(layer, adapters[0]):
            continue  # SHiRA / MiSS bat on a layer whose weight is their slot
        try:  # the loading constructor: placeholders, no init
            slot = method(layer.geometry, _padded_config(adapters, sizes[key]), layer.base_layer, None, source=path)
        except ValueError:
            continue  # this layer cannot hold an adapter of this kind (e.g. MiSS divisibility)
        slot = buffers_only(slot).to(layer.weight.device)
        slot.with_unit_output_scale()
        slot.eval()
        name = key_name(key)
        if name in model_slots.shared:
            slot.bind_shared(model_slots.shared[name])
        slots[name], keys[key] = slot, name
    return LayerSlots(slots, keys)


