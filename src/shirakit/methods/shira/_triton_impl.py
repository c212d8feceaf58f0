"""The Triton kernels of :mod:`.triton_kernels` (see there), in a module of their own: it imports
triton at its top, and it is loaded only by :func:`.triton_kernels._kernels`, never at shirakit's
import. Triton's interpreter patches ``tl`` in a kernel's module globals, so they live here."""

import triton
import triton.language as tl


@triton.jit
def sddmm_kernel(g_ptr, x_ptr, rows_ptr, cols_ptr, out_ptr, n_pos, n_tok, stride_g, stride_x,
                 BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr):
    # out[k] = sum_t g[t, rows[k]] * x[t, cols[k]] for BLOCK_K positions, tokens in tiles
    ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < n_pos
    i = tl.load(rows_ptr + ks, mask=k_ok, other=0).to(tl.int64)
    j = tl.load(cols_ptr + ks, mask=k_ok, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for t0 in range(0, n_tok, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        ok = (ts < n_tok)[:, None] & k_ok[None, :]
        t64 = ts.to(tl.int64)[:, None]
        g = tl.load(g_ptr + t64 * stride_g + i[None, :], mask=ok, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + t64 * stride_x + j[None, :], mask=ok, other=0.0).to(tl.float32)
        acc += tl.sum(g * x, axis=0)
    tl.store(out_ptr + ks, acc, mask=k_ok)

@triton.jit
def csr_rows_kernel(x_ptr, y_ptr, crow_ptr, col_ptr, val_ptr, crow_start_ptr, nnz_start_ptr, which_ptr,
                    tokens, n_rows, stride_x, stride_y,
                    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr):
    # y[b*tokens + t, i] += sum over row i of matrix which[b]: v * x[b*tokens + t, col]
    b = tl.program_id(0)
    a = tl.load(which_ptr + b)
    if a >= 0:
        c0 = tl.load(crow_start_ptr + a)
        n0 = tl.load(nnz_start_ptr + a)
        ts = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        t_ok = ts < tokens
        tok = (b * tokens + ts).to(tl.int64)
        rs = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
        r_ok = rs < n_rows
        start = tl.load(crow_ptr + c0 + rs, mask=r_ok, other=0).to(tl.int64)
        stop = tl.load(crow_ptr + c0 + rs + 1, mask=r_ok, other=0).to(tl.int64)
        length = stop - start
        longest = tl.max(length, axis=0)
        acc = tl.zeros((BLOCK_T, BLOCK_M), dtype=tl.float32)
        for step in range(0, longest):
            has = r_ok & (step < length)
            k = n0 + start + step
            col = tl.load(col_ptr + k, mask=has, other=0).to(tl.int64)
            v = tl.load(val_ptr + k, mask=has, other=0.0).to(tl.float32)
            ok = t_ok[:, None] & has[None, :]
            xv = tl.load(x_ptr + tok[:, None] * stride_x + col[None, :], mask=ok, other=0.0).to(tl.float32)
            acc += xv * v[None, :]
        ok = t_ok[:, None] & r_ok[None, :]
        where = y_ptr + tok[:, None] * stride_y + rs[None, :]
        y = tl.load(where, mask=ok, other=0.0).to(tl.float32)
        tl.store(where, (y + acc).to(y_ptr.dtype.element_ty), mask=ok)
