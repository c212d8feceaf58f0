"""Data-driven SHiRA masks (SHiRA-Grad and SHiRA-SNIP, arXiv 2406.13175 §3.1 and App. B).

Both rank a layer's entries by the gradient of the loss accumulated over a few calibration
batches, G = sum_b dL_b/dW (the base weights W held fixed):

    grad:  score = |G|            snip:  score = |W * G|

and keep the top K = r*(in+out) per layer (ties: lower row-major index first). The calibration
runs once, before inject; :func:`calibrate` returns a copy of the config whose ``mask_fn`` hands
inject the precomputed indices, so the masks travel in the checkpoint and are never recomputed.

    config = shirakit.calibrate(model, ShiraConfig(r=8, mask_type="snip", target_modules=...), batches)
    shirakit.inject(model, config)

Memory: a dense fp32 accumulator is held only for a *group* of layers at a time (at most
``max_memory_mb``, or one layer when a single layer is larger); each group costs one pass
(forward + backward) over the calibration batches. See docs/masks.md for the peak.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import itertools
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..core.adapter import LayerGeometry
from ..core.layer import AdapterLinear, geometry_of
from ..methods.shira.adapter import ShiraConfig
from ..methods.shira.masks import CALIBRATED_MASKS, MASKS, shira_budget, top_k_flat, validate_indices
from .control import disable_adapters
from .inject import find_targets, layer_generator, seed_of

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """``model(**batch).loss``: Hugging Face models given labels."""
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"the default calibration loss calls model(**batch) and needs a dict batch, found "
            f"{type(batch).__name__}; pass loss_fn=lambda model, batch: ..."
        )
    loss = getattr(model(**batch), "loss", None)
    if loss is None:
        raise ValueError("model(**batch) returned no loss (does the batch have 'labels'?); pass loss_fn")
    return loss


def _score(mask_type: str, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The ranking score in logical (out, in) layout, fp32."""
    if mask_type == "grad":
        return grad.abs()
    return (weight.float() * grad).abs()  # snip


# ---- the public API ------------------------------------------------------------------------
def compute_masks(
    model: nn.Module,
    config: ShiraConfig,
    batches: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    max_batches: int = 8,
    *,
    max_memory_mb: float | None = 256.0,
    adapter_name: str = "default",
) -> dict[str, torch.Tensor]:
    """Each targeted layer's mask, ``{layer name: (2, K) int64 (row, col) sorted row-major}``.

    For ``grad``/``snip`` the first ``max_batches`` of ``batches`` are run through ``loss_fn(model,
    batch)`` (default ``model(**batch).loss``) with the model in eval mode (no dropout: same data,
    same masks) and any existing adapters disabled (the masks rank the base weights). Other
    mask types are computed as inject would compute them (same seed, same generator per layer).
    The model's parameters, their ``requires_grad`` and ``.grad``, and its train/eval mode are
    left as they were.
    """
    if not isinstance(config, ShiraConfig):
        raise TypeError(f"compute_masks takes a ShiraConfig, found {type(config).__name__}")
    layers = {name: _base_layer(model.get_submodule(name)) for name in find_targets(model, config)}
    budgets = {name: shira_budget(config.r, geometry_of(layer)) for name, layer in layers.items()}
    if config.mask_fn is not None or config.mask_type not in CALIBRATED_MASKS:
        return _data_free_masks(config, layers, budgets, adapter_name)
    if batches is None:
        raise ValueError(f"mask_type {config.mask_type!r} needs calibration batches; found batches=None")
    if not isinstance(max_batches, int) or max_batches <= 0:
        raise ValueError(f"max_batches must be a positive int, found {max_batches!r}")
    kept = list(itertools.islice(iter(batches), max_batches))  # re-read once per group of layers
    if not kept:
        raise ValueError("compute_masks: the calibration batches are empty")
    groups = _groups(layers, max_memory_mb)
    out: dict[str, torch.Tensor] = {}
    with _calibration_mode(model):
        for group in groups:
            grads = _accumulate(model, {n: layers[n] for n in group}, kept, loss_fn or default_loss)
            for name in group:
                geometry = geometry_of(layers[name])
                weight = geometry.as_out_in(layers[name].weight.detach())
                scores = _score(config.mask_type, weight, geometry.as_out_in(grads.pop(name)))
                flat = top_k_flat(scores, budgets[name], f"{config.mask_type} mask of {name}").cpu()
                del scores
                out[name] = _checked(flat, geometry, budgets[name], name)
    return out


def calibrate(model: nn.Module, config: ShiraConfig, *args: Any, **kwargs: Any) -> ShiraConfig:
    """:func:`compute_masks` (same arguments), then :func:`with_masks`: a config copy ready for
    ``inject(model, it)``."""
    return with_masks(model, config, compute_masks(model, config, *args, **kwargs))


calibrate.__signature__ = inspect.signature(compute_masks).replace(return_annotation="ShiraConfig")


def with_masks(model: nn.Module, config: ShiraConfig, masks: Mapping[str, torch.Tensor]) -> ShiraConfig:
    """A copy of ``config`` whose ``mask_fn`` returns ``masks[name]`` for the layer ``name`` of
    ``model`` (looked up by the layer object inject passes). ``mask_type`` is kept, so it is what
    adapter_config.json records."""
    lookup = PrecomputedMasks({name: (_base_layer(model.get_submodule(name)), idx) for name, idx in masks.items()})
    return dataclasses.replace(config, mask_fn=lookup)


class PrecomputedMasks:
    """A ``mask_fn`` that returns indices computed earlier for specific layer objects."""

    __name__ = "precomputed"

    def __init__(self, masks: Mapping[str, tuple[nn.Module, torch.Tensor]]) -> None:
        self._by_layer = {id(layer): (weakref.ref(layer), idx) for layer, idx in masks.values()}
        self.names = sorted(masks)

    def __call__(self, base_layer: nn.Module, r: int, generator: torch.Generator | None) -> torch.Tensor:
        entry = self._by_layer.get(id(base_layer))
        if entry is None or entry[0]() is not base_layer:
            raise ValueError(
                f"precomputed masks: this {type(base_layer).__name__} was not calibrated (masks exist for "
                f"{len(self.names)} layers, e.g. {self.names[:3]}); calibrate the model you inject into, "
                "with the same target_modules"
            )
        return entry[1]


# ---- internals -----------------------------------------------------------------------------
def _base_layer(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, AdapterLinear) else module


def _checked(flat: torch.Tensor, geometry: LayerGeometry, k: int, name: str) -> torch.Tensor:
    return validate_indices(flat, geometry, k, f"mask of {name}")[0]


def _data_free_masks(config, layers, budgets, adapter_name) -> dict[str, torch.Tensor]:
    """random / struct / wm / a custom mask_fn: what inject would compute, same seed and streams."""
    mask_fn = config.mask_fn or MASKS[config.mask_type]
    seed = seed_of(config)
    return {
        name: _checked(mask_fn(layer, config.r, layer_generator(seed, adapter_name, name)),
                       geometry_of(layer), budgets[name], name)
        for name, layer in layers.items()
    }


def _groups(layers: Mapping[str, nn.Module], max_memory_mb: float | None) -> list[list[str]]:
    """Consecutive layers whose fp32 accumulators fit in the budget (a larger layer goes alone)."""
    if max_memory_mb is None:
        return [list(layers)]
    if max_memory_mb <= 0:
        raise ValueError(f"max_memory_mb must be positive or None, found {max_memory_mb!r}")
    budget = max_memory_mb * 2**20
    groups: list[list[str]] = []
    used = budget + 1.0
    for name, layer in layers.items():
        size = 4 * layer.weight.numel()
        if used + size > budget:
            groups.append([])
            used = 0.0
        groups[-1].append(name)
        used += size
    return groups


@contextlib.contextmanager
def _calibration_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode, every parameter frozen, existing adapters disabled; all restored on exit."""
    training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    with contextlib.ExitStack() as stack:
        if getattr(model, "shirakit", None) is not None:
            stack.enter_context(disable_adapters(model))
        try:
            model.eval()
            for p, _ in flags:
                p.requires_grad_(False)
            yield
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
            model.train(training)


def _accumulate(
    model: nn.Module, group: dict[str, nn.Module], batches: list, loss_fn: LossFn
) -> dict[str, torch.Tensor]:
    """sum_b dL_b/dW for the group's weights (fp32, storage layout), one pass over the batches.

    Each weight's gradient is taken off ``.grad`` as soon as autograd accumulates it (a
    post-accumulate hook), so no ``.grad`` outlives its backward and a half-precision model
    still accumulates in fp32.
    """
    acc: dict[str, torch.Tensor] = {}
    saved_grads, handles = {}, []

    def hook_for(name: str):
        def hook(param: torch.Tensor) -> None:
            grad = param.grad.detach().float()  # fp32 grads: the buffer itself, released from .grad below
            if name in acc:
                acc[name].add_(grad)
            else:
                acc[name] = grad
            param.grad = None
        return hook

    try:
        for name, layer in group.items():
            weight = layer.weight
            saved_grads[name] = weight.grad
            weight.grad = None
            weight.requires_grad_(True)
            handles.append(weight.register_post_accumulate_grad_hook(hook_for(name)))
        for i, batch in enumerate(batches):
            with torch.enable_grad():
                loss = loss_fn(model, batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError(f"calibration loss_fn must return a scalar tensor, found {loss!r:.80}")
            if not loss.requires_grad:
                raise ValueError(f"calibration batch {i}: the loss does not depend on layers {sorted(group)[:3]}")
            loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        for name, layer in group.items():
            layer.weight.requires_grad_(False)
            layer.weight.grad = saved_grads[name]
    missing = sorted(set(group) - set(acc))
    if missing:
        raise ValueError(
            f"calibration: layer(s) {missing[:3]} received no gradient from the loss; they do not affect "
            "it. Exclude them from target_modules or use another mask_type"
        )
    return acc
