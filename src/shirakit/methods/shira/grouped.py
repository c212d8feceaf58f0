"""Many SHiRA adapters' deltas in one call: a mixed batch's rows, each with its own adapter (numba, CPU).

In a routed step (``shirakit.route``: row b uses adapter a(b)) a layer adds, to each row's base output,

    y[b, i] += s_a * sum_{k in row i of S_a} v_k * x[b, j_k]        a = a(b)

for every adapter's K positions (i_k, j_k) (SHiRA, arXiv 2406.13175). Done one adapter at a time
(a sparse product per group) that is a dozen small torch calls per adapter per layer: with 16
decoding rows over 16 adapters on SmolLM2-135M, ~960 calls per step, and a routed step took ~1.4x
a fused one although the arithmetic is ~0.5% of the base product. Here one kernel call per layer
does every group: the adapters' CSR arrays are laid end to end (``crow`` offsets, ``col``, values)
and each row walks its own adapter's part. The sum runs in CSR order and multiplies each value by
its scale first, as the per-group sparse product does.

Used for inference on CPU (no gradient: training keeps the sparse product, whose values get their
gradient from autograd), fp32/fp64, when numba imports; anything else takes the per-group path.
Compiled on first use; numba caches the machine code like ``cpu_sddmm``.
"""

from __future__ import annotations

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
    def add_rows(crow, col, vals, scales, crow_start, nnz_start, which, x, y):  # pragma: no cover - numba
        rows, tokens, n_out = y.shape
        for b in range(rows):
            a = which[b]
            if a < 0:
                continue
            c0, n0, s = crow_start[a], nnz_start[a], scales[a]
            for t in range(tokens):
                for i in range(n_out):
                    acc = s - s  # a zero of y's dtype (a scale is finite)
                    for k in range(n0 + crow[c0 + i], n0 + crow[c0 + i + 1]):
                        acc += (vals[k] * s) * x[b, t, col[k]]
                    y[b, t, i] += acc

    return add_rows


def can_group(y: torch.Tensor, x: torch.Tensor, adapters: list) -> bool:
    """Whether :func:`add_grouped` applies: inference on CPU, one float dtype, numba present."""
    if not AVAILABLE or len(adapters) < 2 or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    dtype = y.dtype
    if dtype not in _NUMPY or x.dtype != dtype or y.device.type != "cpu" or not y.is_contiguous():
        return False
    return all(a.shira_weight.dtype == dtype and a.shira_weight.device.type == "cpu" for a in adapters)


def add_grouped(y: torch.Tensor, x: torch.Tensor, groups: list[tuple[object, torch.Tensor]]) -> None:
    """``y[rows] += adapter's delta of x[rows]`` for every (SHiRA adapter, row indices) group, in
    place, one kernel call (rows of different groups are disjoint; rows in no group are untouched)."""
    batch = x.shape[0]
    which = np.full(batch, -1, dtype=np.int32)
    crows, cols, vals, crow_start, nnz_start = [], [], [], [], []
    crow_at = nnz_at = 0
    for index, (adapter, rows) in enumerate(groups):
        which[rows.numpy()] = index
        crow, col = adapter.pattern().csr_int32()
        crows.append(crow)
        cols.append(col)
        vals.append(adapter.shira_weight.detach())
        crow_start.append(crow_at)
        nnz_start.append(nnz_at)
        crow_at += crow.numel()
        nnz_at += col.numel()
    scales = np.array([adapter.scale for adapter, _ in groups], dtype=_NUMPY[y.dtype])
    x3 = x.reshape(batch, -1, x.shape[-1]).contiguous()
    y3 = y.view(batch, -1, y.shape[-1])
    _kernel()(torch.cat(crows).numpy(), torch.cat(cols).numpy(), torch.cat(vals).numpy(), scales,
              np.array(crow_start, dtype=np.int64), np.array(nnz_start, dtype=np.int64), which,
              x3.numpy(), y3.numpy())
