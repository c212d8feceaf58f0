"""What shirakit keeps on a model, and how to find it: the one module every other imports.

- ``model.shirakit``: a :class:`ModelAdapters` record (configs, active names, trainable flags); a
  plain attribute, not a submodule, so the model's state dict is unchanged.
- ``model.shirakit_shared``: a :class:`SharedStore` of each adapter's tensors shared across its
  layers (VeRA's projections, :meth:`Adapter.make_shared`): a registered submodule, so
  ``model.to()`` moves them once, holding them as *non-persistent* buffers, so
  ``model.state_dict()`` keeps exactly the base model's keys. Layers hold a plain reference to
  their adapter's holder (not a submodule of theirs), so nothing is stored or moved per layer.
- the wrapped layers themselves (:func:`adapter_layers`, :func:`hosts`).

It reads and records state; putting adapters in and out is :mod:`shirakit.model.inject`'s job.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapter import Adapter
from .config import AdapterConfig
from .layer import AdapterLinear, ModulesToSave
from .threads import ModelGuard

SHARED_ATTR = "shirakit_shared"


@dataclass
class ModelAdapters:
    """What shirakit knows about a model: each adapter's config, which are active, which train."""

    configs: dict[str, AdapterConfig] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    trainable: dict[str, bool] = field(default_factory=dict)
    seeds: dict[str, int] = field(default_factory=dict)  # the seed inject drew from (not for loaded adapters)
    # injected on the meta device: nothing drawn yet (shirakit.model.meta_init.reset_adapter_parameters draws)
    undrawn: set[str] = field(default_factory=set)
    guard: ModelGuard = field(default_factory=ModelGuard)  # the model's lock (shirakit.core.threads)


def state_of(model: nn.Module) -> ModelAdapters:
    state = getattr(model, "shirakit", None)
    if not isinstance(state, ModelAdapters):
        raise ValueError("this model has no shirakit adapters; call shirakit.inject(model, config) first")
    return state


def check_drawn(model: nn.Module, doing: str) -> None:
    """Refuse to use adapters injected on the meta device whose initial state was never drawn."""
    undrawn = state_of(model).undrawn
    if undrawn:
        raise RuntimeError(f"cannot {doing}: adapter(s) {sorted(undrawn)} were injected on the meta device and hold "
                           "no values yet; after model.to_empty(...) and loading the base weights, call "
                           "shirakit.reset_adapter_parameters(model)")


def check_adapter_names(model: nn.Module, names: list[str]) -> None:
    known = state_of(model).configs
    unknown = [n for n in names if n not in known]
    if unknown:
        raise KeyError(f"unknown adapter(s) {unknown}; this model has {sorted(known)}")


# ---- walking the model ------------------------------------------------------------------------
def walk_modules(model: nn.Module, stop: tuple[type, ...]) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` in the same order, but not below a module of a ``stop`` type (it
    is still yielded). Why: with many adapters loaded, their own modules are most of the model's
    modules, and every inject, load, switch and route walks the model (a server with 16 loaded
    SHiRA adapters spent ~50 ms per load in ``named_modules``)."""
    seen: set[int] = set()
    pending: list[tuple[str, nn.Module]] = [("", model)]
    while pending:
        name, module = pending.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield name, module
        if isinstance(module, stop):
            continue
        children = [(f"{name}.{key}" if name else key, child) for key, child in module._modules.items()
                    if child is not None]
        pending.extend(reversed(children))


def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLinear]]:
    # an AdapterLinear holds its base layer and its adapters, never another AdapterLinear
    return [(n, m) for n, m in walk_modules(model, (AdapterLinear,)) if isinstance(m, AdapterLinear)]


def hosts(model: nn.Module) -> list[tuple[str, AdapterLinear | ModulesToSave]]:
    """Every module holding per-adapter state under ``.adapters`` (the checkpoint key rule)."""
    found = walk_modules(model, (AdapterLinear, Adapter, SharedStore))
    return [(n, m) for n, m in found if isinstance(m, (AdapterLinear, ModulesToSave))]


# ---- tensors shared across layers ------------------------------------------------------------
class SharedTensors(nn.Module):
    """One adapter's shared tensors, as non-persistent buffers (moved by ``.to()``, never in the
    model's state dict; checkpoints write them as ``base_model.<key>``, see checkpoint.py)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for key, tensor in tensors.items():
            self.register_buffer(key, tensor, persistent=False)

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.named_buffers())

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Copy validated file tensors in (shapes and finiteness are checked by the caller)."""
        own = self.tensors()
        for key, value in tensors.items():
            own[key].copy_(value.to(own[key].dtype))


class SharedStore(nn.ModuleDict):
    """adapter name -> :class:`SharedTensors`; lives on the model as ``model.shirakit_shared``."""


def shared_of(model: nn.Module, adapter_name: str) -> SharedTensors | None:
    store = getattr(model, SHARED_ATTR, None)
    if isinstance(store, SharedStore) and adapter_name in store:
        return store[adapter_name]
    return None


def add_shared(model: nn.Module, adapter_name: str, tensors: dict, device: torch.device) -> SharedTensors:
    store = getattr(model, SHARED_ATTR, None)
    if not isinstance(store, SharedStore):
        store = SharedStore()
        setattr(model, SHARED_ATTR, store)
    store[adapter_name] = SharedTensors(tensors).to(device)
    return store[adapter_name]


def remove_shared(model: nn.Module, adapter_name: str | None = None) -> None:
    """Drop one adapter's shared tensors (all of them when ``adapter_name`` is None)."""
    store = getattr(model, SHARED_ATTR, None)
    if not isinstance(store, SharedStore):
        return
    if adapter_name is not None and adapter_name in store:
        del store[adapter_name]
    if adapter_name is None or len(store) == 0:
        delattr(model, SHARED_ATTR)
