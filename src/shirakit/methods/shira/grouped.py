"""Many SHiRA adapters' deltas in one call: a mixed batch's rows, each with its own adapter (numba, CPU).

In a routed step (``shirakit.route``: row b uses adapter a(b)) a layer adds, to each row's base output,

    y[b, i] += s_a * sum_{k in row i of S_a} v_k * x[b, j_k]        a = a(b)

for every adapter's K positions (i_k, j_k) (SHiRA, arXiv 2406.13175). Done one adapter at a time
(a sparse product per group) that is a dozen small torch calls per adapter per layer: with 16
decoding rows over 16 adapters on SmolLM2-135M, ~960 calls per step, and a routed step took ~1.4x
a fused one although the arithmetic is ~0.5% of the base product. Here one kernel call per layer
does every group: the adapters' CSR arrays are laid end to end (``crow`` offsets, ``col``, values)
and each row walks its own adapter's part. The sum runs in CSR order and multiplies each value by
its scale first, as the per-group sparse product does. The laid-out arrays are kept per layer (for
all its SHiRA adapters, so ~8 bytes per value more) and laid out again only when an adapter comes,
goes or changes (its values' and indices' storage and version, and its scale, are compared; the
arena holds its adapters, so a deleted adapter's id or memory cannot be taken by a new one while
the arena could still match it).

Used for inference on CPU (no gradient: training keeps the sparse product, whose values get their
gradient from autograd), fp32/fp64, when numba imports; anything else takes the per-group path.
Compiled on first use; numba caches the machine code like ``cpu_sddmm``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch

from .lazy import once

try:  # numba is a dependency, but the torch path must keep working without it
    import numba
except ImportError:  # pragma: no cover
    numba = None

AVAILABLE = numba is not None
_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}


@once
def _kernel():
    @numba.njit(nogil=True, cache=True)
    def row_sums(crow, col, vals, s, c0, n0, xr, yr):  # pragma: no cover - numba
        # yr[i] += sum over row i of the CSR of s * v_k * xr[j_k], k in CSR order. Two rows at a
        # time: two independent chains of adds (the sum is bound by add latency), each in order.
        n_out = yr.shape[0]
        for i in range(0, n_out - 1, 2):
            k1, e1 = n0 + crow[c0 + i], n0 + crow[c0 + i + 1]
            k2, e2 = e1, n0 + crow[c0 + i + 2]
            acc1 = s - s  # a zero of y's dtype (a scale is finite)
            acc2 = s - s
            while k1 < e1 and k2 < e2:
                acc1 += (vals[k1] * s) * xr[col[k1]]
                acc2 += (vals[k2] * s) * xr[col[k2]]
                k1 += 1
                k2 += 1
            while k1 < e1:
                acc1 += (vals[k1] * s) * xr[col[k1]]
                k1 += 1
            while k2 < e2:
                acc2 += (vals[k2] * s) * xr[col[k2]]
                k2 += 1
            yr[i] += acc1
            yr[i + 1] += acc2
        if n_out % 2:
            i = n_out - 1
            acc = s - s
            for k in range(n0 + crow[c0 + i], n0 + crow[c0 + i + 1]):
                acc += (vals[k] * s) * xr[col[k]]
            yr[i] += acc

    @numba.njit(nogil=True, cache=True)
    def add_rows(crow, col, vals, scales, crow_start, nnz_start, which, x, y):  # pragma: no cover - numba
        rows, tokens, _ = y.shape
        for b in range(rows):
            a = which[b]
            if a < 0:
                continue
            for t in range(tokens):
                row_sums(crow, col, vals, scales[a], crow_start[a], nnz_start[a], x[b, t], y[b, t])

    return add_rows


@dataclass
class _Arena:
    """A layer's SHiRA adapters' CSR arrays laid end to end, and where each one starts."""

    key: tuple
    adapters: tuple  # held, so no other object can take an id (or a tensor address) in ``key``
    position: dict[int, int]  # id(adapter) -> its index in the arrays below
    crow: np.ndarray
    col: np.ndarray
    vals: np.ndarray
    scales: np.ndarray
    crow_start: np.ndarray
    nnz_start: np.ndarray


# layer -> its arena, rebuilt when the layer's SHiRA adapters (or their values, indices, scales)
# change: a load, an unload, a write into the values. Kept between steps, so a batch's rows can
# come and go without gathering every adapter's arrays again on every layer of every step.
_ARENAS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _stamp(adapter) -> tuple:
    w, idx = adapter.shira_weight, adapter.shira_indices
    return (id(adapter), w.data_ptr(), w._version, idx.data_ptr(), idx._version, adapter.scale)


def _arena(layer, kind: type) -> _Arena:
    adapters = [a for a in layer.adapters.values() if isinstance(a, kind)]
    key = tuple(_stamp(a) for a in adapters)
    arena = _ARENAS.get(layer)
    if arena is not None and arena.key == key:
        return arena
    crows, cols = zip(*(a.pattern().csr_int32() for a in adapters))
    crow_start = np.cumsum([0] + [c.numel() for c in crows[:-1]], dtype=np.int64)
    nnz_start = np.cumsum([0] + [c.numel() for c in cols[:-1]], dtype=np.int64)
    dtype = adapters[0].shira_weight.dtype
    arena = _Arena(key, tuple(adapters), {id(a): i for i, a in enumerate(adapters)}, torch.cat(crows).numpy(),
                   torch.cat(cols).numpy(), torch.cat([a.shira_weight.detach() for a in adapters]).numpy(),
                   np.array([a.scale for a in adapters], dtype=_NUMPY[dtype]), crow_start, nnz_start)
    _ARENAS[layer] = arena
    return arena


def can_group(y: torch.Tensor, x: torch.Tensor, adapters: list) -> bool:
    """Whether :func:`add_grouped` applies: inference on CPU, one float dtype, numba present."""
    if not AVAILABLE or len(adapters) < 2 or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    dtype = y.dtype
    if dtype not in _NUMPY or x.dtype != dtype or y.device.type != "cpu" or not y.is_contiguous():
        return False
    return all(a.shira_weight.dtype == dtype and a.shira_weight.device.type == "cpu" for a in adapters)


def add_grouped(layer, y: torch.Tensor, x: torch.Tensor, groups: list[tuple[object, torch.Tensor]],
                kind: type) -> None:
    """``y[rows] += adapter's delta of x[rows]`` for every (SHiRA adapter of ``layer``, row indices)
    group, in place, one kernel call (groups' rows are disjoint; rows in no group are untouched)."""
    arena = _arena(layer, kind)
    batch = x.shape[0]
    which = np.full(batch, -1, dtype=np.int32)
    for adapter, rows in groups:
        which[rows.numpy()] = arena.position[id(adapter)]
    x3 = x.reshape(batch, -1, x.shape[-1]).contiguous()
    y3 = y.view(batch, -1, y.shape[-1])
    _kernel()(arena.crow, arena.col, arena.vals, arena.scales, arena.crow_start, arena.nnz_start, which,
              x3.numpy(), y3.numpy())
