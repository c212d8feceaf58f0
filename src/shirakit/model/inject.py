"""Finding target layers (PEFT's matching rules) and putting adapters in and out of a model.

The orchestrator: it finds the targets, wraps them, asks the method for its adapters and
records the result; the state it records (``model.shirakit``, shared tensors, the wrapped
layers) is defined in :mod:`shirakit.core.state`. The model is changed in place and keeps its class:
targeted layers become :class:`~shirakit.core.layer.AdapterLinear`, ``modules_to_save`` become
:class:`~shirakit.core.layer.ModulesToSave`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import time
import warnings
from typing import Callable

import torch
from torch import nn

from ..compile.slots import check_new_adapter
from ..compile.sync import forget_compiled, forget_layers
from ..core.adapter import Adapter
from ..core.config import AdapterConfig
from ..core.layer import LINEAR_LAYERS, SUPPORTED_LAYERS, AdapterLinear, ModulesToSave, wrap_layer
from ..core.registry import method_for_config
from ..core.sharded_weights import storage_key
from ..core.state import (
    ModelAdapters,
    SharedStore,
    adapter_layers,
    add_shared,
    check_adapter_names,
    hosts,
    remove_shared,
    state_of,
    walk_modules,
)
from ..core.threads import writes_weights
from ..core.validation import REGEX_TIME_LIMIT, bounded_match, check_adapter_name
from .control import merge, set_adapter
from .hooks import install_keyword_routing, uninstall_keyword_routing
from .tensors import AdapterTensors, check_before_building, fill

ALL_LINEAR = "all-linear"


def _user_modules(model: nn.Module):
    """(name, module) for the model as the user sees it: shirakit's internals are skipped and an
    AdapterLinear stands for the layer it wraps."""
    for name, module in walk_modules(model, (AdapterLinear, ModulesToSave, SharedStore)):
        if not isinstance(module, (ModulesToSave, SharedStore)):
            yield name, module


def _is_linear(module: nn.Module) -> bool:
    """A linear layer ("all-linear" picks these, as PEFT does: no convs, no embeddings)."""
    inner = module.base_layer if isinstance(module, AdapterLinear) else module
    return isinstance(inner, LINEAR_LAYERS)


def _is_supported(module: nn.Module) -> bool:
    """A layer shirakit can wrap: linear, Conv1d / Conv2d, embedding (a method may still refuse a kind)."""
    inner = module.base_layer if isinstance(module, AdapterLinear) else module
    return isinstance(inner, SUPPORTED_LAYERS) and not isinstance(inner, nn.modules.conv._ConvTransposeNd)


def _layer_index(name: str, layers_pattern, deadline: float) -> int | None:
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = bounded_match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", name, deadline, "layers_pattern", full=False)
            if match:
                break
    return int(match.group(1)) if match else None


def _matches(spec, name: str, deadline: float = math.inf, what: str = "target_modules") -> bool:
    """PEFT's rule: a string is a regex that must match the whole name; a list matches a name or
    a dotted suffix. Regex matching stops with an error at ``deadline`` (no ReDoS hang)."""
    if isinstance(spec, str):
        return bounded_match(spec, name, deadline, what) is not None
    return name in spec or any(name.endswith("." + s) for s in spec)


def _output_head_names(model: nn.Module) -> set[str]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return {n for n, m in model.named_modules() if head is not None and m is head}


def find_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Module names to adapt, by PEFT's rules; a target that matches nothing is an error."""
    spec = config.target_modules
    if spec is None:
        raise ValueError("target_modules is required (a list of names, a regex string, or 'all-linear')")
    modules = dict(_user_modules(model))
    deadline = time.monotonic() + REGEX_TIME_LIMIT
    saved = config.modules_to_save or []
    in_saved = lambda n: any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", n) for m in saved)  # noqa: E731
    if isinstance(spec, str) and spec.lower() == ALL_LINEAR:
        heads = _output_head_names(model)
        names = [n for n, m in modules.items() if _is_linear(m) and n not in heads]
    else:
        names = [n for n in modules if n and _matches(spec, n, deadline)]
        if not isinstance(spec, str) and config.layers_to_transform is not None:
            wanted = config.layers_to_transform
            wanted = [wanted] if isinstance(wanted, int) else list(wanted)
            names = [n for n in names if _layer_index(n, config.layers_pattern, deadline) in wanted]
    if config.exclude_modules:
        names = [n for n in names if not _matches(config.exclude_modules, n, deadline, "exclude_modules")]
    names = [n for n in names if not in_saved(n)]
    if not names:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if _is_supported(m)})
        raise ValueError(
            f"target_modules={spec!r} matched no module; the model's adaptable layers are named {linear}"
        )
    wrong = [f"{n} ({type(modules[n]).__name__})" for n in names if not _is_supported(modules[n])]
    if wrong:
        raise TypeError("targets must be nn.Linear, transformers Conv1D, nn.Conv1d, nn.Conv2d or nn.Embedding; "
                        f"found {wrong}")
    return names


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


# ---- inject ---------------------------------------------------------------------------------
@writes_weights
def inject(
    model: nn.Module, config: AdapterConfig, adapter_name: str = "default", *, tensors: AdapterTensors | None = None
) -> nn.Module:
    """Add adapter ``adapter_name`` to every layer ``config`` targets; returns the same model.

    The base model is frozen; the new adapter becomes the active one and is trainable (unless
    ``config.inference_mode``). Random draws (masks, LoRA's A) come from one seed, split per
    layer, so the result is reproducible and identical on every rank that shares the seed.
    ``tensors`` (:class:`~shirakit.model.tensors.AdapterTensors`: a file's, a fusion's) gives the
    values instead: nothing is drawn, every tensor is checked and copied in.
    All or nothing: if any step fails (a tensor refused included), every change made so far is
    undone before the error is raised; this undo log is the only rollback loading has.
    """
    check_adapter_name(adapter_name)
    state = getattr(model, "shirakit", None)
    fresh = state is None
    if fresh:
        state = ModelAdapters()
    if adapter_name in state.configs:
        raise ValueError(f"adapter {adapter_name!r} already exists; delete it first or use another name")
    method = method_for_config(config)
    targets = find_targets(model, config)
    given = tensors is not None
    if given:  # before any change: nothing to undo yet
        tensors = check_before_building(model, method, config, targets, tensors)
    undo: list[Callable[[], None]] = []  # each change made, as the step that takes it back
    try:
        wrapped = [n for n in targets if not isinstance(model.get_submodule(n), AdapterLinear)]
        layers = _wrap_targets(model, targets, undo)
        config = _recorded_config(config, layers)
        shared = method.make_shared(config, [layer.geometry for _, layer in layers])
        seed = seed_of(config)
        # on the meta device nothing can be drawn (nor kept): placeholders, drawn by reset_adapter_parameters
        undrawn = not given and any(layer.weight.is_meta for _, layer in layers)
        generators = [None if given or undrawn else layer_generator(seed, adapter_name, name)
                      for name, _ in layers]
        new_adapters = [
            _build_adapter(method, config, layer, generator, name)
            for (name, layer), generator in zip(layers, generators)
        ]
        check_new_adapter(model, adapter_name, layers, new_adapters, wrapped)
        _attach(model, state, fresh, config, adapter_name, layers, new_adapters, shared, undo)
        if given:
            fill(model, adapter_name, method, config, tensors)
        else:  # reset_adapter_parameters repeats these draws (meta-device models)
            state.seeds[adapter_name] = seed
        if undrawn:
            state.undrawn.add(adapter_name)
    except BaseException:  # a shape the method cannot take, a refused tensor, KeyboardInterrupt, ...
        _run_undo(undo)
        raise
    return model


def _run_undo(undo: list[Callable[[], None]]) -> None:
    """Take the recorded changes back, newest first; one failing step does not stop the others."""
    for step in reversed(undo):
        try:
            step()
        except Exception as exc:  # the original error is the one to raise
            warnings.warn(f"shirakit: undoing a failed inject was incomplete: {exc!r}", stacklevel=3)


def _wrap_targets(model: nn.Module, targets: list[str], undo: list) -> list[tuple[str, AdapterLinear]]:
    layers = []
    for name in targets:
        module = model.get_submodule(name)
        if not isinstance(module, AdapterLinear):
            module = wrap_layer(module)
            _set_submodule(model, name, module)
            undo.append(lambda name=name, base=module.base_layer: _set_submodule(model, name, base))
        layers.append((name, module))
    return layers


def _attach(model, state, fresh, config, adapter_name, layers, new_adapters, shared, undo) -> None:
    """Put the built adapters into the model and make the new one active, recording each change."""
    if fresh:
        trainable = [p for p in model.parameters() if p.requires_grad]
        undo.append(lambda: [p.requires_grad_(True) for p in trainable])
        for p in model.parameters():
            p.requires_grad_(False)
    if shared:
        undo.append(lambda: remove_shared(model, adapter_name))
        holder = add_shared(model, adapter_name, shared, layers[0][1].weight.device)
        for adapter in new_adapters:
            adapter.bind_shared(holder)
    sharers = _weight_sharers(model)
    for name, layer in layers:
        layer.weight_shared_with = sharers.get(name, ())
    for (_, layer), adapter in zip(layers, new_adapters):
        undo.append(lambda layer=layer: adapter_name in layer.adapters and layer.remove_adapter(adapter_name))
        layer.add_adapter(adapter_name, adapter)
    for module_name in config.modules_to_save or []:
        _wrap_module_to_save(model, module_name, adapter_name, undo)
    for _, host in hosts(model):
        host._guard = state.guard
    previous_active = list(state.active)
    undo.append(lambda: (state.configs.pop(adapter_name, None), state.trainable.pop(adapter_name, None)))
    state.configs[adapter_name] = config
    state.trainable[adapter_name] = not config.inference_mode
    if fresh:
        undo.append(lambda: (uninstall_keyword_routing(model), model.__dict__.pop("shirakit", None)))
    model.shirakit = state
    install_keyword_routing(model)
    forget_layers(model)  # new layers may have been wrapped
    undo.append(lambda: forget_layers(model))
    undo.append(lambda: _restore_active(model, state, previous_active))
    set_adapter(model, adapter_name)


def _restore_active(model: nn.Module, state: ModelAdapters, names: list[str]) -> None:
    state.active = [n for n in names if n in state.configs]
    for _, host in hosts(model):
        host.set_active(state.active)


def _weight_sharers(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Adapter layer name -> the other parameters sharing its weight's storage (tied embeddings:
    ``lm_head.weight`` is ``embed_tokens.weight`` in SmolLM2, Llama 3.2, Gemma, GPT-2)."""
    by_storage: dict[tuple, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        if p.numel():
            by_storage.setdefault(storage_key(p), []).append(pname)
    found = {}
    for name, layer in adapter_layers(model):
        w = layer.weight
        own = {f"{name}.base_layer.weight", f"{name}.weight"}
        others = [n for n in by_storage.get(storage_key(w), []) if n not in own]
        if others:
            found[name] = tuple(others)
    return found


def seed_of(config: AdapterConfig) -> int:
    if config.seed is not None:
        return int(config.seed)
    # No seed given: take one from torch's global RNG, so torch.manual_seed makes runs repeatable.
    return int(torch.randint(0, 2**62, (1,), device="cpu").item())  # cpu: also inside `with torch.device("meta")`


def layer_generator(seed: int, adapter_name: str, layer_name: str) -> torch.Generator:
    """A CPU generator whose stream depends on (seed, adapter, layer) and nothing else."""
    digest = hashlib.blake2b(f"{seed}|{adapter_name}|{layer_name}".encode(), digest_size=8).digest()
    gen = torch.Generator()
    gen.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return gen


def _build_adapter(method, config, layer: AdapterLinear, generator, name: str) -> Adapter:
    layer.withdraw_live()  # masks (e.g. SHiRA-WM) must see the base weight, not live adapter values
    return method.build(layer.geometry, config, layer.base_layer, generator, source=name)


def _recorded_config(config: AdapterConfig, layers) -> AdapterConfig:
    """The config the model records: a copy, so the user's object is never changed (nor are we by
    later changes to it). On Conv1D layers the layout is known from the layer type; it is recorded
    as ``fan_in_fan_out=True`` for PEFT, where PEFT's config for the method has that field."""
    stored_transposed = {layer.geometry.fan_in_fan_out for _, layer in layers} == {True}
    if stored_transposed and not config.fan_in_fan_out and "fan_in_fan_out" not in config.absent_in_peft:
        return dataclasses.replace(config, fan_in_fan_out=True)
    return dataclasses.replace(config)


def _wrap_module_to_save(model: nn.Module, module_name: str, adapter_name: str, undo: list) -> None:
    matches = [n for n, m in _user_modules(model) if n and (n == module_name or n.endswith("." + module_name))]
    matches += [n for n, m in model.named_modules() if isinstance(m, ModulesToSave) and _matches([module_name], n)]
    if not matches:
        return  # PEFT lists heads a model may not have (e.g. 'classifier' and 'score' for SEQ_CLS)
    for name in dict.fromkeys(matches):
        module = model.get_submodule(name)
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module)
            _set_submodule(model, name, module)
            undo.append(lambda name=name, original=module.original_module: _set_submodule(model, name, original))
        if adapter_name not in module.adapters:
            undo.append(lambda module=module: adapter_name in module.adapters and module.remove_adapter(adapter_name))
            module.add_adapter(adapter_name)


# ---- taking adapters out --------------------------------------------------------------------
@writes_weights
def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove one adapter everywhere; refused while it is merged."""
    state = state_of(model)
    check_adapter_names(model, [adapter_name])
    merged_in = [n for n, layer in adapter_layers(model) if adapter_name in layer.merged]
    if merged_in:
        raise RuntimeError(f"adapter {adapter_name!r} is merged in {len(merged_in)} layer(s); unmerge first")
    for _, host in hosts(model):
        if adapter_name in host.adapters:
            host.remove_adapter(adapter_name)
    remove_shared(model, adapter_name)
    del state.configs[adapter_name]
    state.trainable.pop(adapter_name, None)
    state.seeds.pop(adapter_name, None)
    state.undrawn.discard(adapter_name)
    state.active = [n for n in state.active if n != adapter_name]


@writes_weights
def unload(model: nn.Module, merge: bool = False) -> nn.Module:
    """Put the original layers back. ``merge=True`` first merges the active adapters (and keeps
    their copies of modules_to_save); otherwise merged adapters are unmerged first."""
    state = state_of(model)
    for name, host in hosts(model):
        if isinstance(host, AdapterLinear):
            if merge:
                host.merge([n for n in state.active if n in host.adapters])
            else:
                host.unmerge()
            host.withdraw_live()
            _set_submodule(model, name, host.base_layer)
        else:
            keep = host.current() if merge else host.original_module
            _set_submodule(model, name, keep)
    remove_shared(model)
    uninstall_keyword_routing(model)
    forget_compiled(model)
    del model.shirakit
    return model


def merge_and_unload(model: nn.Module, safe_merge: bool = False) -> nn.Module:
    """Merge the active adapters and return the plain model with its original layer types."""
    if safe_merge:
        merge(model, safe_merge=True)
    return unload(model, merge=True)
