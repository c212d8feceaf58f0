"""torch.compile support: the model's bookkeeping runs eagerly, before the compiled graph.

In-weight adapters (SHiRA, MiSS bat) are written into the base weight lazily, by the first forward
after a change whose values' stamp (version counter, optimizer-step count) moved; forwards of
several threads coordinate on the model's lock (:mod:`shirakit.core.threads`), and a mixed-adapter batch
finds its route in a context variable. All of that is Python state dynamo cannot trace
(``Tensor._version``, ``ContextVar.get``, locks: a graph break per layer) or would recompile on
(the optimizer-step count). So the top module's forward hooks (installed by ``inject``, see
:mod:`shirakit.model.hooks`) do it *eagerly* at each compiled call: :func:`enter_compiled_call` brings
every layer's weight and hot-swap slots (:mod:`shirakit.model.hotswap`) up to date, registers the call as
a user of every in-weight layer's weight (as an eager forward does per layer; other threads'
routed forwards wait, writers raise), and sets a per-thread flag on the model's guard saying
whether the call is routed; :func:`leave_compiled_call` releases the weights. A layer that dynamo
traces then reads only plain attributes (:meth:`AdapterLinear._compiled_forward`).

Under ``torch.compile(model)`` the hooks are ``torch.compiler.disable``d: one graph break at the
model's entry and one at its exit. Compiling ``model.forward`` instead (``model.forward =
torch.compile(model.forward)``, transformers' static-cache recipe) leaves the hooks outside the
graph, where they run eagerly: no break. A compiled *submodule* of the model is not covered: call
:func:`sync_model` before it, or compile the model. In eager mode none of this runs (each layer
syncs itself, e.g. inside FSDP's unshard).

The hook also records that the model ran compiled, so a later adapter change that would recompile
is reported (:func:`shirakit.compile.slots.check_swap`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.layer import AdapterLinear
from ..core.state import state_of

_LAYERS = "_shirakit_sync_layers"
HOTSWAP_ATTR = "shirakit_hotswap"  # shirakit.compile.slots.ModelSlots after prepare_for_hotswap
COMPILED = "_shirakit_ran_compiled"


def _layers(model: nn.Module) -> tuple[AdapterLinear, ...]:
    """The model's adapter layers, cached on the model (``forget_layers`` after structural changes)."""
    layers = model.__dict__.get(_LAYERS)
    if layers is None:
        layers = tuple(m for m in model.modules() if isinstance(m, AdapterLinear))
        model.__dict__[_LAYERS] = layers
    return layers


def forget_layers(model: nn.Module) -> None:
    """Layers were wrapped or unwrapped (inject, unload, prepare_for_hotswap): look them up again."""
    model.__dict__.pop(_LAYERS, None)


def is_compiled_call(model: nn.Module) -> bool:
    """Is this call of ``model`` traced by dynamo (``torch.compile(model)``), or is its ``forward``
    a compiled function (``model.forward = torch.compile(model.forward)``)?"""
    return torch.compiler.is_compiling() or hasattr(model.__dict__.get("forward"), "_torchdynamo_orig_callable")


def _refresh_layer(layer: AdapterLinear) -> None:
    layer.update_weight_only()
    if layer.hotswap is not None:
        layer.hotswap.refresh(layer)


def sync_model(model: nn.Module) -> None:
    """Every layer's weight holds exactly its live adapters' current values; hot-swap slots hold the
    active adapters' current values. For a compiled submodule called on its own (no thread
    coordination: call it from the thread that owns the model). Cheap when nothing changed."""
    guard = state_of(model).guard
    with guard.lock:
        model_slots = getattr(model, HOTSWAP_ATTR, None)
        if model_slots is not None:
            model_slots.refresh(model)
        for layer in _layers(model):
            layer.sync_live()
            _refresh_layer(layer)


def enter_compiled_call(model: nn.Module, routed: bool) -> tuple:
    """Before a compiled call of ``model`` (eagerly): see the module doc. Returns the token for
    :func:`leave_compiled_call`. A routed call syncs nothing: its layers run eagerly, each
    withdrawing and scattering per row group as in eager mode."""
    model.__dict__[COMPILED] = True
    guard = state_of(model).guard
    token = (getattr(guard.local, "routed", False), [])
    guard.local.routed = routed
    if routed:
        return token
    try:
        with guard.lock:
            model_slots = getattr(model, HOTSWAP_ATTR, None)
            if model_slots is not None:
                model_slots.refresh(model)
            for layer in _layers(model):
                if layer._has_in_weight:
                    layer._enter(plain=True)  # waits for routed products; syncs the weight
                    token[1].append(layer)
                elif layer.merged and layer._weight_rewritten():
                    layer._reconcile()
                _refresh_layer(layer)
    except BaseException:
        leave_compiled_call(model, token)
        raise
    return token


def leave_compiled_call(model: nn.Module, token: tuple) -> None:
    """After a compiled call (also when it raised): release the weights, restore the route flag."""
    previous, entered = token
    try:
        for layer in reversed(entered):
            layer._leave()
    finally:
        state_of(model).guard.local.routed = previous


def ran_compiled(model: nn.Module) -> bool:
    """Has this model been called compiled (``torch.compile(model)`` or a compiled forward)?"""
    return bool(model.__dict__.get(COMPILED, False))


def forget_compiled(model: nn.Module) -> None:
    """unload: drop what compile support kept on the model."""
    forget_layers(model)
    model.__dict__.pop(COMPILED, None)
    if hasattr(model, HOTSWAP_ATTR):
        delattr(model, HOTSWAP_ATTR)
