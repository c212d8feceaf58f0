"""Multi-adapter fusion: one new adapter equal to a weighted sum of others (SHiRA paper §4.2).

``combine_adapters(model, ["a", "b"], [1.0, 1.0], "ab")`` adds adapter "ab" with

    delta_ab = sum_i w_i * delta_i     (per targeted layer)

How each method represents the sum exactly is its own business (``Adapter.combine``):
SHiRA takes the sparse union of positions (values summed where they overlap), LoRA concatenates
ranks. The result is an ordinary adapter: it can be merged, switched, saved in PEFT's format.
"""

from __future__ import annotations

from torch import nn

from .inject import inject
from .registry import method_for_config
from .state import adapter_layers, check_adapter_names, state_of


def combine_adapters(model: nn.Module, names: list[str], weights: list[float], new_name: str) -> nn.Module:
    """Add ``new_name`` = sum_i weights[i] * adapter names[i]; it becomes the active adapter."""
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
    layers = {
        path: (layer.geometry, [layer.adapters[n] if n in layer.adapters else None for n in names])
        for path, layer in adapter_layers(model)
        if any(n in layer.adapters for n in names)
    }
    config, tensors = method.combine(layers, configs, [float(w) for w in weights])
    config.inference_mode = True
    inject(model, config, new_name, _from_checkpoint=True)
    for path, layer in adapter_layers(model):
        if path in tensors:
            layer.adapters[new_name].load_tensors(tensors[path], source=f"combine_adapters({names}) at {path}")
    return model
