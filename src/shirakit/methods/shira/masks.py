"""SHiRA masks: which K = r*(m+n) entries of an (m, n) weight an adapter trains (§3.1, App. B).

A mask function has the signature ``(base_layer, r, generator) -> indices`` and returns the
positions directly, never a dense 0/1 matrix: either a (2, K) tensor of (row, col) in the
weight's logical (out, in) orientation, or a (K,) tensor of flat row-major positions.
Every layer and every adapter draws from its own generator, derived from one seed
(:func:`shirakit.model.inject.layer_generator`), so two same-shaped layers do not get the same mask.

The five masks of the paper, by ``ShiraConfig.mask_type``:

- ``random``  K positions uniformly without replacement (PEFT's default).
- ``struct``  the full diagonal (high rank) + every f-th row and column (rank-1 structure),
  then a deterministic fill to exactly K (:func:`struct_mask`).
- ``wm``      top-K by |W| (weight magnitude).
- ``grad``    top-K by |dL/dW|, the gradient accumulated over calibration batches.
- ``snip``    top-K by |W * dL/dW| (SNIP saliency, same accumulated gradient).

``grad`` and ``snip`` need data: run :func:`shirakit.calibrate` first, which hands
inject a ``mask_fn`` that looks the precomputed indices up. Ties in every top-K are broken by the
lower flat (row-major) index, so the masks are deterministic. See docs/masks.md.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ...core.adapter import LayerGeometry
from ...core.layer import geometry_of

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


def random_mask(base_layer: nn.Module, r: int, generator: torch.Generator) -> torch.Tensor:
    """K distinct flat positions drawn uniformly without replacement.

    For the usual 1-5% density this draws candidates with replacement and keeps first
    occurrences (O(K) memory); a dense ``randperm`` of all m*n positions (what PEFT does, plus a
    dense mask) is used only when the mask is dense enough for rejection to be wasteful.
    """
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


# ---- top-K by a score -------------------------------------------------------------------------
def top_k_flat(scores: torch.Tensor, k: int, source: str = "scores") -> torch.Tensor:
    """The K flat (row-major) positions of the largest ``scores`` (shape (out, in)), sorted.

    Ties at the K-th value are broken by the lower flat index, so the result is deterministic
    (``torch.topk`` alone is not on ties). Costs the topk plus two boolean temporaries of m*n.
    """
    flat = scores.reshape(-1)
    if k > flat.numel():
        raise ValueError(f"{source}: asked for the top {k} of only {flat.numel()} entries")
    if not bool(torch.isfinite(flat).all()):
        raise ValueError(f"{source}: the scores contain nan or inf; cannot rank them")
    if k == flat.numel():
        return torch.arange(k, device=flat.device)
    kth = torch.topk(flat, k, sorted=False).values.min()  # the K-th largest value
    above = torch.nonzero(flat > kth).squeeze(1)
    ties = torch.nonzero(flat == kth).squeeze(1)[: k - above.numel()]  # ascending: lower index first
    return torch.sort(torch.cat([above, ties])).values


def wm_mask(base_layer: nn.Module, r: int, generator: torch.Generator) -> torch.Tensor:
    """SHiRA-WM: the K entries of largest |W| (logical (out, in) positions; Conv1D is transposed)."""
    geometry = geometry_of(base_layer)
    k = shira_budget(r, geometry)
    with torch.no_grad():
        scores = geometry.as_out_in(base_layer.weight.detach()).abs()
        return top_k_flat(scores, k, "wm mask: |W|").cpu()


# ---- struct ----------------------------------------------------------------------------------
def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _struct_union(m: int, n: int, stride: int | None) -> int:
    """|diagonal U rows{0,f,2f..} U cols{0,f,2f..}| for an (m, n) weight, f = stride (None: no lines).

    a rows and c columns cover a*n + c*m - a*c cells; a diagonal cell (i, i) lies on a line iff
    i % f == 0, so the diagonal adds d - ceil(d/f) more (d = min(m, n)).
    """
    d = min(m, n)
    if stride is None:
        return d
    a, c = _ceil_div(m, stride), _ceil_div(n, stride)
    return a * n + c * m - a * c + d - _ceil_div(d, stride)


def struct_stride(m: int, n: int, k: int) -> int | None:
    """The smallest stride f whose whole lines plus the whole diagonal fit in K cells.

    None when not even row 0 + column 0 + the diagonal fit (r = 1 on layers with min(m, n) > 2):
    the mask is then the diagonal plus the fill.
    """
    for stride in range(1, max(m, n) + 1):
        if _struct_union(m, n, stride) <= k:
            return stride
    return None


def struct_mask(base_layer: nn.Module, r: int, generator: torch.Generator) -> torch.Tensor:
    """SHiRA-Struct: the full diagonal + every f-th row and column + a deterministic fill; exactly K.

    The diagonal (i, i), i < d = min(out, in), makes the adapter high rank; rows and columns
    0, f, 2f, ... (the same stride f for both, so rows and columns get about m*n/f cells each)
    are the structured (rank-1 when their values are tied) part. f is the smallest stride for
    which every line and the diagonal fit in K = r*(in+out) cells (:func:`struct_stride`);
    the K - |union| cells left over are filled with the first free cells in row-major order
    among the rows and columns off the lattice (a partial block starting at row 1), skipping
    the diagonal. Independent of the generator: same-shaped layers get the same mask.
    """
    geometry = geometry_of(base_layer)
    m, n = geometry.out_features, geometry.in_features
    k = shira_budget(r, geometry)
    return struct_indices(m, n, k)


def struct_indices(m: int, n: int, k: int) -> torch.Tensor:
    """Flat sorted positions of the struct mask of an (m, n) weight with budget k (see struct_mask)."""
    d = min(m, n)
    stride = struct_stride(m, n, k)
    diag = torch.arange(d) * (n + 1)
    parts = [diag]
    on_rows = torch.zeros(m, dtype=torch.bool)
    on_cols = torch.zeros(n, dtype=torch.bool)
    if stride is not None:
        rows, cols = torch.arange(0, m, stride), torch.arange(0, n, stride)
        on_rows[rows], on_cols[cols] = True, True
        parts.append((rows[:, None] * n + torch.arange(n)[None, :]).reshape(-1))
        parts.append((torch.arange(m)[:, None] * n + cols[None, :]).reshape(-1))
    need = k - _struct_union(m, n, stride)
    if need > 0:
        free_rows, free_cols = torch.nonzero(~on_rows).squeeze(1), torch.nonzero(~on_cols).squeeze(1)
        width = free_cols.numel()
        # the first need + d free-grid cells hold at least `need` cells off the diagonal
        grid = torch.arange(min(need + d, free_rows.numel() * width))
        r_, c_ = free_rows[grid // width], free_cols[grid % width]
        parts.append((r_ * n + c_)[r_ != c_][:need])
    flat = torch.unique(torch.cat(parts))
    if flat.numel() != k:  # pragma: no cover - guards the counting formula above
        raise AssertionError(f"struct mask: built {flat.numel()} positions, expected K = {k}")
    return flat


# ---- grad / snip: need data ------------------------------------------------------------------
def _needs_calibration(name: str, ranked_by: str) -> MaskFn:
    def mask(base_layer: nn.Module, r: int, generator: torch.Generator) -> torch.Tensor:
        raise ValueError(
            f"mask_type {name!r} ranks weights by {ranked_by} and needs calibration data: build the "
            f"config with shirakit.calibrate(model, config, batches) before inject (docs/masks.md)"
        )

    mask.__name__ = f"{name}_mask"
    mask.__doc__ = f"SHiRA-{name.capitalize()}: top-K by {ranked_by}; computed by shirakit.calibrate."
    return mask


grad_mask = _needs_calibration("grad", "|dL/dW|")
snip_mask = _needs_calibration("snip", "|W * dL/dW|")

#: mask_type -> mask function. grad and snip are listed so their name is a valid mask_type (and
#: checkpoints that name them load: loading never calls a mask); calling them asks for calibration.
MASKS: dict[str, MaskFn] = {
    "random": random_mask,
    "struct": struct_mask,
    "wm": wm_mask,
    "grad": grad_mask,
    "snip": snip_mask,
}
#: masks ranked by a gradient, computed from data by shirakit.calibrate
CALIBRATED_MASKS = ("grad", "snip")


def validate_indices(
    indices: torch.Tensor, geometry: LayerGeometry, k: int, source: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Check count, range and uniqueness.

    Returns (2, K) int64 (row, col) sorted row-major, and the permutation ``order`` such that
    sorted position p came from input position ``order[p]`` (to reorder values saved with them);
    ``order`` is None when the input was already sorted (then nothing needs reordering).
    """
    m, n = geometry.out_features, geometry.in_features
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"{source}: expected a tensor of indices, found {type(indices).__name__}")
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(f"{source}: expected integer indices, found dtype {indices.dtype}")
    indices = indices.detach().to("cpu", torch.int64)
    if indices.dim() == 1:
        flat = indices
        if flat.numel() and (flat.min() < 0 or flat.max() >= m * n):
            raise ValueError(f"{source}: flat index out of range [0, {m * n}) (found {flat.min()}..{flat.max()})")
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
    if flat.numel() < 2 or bool((flat[1:] > flat[:-1]).all()):
        # strictly increasing: sorted and unique already (what PEFT and shirakit write); skip the sort
        return (indices if indices.dim() == 2 else torch.stack([flat // n, flat % n])), None
    flat, order = torch.sort(flat, stable=True)
    if bool((flat[1:] == flat[:-1]).any()):
        dup = int(flat[1:][flat[1:] == flat[:-1]][0])
        raise ValueError(f"{source}: duplicated index (row {dup // n}, col {dup % n})")
    return torch.stack([flat // n, flat % n]), order
