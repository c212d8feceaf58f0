"""An adapter's values handed to :func:`~shirakit.model.inject.inject` (loading, fusion): checked
before anything is built (:func:`check_before_building`, on the meta device) and filled in inside
inject's transaction (:func:`fill`).

Keys: a tensor ``k`` of the module at path ``P`` holding the adapter (an AdapterLinear or a
ModulesToSave) is ``P.k``; a tensor the method shares across layers (VeRA's ``vera_A``) is ``k``
in ``shared``. Every tensor is checked against the one the built adapter holds (dtype, shape,
finite after the cast) and the key sets must match exactly; the method then checks what only it
knows (:meth:`Adapter.load_tensors`: SHiRA's index range, count, uniqueness).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch
from torch import nn

from ..core.adapter import Adapter
from ..core.capabilities import CompactFiles, supports
from ..core.layer import AdapterLinear, geometry_of
from ..core.state import SharedTensors, hosts, shared_of
from ..core.validation import check_tensor


@dataclass(frozen=True)
class AdapterTensors:
    """The values of one adapter. ``shared=None`` keeps the shared tensors the config rebuilds
    (fusion); a mapping must hold them when the method keeps them in files
    (:meth:`Adapter.shared_in_checkpoint`). ``source`` and the two prefixes only name things in
    errors (a file's path and its key rule)."""

    layers: Mapping[str, torch.Tensor]
    shared: Mapping[str, torch.Tensor] | None = None
    source: str = "tensors"
    prefix: str = ""
    shared_prefix: str = ""
    #: layers of methods with a compact layout hold it (:class:`~shirakit.core.capabilities.CompactFiles`)
    compact: bool = False


def check_before_building(model: nn.Module, method: type[Adapter], config, targets: list[str],
                          given: AdapterTensors) -> AdapterTensors:
    """``given`` with compact layouts expanded and every layer tensor checked against what the
    config asks for (dtype, shape, finite after the cast) and cast to the adapter's dtype, before
    anything is allocated: each target's adapter is built on the meta device (a config's r is not
    trusted for allocation). Missing float tensors are refused here; key sets, index values, the
    tensors of modules saved whole and shared tensors are checked by :func:`fill`."""
    layers = dict(given.layers)
    built = _meta_adapters(model, method, config, targets)
    if given.compact:
        for path, adapter in built.items():
            if supports(adapter, CompactFiles):
                packed = {k[len(path) + 1:]: layers.pop(k) for k in list(layers) if k.startswith(path + ".")}
                expanded = adapter.expand_compact(packed, f"{given.source}: {given.prefix}{path}")
                layers.update({f"{path}.{k}": v for k, v in expanded.items()})
    expected = {f"{path}.{k}": own for path, adapter in built.items() for k, own in adapter.state_dict().items()}
    missing = sorted(given.prefix + k for k, own in expected.items() if k not in layers and own.dtype.is_floating_point)
    if missing:
        raise ValueError(f"{given.source}: missing {len(missing)} key(s) the config asks for, e.g. {missing[:3]}")
    for key, own in expected.items():
        if key in layers:
            layers[key] = check_tensor(layers[key], own, f"{given.source}: key {given.prefix + key!r}")
    return replace(given, layers=layers, compact=False)


def _meta_adapters(model: nn.Module, method: type[Adapter], config, targets: list[str]) -> dict[str, Adapter]:
    """Module path -> the adapter ``config`` makes for that target, built on the meta device."""
    built = {}
    for path in targets:
        layer = model.get_submodule(path)
        base = layer.base_layer if isinstance(layer, AdapterLinear) else layer
        weight = base.weight
        stub = SimpleNamespace(weight=torch.empty(weight.shape, dtype=weight.dtype, device="meta"))
        with torch.device("meta"):
            built[path] = method.build(geometry_of(base), config, stub, None, source=path)
    return built


def fill(model: nn.Module, adapter_name: str, method: type[Adapter], config, given: AdapterTensors) -> None:
    """Check ``given`` against the built adapter ``adapter_name``, then copy it in."""
    source = given.source
    expected: dict[str, tuple[nn.Module, str, torch.Tensor]] = {}
    for path, host in hosts(model):
        if adapter_name in host.adapters:
            owner = host.adapters[adapter_name]
            for key, tensor in owner.state_dict().items():
                expected[f"{given.prefix}{path}.{key}"] = (owner, key, tensor)
    tensors = {given.prefix + k: v for k, v in given.layers.items()}
    holder = shared_of(model, adapter_name)
    if holder is not None and given.shared is not None:
        saved = method.shared_in_checkpoint(config)
        for key, tensor in holder.tensors().items():
            name = given.shared_prefix + key
            if saved:
                expected[name] = (holder, key, tensor)
            elif key in given.shared:  # as PEFT does: the config says they are rebuilt, so they are
                warnings.warn(f"{source}: {name!r} is in the file but the config says it is not saved; "
                              "using the tensor rebuilt from the config", stacklevel=4)
        tensors.update({given.shared_prefix + k: v for k, v in given.shared.items()
                        if saved or k not in holder.tensors()})
    elif given.shared:
        tensors.update({given.shared_prefix + k: v for k, v in given.shared.items()})
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise ValueError(f"{source}: missing {len(missing)} key(s), e.g. {missing[:3]}")
    if unexpected:
        raise ValueError(f"{source}: {len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
    per_owner: dict[int, tuple[nn.Module, dict[str, torch.Tensor], str]] = {}
    for name, (owner, key, own) in expected.items():
        exact = not isinstance(owner, Adapter)
        value = check_tensor(tensors[name], own, f"{source}: key {name!r}", exact_shape=exact)
        entry = per_owner.setdefault(id(owner), (owner, {}, name[: len(name) - len(key) - 1]))
        entry[1][key] = value
    for owner, owner_tensors, where in per_owner.values():
        if isinstance(owner, (Adapter, SharedTensors)):
            owner.load_tensors(owner_tensors, f"{source}: {where}")
        else:
            _copy_in(owner, owner_tensors)


@torch.no_grad()
def _copy_in(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    own = module.state_dict()
    for key, value in tensors.items():
        own[key].copy_(value.to(own[key].dtype))
