"""Sparse kernels for SHiRA training: the value gradient at K positions, never a dense m x n one.

While a SHiRA adapter trains, its values are scattered into the base weight ``W`` (with the
originals kept aside), so the forward is the plain product ``y = x W^T + b``. The backward needs

    dL/dx = g W            (a dense product, as for the frozen base alone)
    dL/dv_k = s * sum_t g[t, i_k] x[t, j_k]   for the K positions (i_k, j_k)

The second is a sampled dense-dense product (SDDMM): ``torch.sparse.sampled_addmm`` on a fixed
CSR pattern computes exactly these K dots. Measured here (2816x1024 layer, 1024 tokens, fp32,
2 threads): 16-20 ms, about the cost of one dense product, against ~800 ms for a gather-based
SDDMM. Known limits of torch 2.13 on CPU that shaped this file:
- ``sampled_addmm`` with int32 CSR indices returns wrong values on CPU: the pattern uses int64.
- it rejects bf16/fp16 on CPU: half-precision inputs are upcast to fp32 for the value gradient.
"""

from __future__ import annotations

import warnings

import torch


def csr_pattern(rows: torch.Tensor, cols: torch.Tensor, n_rows: int, n_cols: int) -> torch.Tensor:
    """A CSR tensor with ones at (rows, cols); ``rows`` must be sorted (row-major order)."""
    rows, cols = rows.long(), cols.long()
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
    values = torch.ones(rows.numel(), dtype=torch.float32, device=rows.device)
    with warnings.catch_warnings():  # torch calls CSR support "beta" on every construction
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols, values, (n_rows, n_cols), check_invariants=False)


def sampled_value_grad(grad_out: torch.Tensor, x: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """dL/dv at the pattern's positions: (g^T x) sampled, as a (K,) fp32 tensor in pattern order."""
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    if g2.dtype not in (torch.float32, torch.float64):
        g2, x2 = g2.float(), x2.float()
    if pattern.dtype != g2.dtype:
        pattern = pattern.to(g2.dtype)
    out = torch.sparse.sampled_addmm(pattern, g2.T, x2, beta=0.0)
    return out.values()


class _ScatteredLinear(torch.autograd.Function):
    """y = linear(x, W) where W already holds the adapter values; grads for x and the values.

    ``refill(weight)``, when given, writes the values into ``weight`` again before the backward
    uses it: FSDP2 frees the gathered weight after the forward and gathers it afresh from the
    (clean) shards for the backward, so the values scattered into the forward's copy are gone.
    """

    @staticmethod
    def forward(ctx, x, values, weight, bias, pattern, scale, fan_in_fan_out, refill=None):
        ctx.save_for_backward(x, weight)
        ctx.pattern, ctx.scale, ctx.fan_in_fan_out = pattern, scale, fan_in_fan_out
        ctx.values_dtype, ctx.refill = values.dtype, refill
        w_out_in = weight.T if fan_in_fan_out else weight
        return torch.nn.functional.linear(x, w_out_in, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        if ctx.refill is not None:
            ctx.refill(weight)
        w_out_in = weight.T if ctx.fan_in_fan_out else weight
        grad_x = grad_w = grad_b = grad_v = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ w_out_in
        if ctx.needs_input_grad[1]:
            grad_v = sampled_value_grad(grad_out, x, ctx.pattern).mul_(ctx.scale).to(ctx.values_dtype)
        if ctx.needs_input_grad[2]:  # the user unfroze the base weight: give it its dense gradient
            g = grad_out.reshape(-1, grad_out.shape[-1]).T @ x.reshape(-1, x.shape[-1])
            grad_w = g.T if ctx.fan_in_fan_out else g
        if ctx.needs_input_grad[3]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_v, grad_w, grad_b, None, None, None, None


class _ValueGradTap(torch.autograd.Function):
    """Identity on y (returned as a copy) that adds the value gradient; for hooked base layers."""

    @staticmethod
    def forward(ctx, y, x, values, pattern, scale):
        ctx.save_for_backward(x)
        ctx.pattern, ctx.scale, ctx.values_dtype = pattern, scale, values.dtype
        # A custom Function may not return an input as-is (in-place ops on it would be refused).
        return y.clone()

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        grad_v = sampled_value_grad(grad_out, x, ctx.pattern).mul_(ctx.scale).to(ctx.values_dtype)
        return grad_out, None, grad_v, None, None


def scattered_linear(x, values, weight, bias, pattern, scale: float, fan_in_fan_out: bool, refill=None):
    return _ScatteredLinear.apply(x, values, weight, bias, pattern, scale, fan_in_fan_out, refill)


class SparseLayout:
    """The index arrays a sparse delta ``S`` (out x in, K values at fixed sorted positions) needs,
    built once: int32 CSR of S for the product, int32 CSR of S^T (with the permutation that puts
    S's values in S^T's order) for the input gradient, and the int64 CSR pattern for the SDDMM.
    """

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, n_rows: int, n_cols: int) -> None:
        rows, cols = rows.long(), cols.long()
        self.shape = (n_rows, n_cols)
        self.pattern = csr_pattern(rows, cols, n_rows, n_cols)
        self.crow, self.col = self.pattern.crow_indices().int(), self.pattern.col_indices().int()
        order = torch.argsort(cols * n_rows + rows)  # column-major order = row-major order of S^T
        self.crow_t = torch.zeros(n_cols + 1, dtype=torch.int32, device=rows.device)
        self.crow_t[1:] = torch.bincount(cols, minlength=n_cols).cumsum(0)
        self.col_t, self.perm_t = rows[order].int(), order

    def csr(self, values: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(self.crow, self.col, values, self.shape, check_invariants=False)

    def csr_t(self, values: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(self.crow_t, self.col_t, values[self.perm_t],
                                           self.shape[::-1], check_invariants=False)


def _csr_product(csr: torch.Tensor, rows_major: torch.Tensor) -> torch.Tensor:
    """(T, a) @ csr^T for csr (b, a): contiguous in and out (callers index_add_ the result, ~15x
    slower from a transposed source)."""
    return (csr @ rows_major.T.contiguous()).T.contiguous()


class _SparseDelta(torch.autograd.Function):
    """delta_y = s * x S^T; backward dx = s * g S (a product with S^T's CSR), dv = s * SDDMM(g, x)."""

    @staticmethod
    def forward(ctx, x, values, layout, scale):
        x2 = x.reshape(-1, x.shape[-1]).to(values.dtype)
        ctx.save_for_backward(x2, values)
        ctx.layout, ctx.scale, ctx.x_dtype, ctx.x_shape = layout, scale, x.dtype, x.shape
        y = _csr_product(layout.csr(values * scale), x2)
        return y.reshape(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_out):
        x2, values = ctx.saved_tensors
        layout, scale = ctx.layout, ctx.scale
        g2 = grad_out.reshape(-1, grad_out.shape[-1]).to(values.dtype)
        grad_x = grad_v = None
        if ctx.needs_input_grad[0]:
            grad_x = _csr_product(layout.csr_t(values * scale), g2).to(ctx.x_dtype).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_v = sampled_value_grad(g2, x2, layout.pattern).mul_(scale).to(values.dtype)
        return grad_x, grad_v, None, None


def sparse_delta(x: torch.Tensor, values: torch.Tensor, layout: SparseLayout, scale: float) -> torch.Tensor:
    """``s * x S^T`` with S's values ``values`` at ``layout``'s positions (the additive sparse path:
    no weight is written, so it works on quantized, tied and sharded weights); differentiable in
    x and the values, never forming a dense m x n tensor."""
    return _SparseDelta.apply(x, values, layout, scale)


def value_grad_tap(y, x, values, pattern, scale: float):
    return _ValueGradTap.apply(y, x, values, pattern, scale)


_SAME_WIDTH_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def scatter_values(flat: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    """``flat[index] = values`` (a SHiRA merge, unmerge or switch).

    On a CPU running torch single-threaded, numpy's fancy assignment beats ``index_copy_`` by
    ~1.5x for these cache-missing writes (benchmarks/switch.py: 29 vs 44 ms for 2 x 1M values
    into 4 x 4096^2); with more threads ``index_copy_`` parallelizes and wins. The numpy write is
    a bit copy through a same-width integer view (so bf16 works too); a zero-length in-place op
    then bumps torch's version counter exactly as ``index_copy_`` would.
    """
    if flat.device.type != "cpu" or torch.get_num_threads() > 1 or flat.requires_grad:
        flat.index_copy_(0, index, values)
        return
    bits = _SAME_WIDTH_INT[flat.element_size()]
    flat.view(bits).numpy()[index.numpy()] = values.to(flat.dtype).view(bits).numpy()
    flat[:0].zero_()
