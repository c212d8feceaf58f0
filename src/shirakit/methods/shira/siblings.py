"""SHiRA on a conv or an embedding: the products and value gradients of the layer's siblings.

A conv's kernel ``(out, in/groups, *k)`` flattened row-major is the matrix ``(out, in/groups*prod(k))``
the K positions index (:class:`~shirakit.core.adapter.LayerGeometry`), and it is the kernel's own
storage order: masks, scatters, exact unmerge and switching are the linear code unchanged. What
differs is the product and its value gradient:

- conv, in-weight (training): ``y = conv(x, W')`` with the values scattered in; backward
  ``dx = conv_input_grad(g, W')`` and ``dv_k = s * dW[p_k]``, the kernel gradient read at the K
  storage positions ``p_k``. The kernel gradient is computed by the conv's own weight-gradient
  kernel (``aten.convolution_backward``, oneDNN / cuDNN) in the same call as ``dx``, then gathered:
  a transient tensor of the kernel's size (0.9M values for a 320-channel 3x3 conv), freed at once.
  The sampled alternative (unfold the input, SDDMM at the K positions) reads ``prod(k)`` times the
  input per sample (11.8M values for a 64x64 latent of 320 channels, 13x the kernel) and its cost
  grows with K: ``benchmarks/conv_value_grad.py`` (320 -> 320 3x3, 64x64, 1 thread, loaded 2-core
  machine, 2026-12-03) timed it at 0.92x the kernel gradient's time at r = 16 and 1.12x at r = 32.
  No clear win in time, a large one in memory for the kernel gradient: that is the path kept.
- embedding, in-weight: ``y = W'[ids]``; backward ``dv_k = s * sum_{t: ids_t = i_k} g[t, j_k]``:
  the gradient rows are summed per distinct id (``U x dim``), then read at the K positions whose row
  is one of those ids (``searchsorted``): ``O(T dim + K log U)``, never a ``(rows, dim)`` gradient.
- the additive forms (mixed batches, a tied or quantized table, FSDP): conv by a conv with the
  dense delta kernel (a kernel-sized tensor per call); embedding by gathering each id's values from
  the CSR row offsets (``O(T + nnz of the looked-up rows)``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...core.adapter import ConvSpec, EmbeddingSpec

_CONV = {1: F.conv1d, 2: F.conv2d}


def conv_prepare(x: torch.Tensor, spec: ConvSpec) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(the input padded as the layer pads it when its padding is not plain zeros of ints, the
    integer padding left for the conv itself): ``aten.convolution_backward`` takes int padding only."""
    dims = spec.dims
    if spec.padding_mode != "zeros":  # as nn.Conv*d: pad by the mode, then convolve unpadded
        pads = spec.padding
        if isinstance(pads, str):
            pads = _same_padding(spec) if pads == "same" else (0,) * (2 * dims)
            return F.pad(x, pads, mode=spec.padding_mode), (0,) * dims
        twice = tuple(p for p in reversed(pads) for _ in range(2))
        return F.pad(x, twice, mode=spec.padding_mode), (0,) * dims
    if spec.padding == "valid":
        return x, (0,) * dims
    if spec.padding == "same":
        pads = _same_padding(spec)
        if all(pads[2 * i] == pads[2 * i + 1] for i in range(dims)):
            return x, tuple(pads[2 * i] for i in reversed(range(dims)))
        return F.pad(x, pads), (0,) * dims
    return x, tuple(spec.padding)


def _same_padding(spec: ConvSpec) -> tuple[int, ...]:
    """F.pad's (last dim first) left/right pads of padding="same": total d(k-1), the odd one on the right."""
    pads = []
    for k, d in zip(reversed(spec.kernel_size), reversed(spec.dilation)):
        total = d * (k - 1)
        pads += [total // 2, total - total // 2]
    return tuple(pads)


def conv_product(x: torch.Tensor, weight: torch.Tensor, bias, spec: ConvSpec, padding) -> torch.Tensor:
    return _CONV[spec.dims](x, weight, bias, spec.stride, padding, spec.dilation, spec.groups)


def _conv_backward(grad_out, x, weight, spec: ConvSpec, padding, mask: list[bool], bias_size=None):
    return torch.ops.aten.convolution_backward(
        grad_out, x, weight, bias_size, list(spec.stride), list(padding), list(spec.dilation), False,
        [0] * spec.dims, spec.groups, mask)


class _ScatteredConv(torch.autograd.Function):
    """y = conv(x, W') where W' already holds the values; grads for x, the values (and W, b if trainable)."""

    @staticmethod
    def forward(ctx, x, values, weight, bias, positions, spec, padding, scale):
        ctx.save_for_backward(x, weight, positions)
        ctx.spec, ctx.padding, ctx.scale, ctx.values_dtype = spec, padding, scale, values.dtype
        ctx.has_bias = bias is not None
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        y = conv_product(x, weight, bias, spec, padding)
        ctx.compute_dtype = y.dtype  # autocast's (any device) or the inputs': the backward runs outside autocast
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, positions = ctx.saved_tensors
        need_x, need_v, need_w, need_b = ctx.needs_input_grad[:4]
        bias_size = [weight.shape[0]] if ctx.has_bias else None
        dtype = ctx.compute_dtype
        gx, gw, gb = _conv_backward(grad_out.to(dtype), x.to(dtype), weight.to(dtype), ctx.spec, ctx.padding,
                                    [need_x, need_v or need_w, need_b], bias_size)
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        grad_v = None
        if need_v:
            grad_v = (gw.reshape(-1).index_select(0, positions).float() * ctx.scale).to(ctx.values_dtype)
        gx = gx.to(x_dtype) if need_x else None
        return (gx, grad_v, gw.to(w_dtype) if need_w else None, gb.to(b_dtype) if need_b else None,
                None, None, None, None)


class _ConvValueTap(torch.autograd.Function):
    """Identity on y (a copy) computed by a hooked conv on W'; backward adds only dv."""

    @staticmethod
    def forward(ctx, y, x, values, weight_shape, positions, spec, padding, scale):
        ctx.save_for_backward(x, positions)
        ctx.spec, ctx.padding, ctx.scale, ctx.values_dtype = spec, padding, scale, values.dtype
        ctx.weight_shape = weight_shape
        return y.clone()

    @staticmethod
    def backward(ctx, grad_out):
        x, positions = ctx.saved_tensors
        spec = ctx.spec
        weight_grad = torch.nn.grad.conv1d_weight if spec.dims == 1 else torch.nn.grad.conv2d_weight
        gw = weight_grad(x, ctx.weight_shape, grad_out, spec.stride, ctx.padding, spec.dilation, spec.groups)
        grad_v = (gw.reshape(-1).index_select(0, positions).float() * ctx.scale).to(ctx.values_dtype)
        return grad_out, None, grad_v, None, None, None, None, None


def scattered_conv(x, values, weight, bias, positions, spec: ConvSpec, scale: float) -> torch.Tensor:
    """The conv layer's product on its weight holding the values, with their gradient attached."""
    x, padding = conv_prepare(x, spec)
    return _ScatteredConv.apply(x, values, weight, bias, positions, spec, padding, scale)


def conv_value_tap(y, x, values, weight_shape, positions, spec: ConvSpec, scale: float) -> torch.Tensor:
    x, padding = conv_prepare(x.detach(), spec)
    return _ConvValueTap.apply(y, x, values, weight_shape, positions, spec, padding, scale)


def conv_delta(x, values, positions, weight_shape, spec: ConvSpec, scale: float) -> torch.Tensor:
    """delta_y = conv(x, s S) with S the dense delta kernel (the additive path; differentiable)."""
    kernel = values.new_zeros(torch.Size(weight_shape).numel()).index_put((positions,), values * scale)
    x, padding = conv_prepare(x.to(values.dtype), spec)
    return conv_product(x, kernel.view(weight_shape), None, spec, padding)


# ---- embedding --------------------------------------------------------------------------------
def embedding_value_grad(grad_out, ids, rows, cols, spec: EmbeddingSpec) -> torch.Tensor:
    """dL/dv_k / s = sum over tokens t with ids_t = i_k of g[t, j_k] (0 where no token looks row i_k
    up, and on the padding row, whose gradient the lookup blocks); fp32."""
    ids = ids.reshape(-1)
    g2 = grad_out.reshape(ids.numel(), -1).float()
    uniq, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    summed = g2.new_zeros(uniq.numel(), g2.shape[1]).index_add_(0, inverse, g2)
    if spec.scale_grad_by_freq:
        summed /= counts.unsqueeze(1).to(summed.dtype)
    if spec.padding_idx is not None:  # nn.Embedding keeps it >= 0
        summed[uniq == spec.padding_idx] = 0
    rows = rows.long()
    where = torch.searchsorted(uniq, rows).clamp_max(uniq.numel() - 1)
    hit = uniq[where] == rows
    return summed[where, cols.long()] * hit


class _ScatteredEmbedding(torch.autograd.Function):
    """y = W'[ids] where W' already holds the values; grad for the values (and W if trainable)."""

    @staticmethod
    def forward(ctx, ids, values, weight, rows, cols, spec, scale):
        ctx.save_for_backward(ids, rows, cols)
        ctx.spec, ctx.scale, ctx.values_dtype, ctx.n_rows = spec, scale, values.dtype, weight.shape[0]
        return F.embedding(ids, weight, spec.padding_idx, None, 2.0, spec.scale_grad_by_freq, spec.sparse)

    @staticmethod
    def backward(ctx, grad_out):
        ids, rows, cols = ctx.saved_tensors
        spec = ctx.spec
        grad_v = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_v = (embedding_value_grad(grad_out, ids, rows, cols, spec) * ctx.scale).to(ctx.values_dtype)
        if ctx.needs_input_grad[2]:
            grad_w = torch.ops.aten.embedding_backward(grad_out, ids, ctx.n_rows, -1 if spec.padding_idx is None
                                                       else spec.padding_idx, spec.scale_grad_by_freq, spec.sparse)
        return None, grad_v, grad_w, None, None, None, None


class _EmbeddingValueTap(torch.autograd.Function):
    """Identity on y (a copy) looked up by a hooked embedding on W'; backward adds only dv."""

    @staticmethod
    def forward(ctx, y, ids, values, rows, cols, spec, scale):
        ctx.save_for_backward(ids, rows, cols)
        ctx.spec, ctx.scale, ctx.values_dtype = spec, scale, values.dtype
        return y.clone()

    @staticmethod
    def backward(ctx, grad_out):
        ids, rows, cols = ctx.saved_tensors
        grad_v = (embedding_value_grad(grad_out, ids, rows, cols, ctx.spec) * ctx.scale).to(ctx.values_dtype)
        return grad_out, None, grad_v, None, None, None, None


def scattered_embedding(ids, values, weight, rows, cols, spec: EmbeddingSpec, scale: float) -> torch.Tensor:
    return _ScatteredEmbedding.apply(ids, values, weight, rows, cols, spec, scale)


def embedding_value_tap(y, ids, values, rows, cols, spec: EmbeddingSpec, scale: float) -> torch.Tensor:
    return _EmbeddingValueTap.apply(y, ids, values, rows, cols, spec, scale)


def embedding_delta(ids, values, cols, crow, dim: int, spec: EmbeddingSpec, scale: float) -> torch.Tensor:
    """delta_y[t] = s * S[ids_t] (the additive path): each id's values found from the CSR row offsets
    ``crow`` (positions sorted row-major), placed at their columns; differentiable in the values,
    with the lookup's gradient rules: none on the padding row, divided by the id's count in the batch
    under ``scale_grad_by_freq``."""
    flat = ids.reshape(-1)
    start, stop = crow[flat], crow[flat + 1]
    count = stop - start
    token = torch.repeat_interleave(torch.arange(flat.numel(), device=ids.device), count)
    first = torch.repeat_interleave(start - (count.cumsum(0) - count), count)
    pos = first + torch.arange(token.numel(), device=ids.device)
    picked = values.index_select(0, pos) * scale
    if spec.scale_grad_by_freq:  # the lookup's gradient is divided by how often each id occurs in the batch
        _, inverse, counts = torch.unique(flat, return_inverse=True, return_counts=True)
        per_value = counts.index_select(0, inverse).index_select(0, token).to(picked.dtype)
        picked = picked.detach() + (picked - picked.detach()) / per_value  # same value, scaled gradient
    if spec.padding_idx is not None:
        on_pad = (flat == spec.padding_idx).index_select(0, token)
        picked = torch.where(on_pad, picked.detach(), picked)
    delta = values.new_zeros(flat.numel(), dim).index_put((token, cols.index_select(0, pos).long()), picked)
    return delta.reshape(*ids.shape, dim)
