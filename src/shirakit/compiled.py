"""torch.compile support: the weight bookkeeping runs eagerly, outside the compiled graph.

In-weight adapters (SHiRA, MiSS bat) are written into the base weight lazily, by the first forward
after a change whose values' stamp (version counter, optimizer-step count) moved. Those are Python
ints: dynamo cannot trace ``Tensor._version`` (a data-dependent value: one graph break per layer)
and would guard on the step count (a recompile after every optimizer step). So ``inject`` gives the
model one forward pre-hook that brings every layer's weight, and its hot-swap slots
(:mod:`shirakit.hotswap`), up to date *eagerly*, and a layer that dynamo traces skips its own sync
(:meth:`AdapterLinear._compiled_forward`). Under ``torch.compile(model)`` the hook costs one graph
break at the model's entry; compiling ``model.forward`` instead (``model.forward =
torch.compile(model.forward)``, transformers' static-cache recipe) leaves the hook outside the graph,
where it syncs eagerly before each call. A compiled *submodule* of the model is not covered: call
:func:`sync_model` before it, or compile the model. In eager mode the hook does nothing (each layer
syncs itself, e.g. inside FSDP's unshard).

The hook also records that the model ran compiled, so a later adapter change that would recompile
is reported (:func:`shirakit.hotswap.check_swap`).
"""

from __future__ import annotations

import torch
from torch import nn

from .layer import AdapterLinear

_LAYERS = "_shirakit_sync_layers"
HOTSWAP_ATTR = "shirakit_hotswap"  # shirakit.hotswap.ModelSlots after prepare_for_hotswap
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


def sync_model(model: nn.Module) -> None:
    """Every layer's weight holds exactly its live adapters' current values; hot-swap slots hold the
    active adapters' current values. Cheap when nothing changed (a comparison per layer)."""
    model_slots = getattr(model, HOTSWAP_ATTR, None)
    if model_slots is not None:
        model_slots.refresh(model)
    for layer in _layers(model):
        if layer.routing is not None:  # a routed call withdraws and scatters per group itself
            continue
        layer.sync_live()
        layer.update_weight_only()
        if layer.hotswap is not None:
            layer.hotswap.refresh(layer)


@torch.compiler.disable
def _sync_compiled(model: nn.Module) -> None:
    model.__dict__[COMPILED] = True
    sync_model(model)


def _pre_forward(model: nn.Module, args) -> None:
    if torch.compiler.is_compiling():
        _sync_compiled(model)  # a graph break: runs eagerly before the graph, every call
    elif hasattr(model.__dict__.get("forward"), "_torchdynamo_orig_callable"):
        # model.forward = torch.compile(model.forward): this hook runs eagerly, outside the graph.
        # (An eager forward syncs each layer itself, later: inside FSDP's unshard, for one.)
        sync_model(model)


def install_sync_hook(model: nn.Module) -> None:
    """Installed once by ``inject`` on the top module (idempotent)."""
    if "_shirakit_sync_hook" not in model.__dict__:
        model.__dict__["_shirakit_sync_hook"] = model.register_forward_pre_hook(_pre_forward)


def uninstall_sync_hook(model: nn.Module) -> None:
    handle = model.__dict__.pop("_shirakit_sync_hook", None)
    if handle is not None:
        handle.remove()
    forget_layers(model)
    model.__dict__.pop(COMPILED, None)
    if hasattr(model, HOTSWAP_ATTR):
        delattr(model, HOTSWAP_ATTR)


def ran_compiled(model: nn.Module) -> bool:
    """Has this model been called through torch.compile (as a whole: ``torch.compile(model)``)?"""
    return bool(model.__dict__.get(COMPILED, False))
