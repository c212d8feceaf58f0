"""SHiRA masks: which K = r*(m+n) entries of an (m, n) weight an adapter trains.

A mask function has the signature ``(base_layer, r, generator) -> indices`` and returns the
positions directly, never a dense 0/1 matrix: either a (2, K) tensor of (row, col) in the
weight's logical (out, in) orientation, or a (K,) tensor of flat row-major positions.
Every layer and every adapter draws from its own generator, derived from one seed
(:func:`layer_generator`), so two same-shaped layers do not get the same mask.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import torch
from torch import nn

from .adapter import LayerGeometry

MaskFn = Callable[[nn.Module, int, torch.Generator], torch.Tensor]


def shira_budget(r: int, geometry: LayerGeometry) -> int:
    """K = r * (in + out): the same number of trainable values as a rank-r LoRA."""
    m, n = geometry.out_features, geometry.in_features
    k = r * (m + n)
    if r <= 0:
        raise ValueError(f"SHiRA r must be positive, found r={r}")
    if k > m * n:
        raise ValueError(
            f"SHiRA r={r} asks for K = r*(in+out) = {k} values but the {m}x{n} weight has only "
            f"{m * n}; use r <= {m * n // (m + n)}"
        )
    return k


def layer_generator(seed: int, adapter_name: str, layer_name: str) -> torch.Generator:
    """A CPU generator whose stream depends on (seed, adapter, layer) and nothing else."""
    digest = hashlib.blake2b(f"{seed}|{adapter_name}|{layer_name}".encode(), digest_size=8).digest()
    gen = torch.Generator()
    gen.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return gen


def random_mask(base_layer: nn.Module, r: int, generator: torch.Generator) -> torch.Tensor:
    """K distinct flat positions drawn uniformly without replacement.

    For the usual 1-5% density this draws candidates with replacement and keeps first
    occurrences (O(K) memory); a dense ``randperm`` of all m*n positions (what PEFT does, plus a
    dense mask) is used only when the mask is dense enough for rejection to be wasteful.
    """
    from .layer import geometry_of

    geometry = geometry_of(base_layer)
    total = geometry.in_features * geometry.out_features
    k = shira_budget(r, geometry)
    if k * 4 > total:
        return torch.randperm(total, generator=generator)[:k]
    chosen = torch.empty(0, dtype=torch.int64)
    while chosen.numel() < k:
        draw = torch.randint(total, (k - chosen.numel() + k // 8 + 16,), generator=generator)
        chosen = _first_occurrences(torch.cat([chosen, draw]))
    return chosen[:k]


def _first_occurrences(values: torch.Tensor) -> torch.Tensor:
    """Distinct values in order of first appearance (deterministic)."""
    order = torch.argsort(values, stable=True)
    ordered = values[order]
    keep = torch.ones_like(ordered, dtype=torch.bool)
    keep[1:] = ordered[1:] != ordered[:-1]
    return values[torch.sort(order[keep]).values]


MASKS: dict[str, MaskFn] = {"random": random_mask}


def validate_indices(
    indices: torch.Tensor, geometry: LayerGeometry, k: int, source: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check count, range and uniqueness.

    Returns (2, K) int64 (row, col) sorted row-major, and the permutation ``order`` such that
    sorted position p came from input position ``order[p]`` (to reorder values saved with them).
    """
    m, n = geometry.out_features, geometry.in_features
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"{source}: expected a tensor of indices, found {type(indices).__name__}")
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(f"{source}: expected integer indices, found dtype {indices.dtype}")
    indices = indices.detach().to("cpu", torch.int64)
    if indices.dim() == 1:
        flat = indices
    elif indices.dim() == 2 and indices.shape[0] == 2:
        rows, cols = indices
        if rows.numel() and (rows.min() < 0 or rows.max() >= m or cols.min() < 0 or cols.max() >= n):
            raise ValueError(
                f"{source}: index out of range for a {m}x{n} weight (rows in [{rows.min()}, {rows.max()}], "
                f"cols in [{cols.min()}, {cols.max()}])"
            )
        flat = rows * n + cols
    else:
        raise ValueError(f"{source}: expected indices of shape (2, K) or (K,), found {tuple(indices.shape)}")
    if flat.numel() != k:
        raise ValueError(f"{source}: expected K = r*(in+out) = {k} indices, found {flat.numel()}")
    if flat.numel() and (flat.min() < 0 or flat.max() >= m * n):
        raise ValueError(f"{source}: flat index out of range [0, {m * n}) (found {flat.min()}..{flat.max()})")
    flat, order = torch.sort(flat, stable=True)
    if flat.numel() > 1 and bool((flat[1:] == flat[:-1]).any()):
        dup = int(flat[1:][flat[1:] == flat[:-1]][0])
        raise ValueError(f"{source}: duplicated index (row {dup // n}, col {dup % n})")
    return torch.stack([flat // n, flat % n]), order
