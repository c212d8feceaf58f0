"""Switching adapters on and off, merging, scaling, and counting what trains."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from ..compile.slots import check_swap
from ..core.layer import AdapterLinear
from ..core.state import adapter_layers, check_adapter_names, hosts, state_of
from ..core.threads import writes_weights
from ..core.validation import check_scalar


def _as_list(names: str | list[str]) -> list[str]:
    return [names] if isinstance(names, str) else list(names)


@writes_weights
def set_adapter(model: nn.Module, name_or_names: str | list[str]) -> None:
    """Make these adapters active (their deltas add up); only active, trainable adapters get grads."""
    names = _as_list(name_or_names)
    check_adapter_names(model, names)
    check_swap(model, names)
    state = state_of(model)
    state.active = names
    for _, host in hosts(model):
        host.set_active(names)
        for adapter_name, module in host.adapters.items():
            train = adapter_name in names and state.trainable.get(adapter_name, False)
            for p in module.parameters():
                p.requires_grad_(train)


def active_adapters(model: nn.Module) -> list[str]:
    return list(state_of(model).active)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Within the block the model computes as the bare base model. Merged adapters are
    unmerged for the block and merged again after it."""
    layers = hosts(model)
    guard = state_of(model).guard
    with guard.writing("disable_adapters()"):
        merged = {name: list(h.merged) for name, h in layers if isinstance(h, AdapterLinear) and h.merged}
        for name, host in layers:
            if name in merged:
                host.unmerge()
            host.set_disabled(True)
    try:
        yield
    finally:
        with guard.writing("leaving disable_adapters()"):
            for name, host in layers:
                host.set_disabled(False)
                if name in merged:
                    host.merge(merged[name])


@writes_weights
def merge(
    model: nn.Module, adapter_names: list[str] | None = None, safe_merge: bool = False, exact: bool = False
) -> None:
    """Fold adapters into the base weights (the active ones by default).

    ``safe_merge=True`` checks every layer for non-finite results first and raises, leaving
    the model untouched, if any would appear. ``exact=True`` keeps a copy of each weight an additive
    adapter (LoRA, VeRA, MiSS balance/mini) is merged into, so unmerge restores it bit-exactly rather
    than by subtraction (which leaves rounding, ~1e-6 after thousands of switches); SHiRA and MiSS
    bat restore bit-exactly anyway. Costs one weight-sized copy per merged additive adapter.
    """
    names = active_adapters(model) if adapter_names is None else _as_list(adapter_names)
    check_adapter_names(model, names)
    layers = adapter_layers(model)
    if safe_merge:
        bad = [n for n, layer in layers if not layer.merge_is_finite([a for a in names if a in layer.adapters])]
        if bad:
            raise ValueError(f"merging {names} would make non-finite weights in {bad}; nothing was merged")
    for _, layer in layers:
        layer.merge([a for a in names if a in layer.adapters], exact)


@writes_weights
def unmerge(model: nn.Module) -> None:
    """Take every merged adapter back out (SHiRA restores the base values bit-exactly)."""
    for _, layer in adapter_layers(model):
        layer.unmerge()


@writes_weights
def set_scale(model: nn.Module, adapter_name: str, scale: float) -> None:
    """An adapter's strength at inference: SHiRA's scaling (default 1), LoRA's multiplier."""
    check_adapter_names(model, [adapter_name])
    scale = check_scalar("scale", scale)  # NaN or inf would poison every output (and a merged weight)
    for _, layer in adapter_layers(model):
        if adapter_name in layer.adapters:
            if adapter_name in layer.merged:
                raise RuntimeError(f"adapter {adapter_name!r} is merged; unmerge before changing its scale")
            layer.adapters[adapter_name].set_scale(scale)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; total counts the base model once (not its copies)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    trainable, total = trainable_parameters(model)
    share = 100 * trainable / max(total, 1)
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {share:.4f}")


@torch.no_grad()
def delta_weights(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Each targeted layer's dense delta (out, in) for one adapter (tests, fusion, metrics)."""
    return {
        name: layer.adapters[adapter_name].delta_weight(layer.weight)
        for name, layer in adapter_layers(model)
        if adapter_name in layer.adapters
    }
