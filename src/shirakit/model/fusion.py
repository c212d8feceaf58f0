"""Multi-adapter fusion: one new adapter equal to a weighted sum of others (SHiRA paper §4.2).

``combine_adapters(model, ["a", "b"], [1.0, 1.0], "ab")`` adds adapter "ab" with

    delta_ab = sum_i w_i * delta_i     (per targeted layer)

How each method represents the sum exactly is its own business (``Adapter.combine``):
SHiRA takes the sparse union of positions (values summed where they overlap), LoRA concatenates
ranks. The result is an ordinary adapter: it can be merged, switched, saved in PEFT's format.

Modules saved whole (``modules_to_save``, e.g. a classification head) cannot be summed
meaningfully; the fused adapter keeps one adapter's copies: ``modules_from``'s, or the common copy
when every adapter holding one holds the same values. Different copies and no ``modules_from``
is an error, never a silently dropped or untrained head.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..core.capabilities import Fusable, require
from ..core.layer import ModulesToSave
from ..core.registry import method_for_config
from ..core.state import adapter_layers, check_adapter_names, hosts, state_of
from ..core.threads import writes_weights
from ..core.validation import check_scalar
from .inject import inject
from .tensors import AdapterTensors


def _saved_module_sources(model: nn.Module, names: list[str], modules_from: str | None) -> dict[str, str]:
    """Which adapter's copy each ModulesToSave host gives the fused adapter (host path -> adapter name)."""
    if modules_from is not None and modules_from not in names:
        raise ValueError(f"modules_from={modules_from!r} is not one of the adapters combined {names}")
    sources = {}
    for path, host in hosts(model):
        holders = [n for n in names if isinstance(host, ModulesToSave) and n in host.adapters]
        if not holders:
            continue
        if modules_from is not None:
            if modules_from not in holders:
                raise ValueError(f"modules_from={modules_from!r} has no copy of {path}; {holders} have")
            sources[path] = modules_from
            continue
        first = host.adapters[holders[0]].state_dict()
        for other in holders[1:]:
            if any(not torch.equal(first[k], v) for k, v in host.adapters[other].state_dict().items()):
                raise ValueError(f"adapters {holders[0]!r} and {other!r} hold different copies of {path} "
                                 "(modules_to_save); pass modules_from= the adapter whose copy to keep")
        sources[path] = holders[0]
    return sources


@writes_weights
def combine_adapters(model: nn.Module, names: list[str], weights: list[float], new_name: str,
                     modules_from: str | None = None) -> nn.Module:
    """Add ``new_name`` = sum_i weights[i] * adapter names[i]; it becomes the active adapter.
    Modules saved whole come from ``modules_from`` (see the module docstring)."""
    check_adapter_names(model, names)
    if len(names) != len(weights):
        raise ValueError(f"expected one weight per adapter ({len(names)}), found {len(weights)}")
    if not names:
        raise ValueError("expected at least one adapter to combine")
    state = state_of(model)
    if new_name in state.configs:
        raise ValueError(f"adapter {new_name!r} already exists")
    configs = [state.configs[n] for n in names]
    methods = {method_for_config(c) for c in configs}
    if len(methods) != 1:
        raise ValueError(f"can only combine adapters of one method, found {sorted(c.peft_type for c in configs)}")
    method = methods.pop()
    require(method, Fusable, "combine_adapters")
    layers = {
        path: (layer.geometry, [layer.adapters[n] if n in layer.adapters else None for n in names])
        for path, layer in adapter_layers(model)
        if any(n in layer.adapters for n in names)
    }
    sources = _saved_module_sources(model, names, modules_from)
    weights = [check_scalar(f"weight of {n!r}", w) for n, w in zip(names, weights)]
    config, tensors = method.combine(layers, configs, weights)
    saved = sorted({m for c in configs for m in (c.modules_to_save or [])})
    task_types = {c.task_type for c in configs}
    config = dataclasses.replace(config, modules_to_save=saved or None,
                                 task_type=task_types.pop() if len(task_types) == 1 else None)
    config.inference_mode = True
    values = {f"{path}.{key}": value for path, layer_tensors in tensors.items() for key, value in layer_tensors.items()}
    for path, host in hosts(model):
        if path in sources:
            values.update({f"{path}.{key}": value
                           for key, value in host.adapters[sources[path]].state_dict().items()})
    inject(model, config, new_name, tensors=AdapterTensors(values, source=f"combine_adapters({names})"))
    return model
