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


def csr_indices(rows: torch.Tensor, cols: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 (crow, col) of the CSR pattern at (rows, cols); ``rows`` sorted (row-major order)."""
    rows = rows.long()
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
    return crow, cols.long()


@torch.library.custom_op("shirakit::sampled_value_grad", mutates_args=())
def sampled_value_grad(grad_out: torch.Tensor, x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """dL/dv at the pattern's positions: (g^T x) sampled, as a (K,) fp32 tensor in pattern order.

    A custom op, so torch.compile keeps it whole: dynamo does not trace sparse tensors, and the
    pattern (int64 crow/col, dense) is an ordinary input of the compiled graph.
    """
    g2, x2 = _value_grad_inputs(grad_out, x)
    values = torch.ones(col.numel(), dtype=g2.dtype, device=col.device)
    with warnings.catch_warnings():  # torch calls CSR support "beta" on every construction
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(crow, col, values, (g2.shape[1], x2.shape[1]), check_invariants=False)
    return torch.sparse.sampled_addmm(pattern, g2.T, x2, beta=0.0).values().clone()


@sampled_value_grad.register_fake
def _(grad_out, x, crow, col):
    dtype = grad_out.dtype if grad_out.dtype in (torch.float32, torch.float64) else torch.float32
    return grad_out.new_empty(col.shape[0], dtype=dtype)


def _value_grad_inputs(grad_out: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    if g2.dtype not in (torch.float32, torch.float64):
        g2, x2 = g2.float(), x2.float()
    return g2, x2.to(g2.dtype)


class _ScatteredLinear(torch.autograd.Function):
    """y = linear(x, W) where W already holds the adapter values; grads for x and the values."""

    @staticmethod
    def forward(ctx, x, values, weight, bias, crow, col, scale, fan_in_fan_out):
        ctx.save_for_backward(x, weight, crow, col)
        ctx.scale, ctx.fan_in_fan_out = scale, fan_in_fan_out
        ctx.values_dtype = values.dtype
        w_out_in = weight.T if fan_in_fan_out else weight
        return torch.nn.functional.linear(x, w_out_in, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, crow, col = ctx.saved_tensors
        w_out_in = weight.T if ctx.fan_in_fan_out else weight
        grad_x = grad_w = grad_b = grad_v = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ w_out_in
        if ctx.needs_input_grad[1]:
            grad_v = (sampled_value_grad(grad_out, x, crow, col) * ctx.scale).to(ctx.values_dtype)
        if ctx.needs_input_grad[2]:  # the user unfroze the base weight: give it its dense gradient
            g = grad_out.reshape(-1, grad_out.shape[-1]).T @ x.reshape(-1, x.shape[-1])
            grad_w = g.T if ctx.fan_in_fan_out else g
        if ctx.needs_input_grad[3]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_v, grad_w, grad_b, None, None, None, None


class _ValueGradTap(torch.autograd.Function):
    """Identity on y (returned as a copy) that adds the value gradient; for hooked base layers."""

    @staticmethod
    def forward(ctx, y, x, values, crow, col, scale):
        ctx.save_for_backward(x, crow, col)
        ctx.scale, ctx.values_dtype = scale, values.dtype
        # A custom Function may not return an input as-is (in-place ops on it would be refused).
        return y.clone()

    @staticmethod
    def backward(ctx, grad_out):
        x, crow, col = ctx.saved_tensors
        grad_v = (sampled_value_grad(grad_out, x, crow, col) * ctx.scale).to(ctx.values_dtype)
        return grad_out, None, grad_v, None, None, None


def scattered_linear(x, values, weight, bias, pattern: tuple[torch.Tensor, torch.Tensor], scale: float,
                     fan_in_fan_out: bool):
    """``pattern``: the (crow, col) int64 CSR indices of the values' positions (:func:`csr_indices`)."""
    return _ScatteredLinear.apply(x, values, weight, bias, *pattern, scale, fan_in_fan_out)


def value_grad_tap(y, x, values, pattern: tuple[torch.Tensor, torch.Tensor], scale: float):
    return _ValueGradTap.apply(y, x, values, *pattern, scale)


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
