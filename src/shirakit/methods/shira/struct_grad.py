"""SHiRA's value gradient by dense products, for masks made of whole rows, columns and the diagonal.

The gradient of the K values of a SHiRA layer ``y = x W^T`` (arXiv 2406.13175) is entry
(i_k, j_k) of the (m, n) matrix ``G = g^T x`` (g = dL/dy (T, m), x (T, n)):

    dL/dv_k = s * sum_t g[t, i_k] x[t, j_k]

For a random mask the positions share nothing, and :mod:`cpu_sddmm` computes K dots of length T,
memory-bound: every multiply-add reads a fresh x value. The paper's structured mask (SHiRA-Struct,
§3.1 and App. B; :func:`.masks.struct_mask`) is the full diagonal, every f-th row and column, and a
fill of a few nearly full rows. Those parts are blocks of G that dense products compute at GEMM
speed, reusing every x row they read:

    rows R      G[R, :] = g[:, R]^T x                 (|R| x T) @ (T x n)
    columns C   G[:, C]^T = x[:, C]^T g               (|C| x T) @ (T x m)
    diagonal    G[i, i] = sum_t g[t, i] x[t, i]       elementwise, i in [lo, hi]
    the rest    sum_t g[t, i_k] x[t, j_k]             gathered columns, or cpu_sddmm when many

A position is taken from the first part that covers it (rows, then columns, then the diagonal), so
the overlaps count once, and one gather puts the parts' entries in the adapter's value order.

The structure is found from the positions, not from ``mask_type`` (:func:`find_structure`), so an
adapter loaded from a PEFT file with this layout takes the path too: a row is computed densely when
it holds at least 1/``DENSE_LINE`` of its n positions (a dense row costs n dots at GEMM speed, about
``DENSE_LINE`` times faster per dot than a sampled one), then likewise the columns among the
positions left, then the diagonal when at least 1/``DENSE_LINE`` of it is left. The path is taken
only when these parts cover at least half of K: a random mask (2-3 % dense, no dense line) never
takes it. Results equal the sampled kernels' up to fp32 rounding (both accumulate in fp32; fp64
inputs in fp64); half-precision g and x are upcast to fp32 first, as :mod:`cpu_sddmm` does.
The plan costs one int32 per value (``order``) besides the few line indices, kept with the
pattern (:meth:`.sparse.SparsePattern.structure`).

Measured (``benchmarks/struct_step.py``, 2026-11-28): the 14 value gradients of the 1024 x 2816
Llama benchmark step take about 25 ms this way against 31 ms with the sampled kernel at 1 thread,
22 against 34 ms at 2. In the step, g and x come from memory: the two products take 15 ms (5 ms
with warm caches) and the diagonal 4 ms, so one fused pass over the tokens is what would go faster.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DENSE_LINE = 4  # a row (column) with >= 1/DENSE_LINE of its entries in the mask is computed densely
MIN_COVERED = 0.5  # the dense parts must cover at least this share of K, or the mask is not structured


@dataclass(frozen=True)
class StructPlan:
    """How to compute one pattern's value gradient by parts (:func:`find_structure` makes it).

    ``rows``/``cols``: the dense rows and columns (int64); ``diag``: the first and last diagonal
    index computed elementwise, or None; ``rest_rows``/``rest_cols``: the positions left (int64,
    row-major) and ``rest_crow`` their CSR row offsets (m + 1), made once for the sampled kernel;
    ``order`` (int32, K): where value k sits in the concatenation of the flattened parts
    ``[G[rows, :], G[:, cols]^T, diagonal, rest]``.
    """

    shape: tuple[int, int]
    rows: torch.Tensor
    cols: torch.Tensor
    diag: tuple[int, int] | None
    rest_rows: torch.Tensor
    rest_cols: torch.Tensor
    rest_crow: torch.Tensor
    order: torch.Tensor

    @property
    def rest_by_kernel(self) -> bool:
        """Many positions left: the sampled kernel beats gathering their columns. The crossover was
        near (m + n) / 8 positions (T = 512, 1 thread, 1024-2816 wide layers; 2026-11-28)."""
        return 8 * self.rest_rows.numel() > sum(self.shape)

    def value_grad(self, grad_out: torch.Tensor, x: torch.Tensor, rest_kernel=None) -> torch.Tensor:
        """(K,) ``sum_t grad_out[t, i_k] x[t, j_k]`` in value order; fp32 (fp64 for fp64 inputs).

        ``rest_kernel(g2, x2, rows, cols, crow)``: the sampled kernel for a large rest (default: gathers).
        """
        dtype = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
        g2 = grad_out.detach().reshape(-1, grad_out.shape[-1]).to(dtype)
        x2 = x.detach().reshape(-1, x.shape[-1]).to(dtype)
        parts = []
        if self.rows.numel():
            parts.append((g2.index_select(1, self.rows).T @ x2).reshape(-1))
        if self.cols.numel():
            parts.append((x2.index_select(1, self.cols).T @ g2).reshape(-1))  # G[:, C]^T: 3x faster than G[:, C]
        if self.diag is not None:
            lo, hi = self.diag
            parts.append((g2[:, lo:hi + 1] * x2[:, lo:hi + 1]).sum(0))
        if self.rest_rows.numel():
            if rest_kernel is not None and self.rest_by_kernel:
                parts.append(rest_kernel(g2, x2, self.rest_rows, self.rest_cols, self.rest_crow).to(dtype))
            else:
                parts.append((g2.index_select(1, self.rest_rows) * x2.index_select(1, self.rest_cols)).sum(0))
        return torch.cat(parts).index_select(0, self.order)


def find_structure(rows: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int]) -> StructPlan | None:
    """The :class:`StructPlan` of the K positions ``(rows, cols)`` of an ``shape = (m, n)`` weight
    (any order, no repeats), or None when dense lines and the diagonal cover less than half of K."""
    m, n = shape
    r, c = rows.detach().to("cpu", torch.int64), cols.detach().to("cpu", torch.int64)
    k = r.numel()
    if k == 0:
        return None
    dense_row = torch.bincount(r, minlength=m) * DENSE_LINE >= n
    in_rows = dense_row[r]
    left = ~in_rows
    dense_col = torch.bincount(c[left], minlength=n) * DENSE_LINE >= m
    in_cols = left & dense_col[c]
    left &= ~in_cols
    on_diag = left & (r == c)
    diag = None
    if on_diag.any():
        where = r[on_diag]
        lo, hi = int(where.min()), int(where.max())
        if int(on_diag.sum()) * DENSE_LINE >= hi - lo + 1:
            diag = (lo, hi)
            left &= ~on_diag
    if int(left.sum()) > k * (1 - MIN_COVERED):
        return None
    row_list, col_list = torch.nonzero(dense_row).squeeze(1), torch.nonzero(dense_col).squeeze(1)
    # each position's place in cat([G[rows, :].flatten(), G[:, cols]^T.flatten(), diagonal, rest])
    row_slot = torch.full((m,), -1, dtype=torch.int64)
    row_slot[row_list] = torch.arange(row_list.numel())
    col_slot = torch.full((n,), -1, dtype=torch.int64)
    col_slot[col_list] = torch.arange(col_list.numel())
    order = torch.empty(k, dtype=torch.int64)
    base = 0
    order[in_rows] = base + row_slot[r[in_rows]] * n + c[in_rows]
    base += row_list.numel() * n
    order[in_cols] = base + col_slot[c[in_cols]] * m + r[in_cols]
    base += m * col_list.numel()
    if diag is not None:
        order[on_diag] = base + r[on_diag] - diag[0]
        base += diag[1] - diag[0] + 1
    order[left] = base + torch.arange(int(left.sum()))
    rest_crow = torch.zeros(m + 1, dtype=torch.int64)
    rest_crow[1:] = torch.bincount(r[left], minlength=m).cumsum(0)
    return StructPlan(shape=(m, n), rows=row_list, cols=col_list, diag=diag, rest_rows=r[left], rest_cols=c[left],
                      rest_crow=rest_crow, order=order.int() if base < 2**31 else order)
