"""Finding target layers (PEFT's matching rules) and putting adapters in and out of a model.

The model is changed in place and keeps its class: targeted layers become
:class:`~shirakit.layer.AdapterLinear`, ``modules_to_save`` become
:class:`~shirakit.layer.ModulesToSave`; a small record of configs rides on the model as
``model.shirakit`` (a plain attribute, not a submodule, so the state dict is unchanged).

Tensors an adapter shares across all its layers (VeRA's projections, :meth:`Adapter.make_shared`)
are kept once per model and adapter in a :class:`SharedTensors` under ``model.shirakit_shared``:
a registered submodule, so ``model.to()`` moves them once, holding them as *non-persistent*
buffers, so ``model.state_dict()`` keeps exactly the base model's keys. Layers hold a plain
reference to the holder (not a submodule of theirs), so nothing is stored or moved per layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapter import Adapter
from .config import AdapterConfig
from .guard import ModelGuard, writes_weights
from .layer import SUPPORTED_LAYERS, AdapterLinear, ModulesToSave
from .masks import layer_generator
from .registry import method_for_config

ALL_LINEAR = "all-linear"


@dataclass
class ModelAdapters:
    """What shirakit knows about a model: each adapter's config, which are active, seeds used."""

    configs: dict[str, AdapterConfig] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    trainable: dict[str, bool] = field(default_factory=dict)
    guard: ModelGuard = field(default_factory=ModelGuard)  # the model's lock (shirakit.guard)


def state_of(model: nn.Module) -> ModelAdapters:
    state = getattr(model, "shirakit", None)
    if not isinstance(state, ModelAdapters):
        raise ValueError("this model has no shirakit adapters; call shirakit.inject(model, config) first")
    return state


def check_adapter_names(model: nn.Module, names: list[str]) -> None:
    known = state_of(model).configs
    unknown = [n for n in names if n not in known]
    if unknown:
        raise KeyError(f"unknown adapter(s) {unknown}; this model has {sorted(known)}")


# ---- tensors shared across layers ------------------------------------------------------------
SHARED_ATTR = "shirakit_shared"


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


def _add_shared(model: nn.Module, adapter_name: str, tensors: dict, device: torch.device) -> SharedTensors:
    store = getattr(model, SHARED_ATTR, None)
    if not isinstance(store, SharedStore):
        store = SharedStore()
        setattr(model, SHARED_ATTR, store)
    store[adapter_name] = SharedTensors(tensors).to(device)
    return store[adapter_name]


def _remove_shared(model: nn.Module, adapter_name: str | None = None) -> None:
    """Drop one adapter's shared tensors (all of them when ``adapter_name`` is None)."""
    store = getattr(model, SHARED_ATTR, None)
    if not isinstance(store, SharedStore):
        return
    if adapter_name is not None and adapter_name in store:
        del store[adapter_name]
    if adapter_name is None or len(store) == 0:
        delattr(model, SHARED_ATTR)


# ---- walking the model ------------------------------------------------------------------------
def adapter_layers(model: nn.Module) -> list[tuple[str, AdapterLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLinear)]


def hosts(model: nn.Module) -> list[tuple[str, AdapterLinear | ModulesToSave]]:
    """Every module holding per-adapter state under ``.adapters`` (the checkpoint key rule)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (AdapterLinear, ModulesToSave))]


def _user_modules(model: nn.Module):
    """(name, module) for the model as the user sees it: shirakit's internals are skipped and an
    AdapterLinear stands for the layer it wraps."""
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        if isinstance(module, AdapterLinear):
            skip.append(name)
        elif isinstance(module, (ModulesToSave, SharedStore)):
            skip.append(name)
            continue
        yield name, module


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (AdapterLinear, *SUPPORTED_LAYERS))


def _layer_index(name: str, layers_pattern) -> int | None:
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", name)
            if match:
                break
    return int(match.group(1)) if match else None


def _matches(spec, name: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
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
    saved = config.modules_to_save or []
    in_saved = lambda n: any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", n) for m in saved)  # noqa: E731
    if isinstance(spec, str) and spec.lower() == ALL_LINEAR:
        heads = _output_head_names(model)
        names = [n for n, m in modules.items() if _is_linear(m) and n not in heads]
    else:
        names = [n for n in modules if n and _matches(spec, n)]
        if not isinstance(spec, str) and getattr(config, "layers_to_transform", None) is not None:
            wanted = config.layers_to_transform
            wanted = [wanted] if isinstance(wanted, int) else list(wanted)
            pattern = getattr(config, "layers_pattern", None)
            names = [n for n in names if _layer_index(n, pattern) in wanted]
    if config.exclude_modules:
        names = [n for n in names if not _matches(config.exclude_modules, n)]
    names = [n for n in names if not in_saved(n)]
    if not names:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if _is_linear(m)})
        raise ValueError(
            f"target_modules={spec!r} matched no module; the model's linear layers are named {linear}"
        )
    wrong = [f"{n} ({type(modules[n]).__name__})" for n in names if not _is_linear(modules[n])]
    if wrong:
        raise TypeError(f"targets must be nn.Linear or transformers Conv1D; found {wrong}")
    return names


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


# ---- inject ---------------------------------------------------------------------------------
@writes_weights
def inject(
    model: nn.Module, config: AdapterConfig, adapter_name: str = "default", *, _from_checkpoint: bool = False
) -> nn.Module:
    """Add adapter ``adapter_name`` to every layer ``config`` targets; returns the same model.

    The base model is frozen; the new adapter becomes the active one and is trainable (unless
    ``config.inference_mode``). Random draws (masks, LoRA's A) come from one seed, split per
    layer, so the result is reproducible and identical on every rank that shares the seed.
    """
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string without '.', found {adapter_name!r}")
    state = getattr(model, "shirakit", None)
    fresh = state is None
    if fresh:
        state = ModelAdapters()
    if adapter_name in state.configs:
        raise ValueError(f"adapter {adapter_name!r} already exists; delete it first or use another name")
    method = method_for_config(config)
    targets = find_targets(model, config)
    seed = _seed_of(config)
    layers: list[tuple[str, AdapterLinear]] = []
    wrapped: list[str] = []  # wrappers this call made: taken out again if building the adapters fails
    try:
        for name in targets:
            module = model.get_submodule(name)
            if not isinstance(module, AdapterLinear):
                module = AdapterLinear(module)
                _set_submodule(model, name, module)
                wrapped.append(name)
            layers.append((name, module))
        _check_fan_in_fan_out(config, layers)
        shared = method.make_shared(config, [layer.geometry for _, layer in layers])
        generators = [None if _from_checkpoint else layer_generator(seed, adapter_name, name) for name, _ in layers]
        new_adapters = [
            _build_adapter(method, config, layer, generator, name)
            for (name, layer), generator in zip(layers, generators)
        ]
    except BaseException:  # e.g. a shape the method cannot take: leave the model as it was
        for name in wrapped:
            _set_submodule(model, name, model.get_submodule(name).base_layer)
        raise
    if fresh:
        for p in model.parameters():
            p.requires_grad_(False)
    if shared:
        holder = _add_shared(model, adapter_name, shared, layers[0][1].weight.device)
        for adapter in new_adapters:
            adapter.bind_shared(holder)
    sharers = _weight_sharers(model)
    for name, layer in layers:
        layer.weight_shared_with = sharers.get(name, ())
    for (_, layer), adapter in zip(layers, new_adapters):
        layer.add_adapter(adapter_name, adapter)
    for module_name in config.modules_to_save or []:
        _wrap_module_to_save(model, module_name, adapter_name)
    for _, host in hosts(model):
        host._guard = state.guard
    state.configs[adapter_name] = config
    state.trainable[adapter_name] = not config.inference_mode
    model.shirakit = state
    from .routing import install_keyword_routing

    install_keyword_routing(model)
    from .control import set_adapter

    set_adapter(model, adapter_name)
    return model


def _weight_sharers(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Adapter layer name -> the other parameters sharing its weight's storage (tied embeddings:
    ``lm_head.weight`` is ``embed_tokens.weight`` in SmolLM2, Llama 3.2, Gemma, GPT-2)."""
    by_storage: dict[tuple, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        if p.numel():
            by_storage.setdefault((p.device, p.untyped_storage().data_ptr()), []).append(pname)
    found = {}
    for name, layer in adapter_layers(model):
        w = layer.weight
        own = {f"{name}.base_layer.weight", f"{name}.weight"}
        others = [n for n in by_storage.get((w.device, w.untyped_storage().data_ptr()), []) if n not in own]
        if others:
            found[name] = tuple(others)
    return found


def _seed_of(config: AdapterConfig) -> int:
    seed = getattr(config, "random_seed", None)
    if seed is not None:
        return int(seed)
    # No seed given: take one from torch's global RNG, so torch.manual_seed makes runs repeatable.
    return int(torch.randint(0, 2**62, (1,)).item())


def _build_adapter(method, config, layer: AdapterLinear, generator, name: str) -> Adapter:
    layer.withdraw_live()  # masks (e.g. SHiRA-WM) must see the base weight, not live adapter values
    return method(layer.geometry, config, layer.base_layer, generator, source=name)


def _check_fan_in_fan_out(config: AdapterConfig, layers) -> None:
    if not hasattr(config, "fan_in_fan_out"):
        return
    stored_transposed = {layer.geometry.fan_in_fan_out for _, layer in layers}
    if stored_transposed == {True} and not config.fan_in_fan_out:
        config.fan_in_fan_out = True  # Conv1D: the layout is known from the layer type; record it for PEFT


def _wrap_module_to_save(model: nn.Module, module_name: str, adapter_name: str) -> None:
    matches = [n for n, m in _user_modules(model) if n and (n == module_name or n.endswith("." + module_name))]
    matches += [n for n, m in model.named_modules() if isinstance(m, ModulesToSave) and _matches([module_name], n)]
    if not matches:
        return  # PEFT lists heads a model may not have (e.g. 'classifier' and 'score' for SEQ_CLS)
    for name in dict.fromkeys(matches):
        module = model.get_submodule(name)
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module)
            _set_submodule(model, name, module)
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
    _remove_shared(model, adapter_name)
    del state.configs[adapter_name]
    state.trainable.pop(adapter_name, None)
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
    _remove_shared(model)
    from .routing import uninstall_keyword_routing

    uninstall_keyword_routing(model)
    del model.shirakit
    return model
