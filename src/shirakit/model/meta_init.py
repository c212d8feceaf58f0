"""Adapters on a model built on the meta device: draw their initial state once the model is real.

The FSDP2 way to train a model larger than one process's memory (torchtitan, torchtune) never
builds it whole: build on ``torch.device("meta")``, ``fully_shard``, then ``model.to_empty(device=...)``
allocates only each rank's shards, and the weights are loaded (or initialized) into them.
``inject`` works on the meta model (it only needs shapes), but its draws -- SHiRA's masks and
values, LoRA's A and B, VeRA's projections, the copies of ``modules_to_save`` -- live on the meta
device too, and ``to_empty`` leaves every tensor uninitialized. So, after loading the base weights:

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shirakit.inject(model, shirakit.ShiraConfig(r=32, target_modules="all-linear", random_seed=0))
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    model.to_empty(device="cpu")            # or "cuda"
    ...load the base weights into the shards (and re-create non-persistent buffers)...
    shirakit.reset_adapter_parameters(model)   # on every rank

:func:`reset_adapter_parameters` draws exactly what ``inject`` drew (the same seed, split per
adapter and layer) and writes it into the model's own tensors: into each rank's rows of an
FSDP2-sharded parameter (DTensor), whole into anything else. Masks that read the base weight
(SHiRA ``wm``) read it as loaded, gathered one layer at a time when it is sharded (a collective:
call on every rank, as ``save_adapter``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..core.adapter import Adapter, InWeightAdapter
from ..core.layer import AdapterLinear, ModulesToSave
from ..core.registry import method_for_config
from ..core.state import adapter_layers, check_adapter_names, hosts, shared_of, state_of
from .inject import layer_generator


@torch.no_grad()
def reset_adapter_parameters(model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """Give adapter ``adapter_name`` (all adapters when None) the initial state ``inject`` drew for
    it, in place (sharded tensors: each rank its own part). Returns the model.

    Raises ValueError for an adapter whose draws are unknown (loaded from a file: load it again
    instead) and for a model still on the meta device (``to_empty`` and load the weights first)."""
    state = state_of(model)
    names = list(state.configs) if adapter_name is None else [adapter_name]
    check_adapter_names(model, names)
    unknown = [n for n in names if n not in state.seeds]
    if unknown:
        raise ValueError(f"adapter(s) {unknown} came from a checkpoint, so there is no initial draw to repeat; "
                         "load the checkpoint again (load_adapter) after to_empty instead")
    merged = [(a, n) for n, layer in adapter_layers(model) for a in names if a in layer.merged]
    if merged:
        raise RuntimeError(f"adapter {merged[0][0]!r} is merged into {merged[0][1]}; unmerge before resetting it")
    for name in names:
        _reset_one(model, state.configs[name], name, state.seeds[name])
        state.undrawn.discard(name)
    return model


def _reset_one(model: nn.Module, config, adapter_name: str, seed: int) -> None:
    method = method_for_config(config)
    layers = [(n, m) for n, m in hosts(model) if adapter_name in m.adapters]
    adapted = [(n, m) for n, m in layers if isinstance(m, AdapterLinear)]
    shared = shared_of(model, adapter_name)
    if shared is not None:
        fresh = method.make_shared(config, [m.geometry for _, m in adapted])
        copy_tensors(dict(shared.named_buffers()), fresh, "shared tensors")
    for name, layer in layers:
        if isinstance(layer, ModulesToSave):  # a fresh copy is a copy of the (loaded) original
            copy_tensors(_tensors(layer.adapters[adapter_name]), _tensors(layer.original_module), name)
            continue
        layer.withdraw_live()  # masks must see the base weight, not live adapter values
        generator = layer_generator(seed, adapter_name, name)
        fresh = method.build(layer.geometry, config, _readable(layer.base_layer, name), generator, source=name)
        if shared is not None:
            fresh.bind_shared(shared)
        live: Adapter = layer.adapters[adapter_name]
        copy_tensors(_tensors(live), _tensors(fresh), name)
        if isinstance(live, InWeightAdapter):
            live.drop_device_caches()  # positions, patterns derived from the old (uninitialized) tensors


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    found = dict(module.named_parameters())
    found.update(module.named_buffers())
    return found


def _readable(base: nn.Module, name: str) -> nn.Module:
    """The base layer with a whole weight on this process: FSDP2's sharded weight is gathered (a
    collective) into a stand-in; a weight still on the meta device is refused."""
    weight = base.weight
    if weight.is_meta:
        raise ValueError(f"{name}: the base weight is still on the meta device; call model.to_empty(device=...) "
                         "and load the base weights before reset_adapter_parameters")
    if not _is_dtensor(weight):
        return base
    stand_in = copy.copy(base)
    stand_in._parameters = dict(base._parameters, weight=nn.Parameter(weight.full_tensor(), requires_grad=False))
    return stand_in


@torch.no_grad()
def copy_tensors(targets: dict[str, torch.Tensor], sources: dict[str, torch.Tensor], where: str) -> None:
    """targets[k] <- sources[k] for every key; a DTensor target takes only this rank's part."""
    if targets.keys() != sources.keys():
        raise ValueError(f"{where}: expected tensors {sorted(sources)}, found {sorted(targets)}")
    for key, target in targets.items():
        source = sources[key]
        if target.is_meta:
            raise ValueError(f"{where}.{key} is still on the meta device; call model.to_empty(device=...) first")
        if _is_dtensor(source):
            source = source.full_tensor()
        if target.shape != source.shape:
            raise ValueError(f"{where}.{key}: expected shape {tuple(source.shape)}, found {tuple(target.shape)}")
        if _is_dtensor(target):
            from torch.distributed.tensor import distribute_tensor

            # src_data_rank=None: every rank cuts its own part from its own copy, no communication
            part = distribute_tensor(source.to(target.dtype), target.device_mesh, target.placements,
                                     src_data_rank=None)
            target.to_local().copy_(part.to_local())
        else:
            target.copy_(source)


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)
