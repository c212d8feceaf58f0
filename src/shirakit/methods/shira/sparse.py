"""Sparse kernels for SHiRA training: the value gradient at K positions, never a dense m x n one.

While a SHiRA adapter trains, its values are scattered into the base weight ``W`` (with the
originals kept aside), so the forward is the plain product ``y = x W^T + b``. The backward needs

    dL/dx = g W            (a dense product, as for the frozen base alone)
    dL/dv_k = s * sum_t g[t, i_k] x[t, j_k]   for the K positions (i_k, j_k)

The second is a sampled dense-dense product (SDDMM), K*T multiply-adds. On CPU it runs in
:mod:`shirakit.methods.shira.cpu_sddmm` (C or numba, every core); on CUDA with triton in
:mod:`shirakit.methods.shira.triton_kernels` (fp32/bf16/fp16 read as they are, fp32 sums); on fp64,
or without those, ``torch.sparse.sampled_addmm`` on a fixed CSR pattern computes the same K dots
(cuSPARSE on CUDA). The additive product ``x S^T`` and its ``g S`` take the Triton kernel on CUDA
too, torch's CSR product elsewhere.
Masks made of whole rows, columns and the diagonal (SHiRA-Struct) take dense products on CPU
instead (:mod:`shirakit.methods.shira.struct_grad`, found from the positions once per pattern).
Known limits of torch 2.13's ``sampled_addmm`` on CPU that shaped this file:
- with int32 CSR indices it returns wrong values: its call converts the (int32) columns to int64
  for that call only (a transient K-long copy; the numba kernel reads the int32 ones as they are).
- it rejects bf16/fp16: half-precision inputs are upcast to fp32 for the value gradient (on the
  torch path only; the C, numba and Triton kernels read them as they are).
"""

from __future__ import annotations

import os
import warnings

import torch

from . import cpu_sddmm, struct_grad, triton_kernels


class SparsePattern:
    """K positions (rows, cols) of an (m, n) weight, sorted row-major, in the forms the kernels use.

    ``rows``/``cols`` feed the CPU kernel and, with ``crow`` (int64 CSR row offsets, m + 1 of them),
    the ``sampled_addmm`` path. They are kept as given, both int32 or both int64: SHiRA passes the
    two rows of its int32 ``shira_indices`` buffer, so the pattern holds views, not copies (every
    rank of an FSDP2 run keeps all K positions: 16 bytes per value less than int64 copies).
    ``crow`` is built here, eagerly, so a compiled graph takes it as a plain input (``bincount``
    inside a graph would break it). The CSR tensor and the int32 CSR indices (for the sparse
    product of mixed batches) are built on first use.
    """

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, n_rows: int, n_cols: int) -> None:
        if rows.dtype != cols.dtype or rows.dtype not in (torch.int32, torch.int64) or rows.shape != cols.shape:
            raise TypeError(f"SparsePattern takes rows and cols of one shape, both int32 or both int64; found "
                            f"{rows.dtype} {tuple(rows.shape)} and {cols.dtype} {tuple(cols.shape)}")
        self.rows, self.cols = rows.contiguous(), cols.contiguous()
        self.shape = (n_rows, n_cols)
        self.crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=self.rows.device)
        self.crow[1:] = torch.bincount(self.rows, minlength=n_rows).cumsum(0)
        self._csr: torch.Tensor | None = None
        self._csr_int32: tuple[torch.Tensor, torch.Tensor] | None = None
        self._transposed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._structure: struct_grad.StructPlan | None | bool = False  # False: not looked for yet

    @property
    def device(self) -> torch.device:
        return self.rows.device

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, cols, crow): what :func:`sampled_value_grad` takes."""
        return self.rows, self.cols, self.crow

    def structure(self) -> struct_grad.StructPlan | None:
        """The dense rows, columns and diagonal of a structured mask (:mod:`.struct_grad`), found at
        the first call; None for other masks, on other devices than the CPU and under torch.compile
        (which keeps the sampled kernel). A pattern is made again when its indices change, and this
        with it."""
        if torch.compiler.is_compiling() or self.device.type != "cpu":
            return None
        if self._structure is False:
            self._structure = struct_grad.find_structure(self.rows, self.cols, self.shape)
        return self._structure

    def csr(self) -> torch.Tensor:
        """fp32 CSR with ones at the positions (int64 indices: the int32 ones are wrong in sampled_addmm)."""
        if self._csr is None:
            self._csr = _ones_csr(self.crow, self.cols.long(), self.shape, torch.float32)
        return self._csr

    def csr_int32(self) -> tuple[torch.Tensor, torch.Tensor]:
        """int32 (crow, col): the sparse product takes them as they are (int64 ones it converts per call)."""
        if self._csr_int32 is None:
            self._csr_int32 = (self.crow.int(), self.cols.int())
        return self._csr_int32

    def transposed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """int32 CSR (crow, col) of S^T and the permutation putting S's values in S^T's order:
        the input gradient of the additive path, dx = s g S = (S^T g^T)^T, as a sparse product."""
        if self._transposed is None:
            n_rows, n_cols = self.shape
            order = torch.argsort(self.cols.long() * n_rows + self.rows)  # column-major = row-major of S^T
            crow_t = torch.zeros(n_cols + 1, dtype=torch.int32, device=self.device)
            crow_t[1:] = torch.bincount(self.cols, minlength=n_cols).cumsum(0)
            self._transposed = (crow_t, self.rows[order].int(), order)
        return self._transposed

    def product(self, values: torch.Tensor, x2: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``x2 S^T`` (or ``x2 S`` with ``transpose``) for (T, n) rows ``x2``, S holding ``values``.
        Contiguous in and out: callers index_add_ the result, ~15x slower from a transposed source."""
        if transpose:
            crow, col, order = self.transposed()
            values, shape = values[order], self.shape[::-1]
        else:
            (crow, col), shape = self.csr_int32(), self.shape
        if triton_kernels.usable(values, x2):  # CUDA: one launch, fp32 sums, in the values' dtype
            x2 = x2.to(values.dtype)
            return triton_kernels.sparse_product(values, x2, crow, col, shape[0])
        out_dtype = values.dtype
        if values.dtype in (torch.bfloat16, torch.float16):  # MKL's CSR product has no half kernel:
            values, x2 = values.float(), x2.float()  # fp32 operands (exact) and sums, one rounding at the end
        # autocast would cast the sparse operand to its dtype, which the CSR product does not take
        with warnings.catch_warnings(), torch.autocast(self.device.type, enabled=False):
            warnings.simplefilter("ignore", UserWarning)  # torch calls CSR support "beta" on every construction
            sparse = torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)
            return (sparse @ x2.T.contiguous()).T.contiguous().to(out_dtype)


def _ones_csr(crow: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    values = torch.ones(cols.numel(), dtype=dtype, device=cols.device)
    with warnings.catch_warnings():  # torch calls CSR support "beta" on every construction
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)


@torch.library.custom_op("shirakit::sampled_value_grad", mutates_args=())
def sampled_value_grad(grad_out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                       crow: torch.Tensor) -> torch.Tensor:
    """dL/dv at the pattern's positions: (g^T x) sampled, as a (K,) tensor in pattern order (fp32;
    fp64 for fp64 inputs off the numba kernel). ``rows, cols, crow``: :meth:`SparsePattern.tensors`.

    A custom op, so torch.compile keeps it whole: dynamo traces neither sparse tensors nor numba,
    and the pattern's dense index tensors are ordinary inputs of the compiled graph.
    """
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    if triton_kernels.usable(g2, x2):  # CUDA (or forced, under the interpreter): bf16/fp16 read as they are
        return triton_kernels.value_grad(g2, x2, rows, cols)
    if cpu_sddmm.usable(g2, x2):
        return cpu_sddmm.value_grad(g2, x2, rows, cols)
    if g2.dtype not in (torch.float32, torch.float64):
        g2, x2 = g2.float(), x2.float()
    csr = _ones_csr(crow, cols.long(), (g2.shape[1], x2.shape[1]), g2.dtype)  # int32 would give wrong values
    return torch.sparse.sampled_addmm(csr, g2.T, x2.to(g2.dtype), beta=0.0).values().clone()


@sampled_value_grad.register_fake
def _(grad_out, x, rows, cols, crow):
    dtype = torch.float64 if grad_out.dtype == torch.float64 else torch.float32  # numba: no fp64
    return grad_out.new_empty(cols.shape[0], dtype=dtype)


def value_grad(grad_out: torch.Tensor, x: torch.Tensor, pattern: tuple, structure=None) -> torch.Tensor:
    """dL/dv / s at the pattern's positions: by dense products over a structured mask's lines
    (``structure``, :meth:`SparsePattern.structure`) on CPU unless ``SHIRAKIT_STRUCT_GRAD=0``, else
    by the sampled kernel. ``pattern``: :meth:`SparsePattern.tensors`."""
    if structure is not None and grad_out.device.type == "cpu" and os.environ.get("SHIRAKIT_STRUCT_GRAD") != "0":
        return structure.value_grad(grad_out, x, rest_kernel=sampled_value_grad)
    if not torch.compiler.is_compiling() and os.environ.get("SHIRAKIT_TRITON") != "1" and cpu_sddmm.usable(grad_out, x):
        # eager on CPU: the kernel itself, as the custom op would call it, without the op's dispatch
        # (about 0.1 ms a call, 14 calls a step of the benchmark models)
        return cpu_sddmm.value_grad(grad_out, x, pattern[0], pattern[1])
    return sampled_value_grad(grad_out, x, *pattern)


class _ScatteredLinear(torch.autograd.Function):
    """y = linear(x, W) where W already holds the adapter values; grads for x and the values.

    ``refill(weight) -> (weight, undo)``, when given, writes the values into the weight again before
    the backward's ``dx = g W'`` reads it, and ``undo()`` (or None) runs right after that product:
    FSDP2 and ZeRO-3 hand the backward a copy of the weight gathered afresh from the (clean) shards,
    or the forward's copy, which shirakit cleaned after its own product (see
    :meth:`ShiraAdapter.gathered_forward`); either way the values must be written again, and taken out again.
    ``transient``: the weight is a copy made for this product only (a quantized weight dequantized
    by :func:`shirakit.core.quantized_weights.dequantizer`); it is not kept for the backward, which gets a
    fresh one from ``refill(None)``, so no dense copy lives between forward and backward.
    """

    @staticmethod
    def forward(ctx, x, values, weight, bias, rows, cols, crow, scale, fan_in_fan_out, refill=None, transient=False,
                structure=None):
        ctx.save_for_backward(x, None if transient else weight, rows, cols, crow)
        ctx.scale, ctx.fan_in_fan_out, ctx.structure = scale, fan_in_fan_out, structure
        ctx.values_dtype, ctx.refill = values.dtype, refill
        ctx.x_dtype, ctx.weight_dtype = x.dtype, weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        w_out_in = weight.T if fan_in_fan_out else weight
        y = torch.nn.functional.linear(x, w_out_in, bias)
        # The dtype the product ran in: the inputs' own, or autocast's (any device, any dtype).
        # The backward runs outside autocast, so it casts its operands to this one itself, as
        # autocast's linear does; the weight is saved as it is (no second, cast copy kept).
        ctx.compute_dtype = y.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, *pattern = ctx.saved_tensors
        undo = None
        if ctx.refill is not None and ctx.needs_input_grad[0]:  # only dx reads the weight
            weight, undo = ctx.refill(weight)
        grad_x = grad_w = grad_b = grad_v = None
        dtype = ctx.compute_dtype
        grad_out = grad_out.to(dtype)
        if ctx.needs_input_grad[0]:
            try:
                w = weight.T if ctx.fan_in_fan_out else weight
                grad_x = (grad_out @ w.to(dtype)).to(ctx.x_dtype)
            finally:
                if undo is not None:
                    undo()
        if ctx.needs_input_grad[1]:
            grad_v = (value_grad(grad_out, x, pattern, ctx.structure) * ctx.scale).to(ctx.values_dtype)
        if ctx.needs_input_grad[2]:  # the user unfroze the base weight: give it its dense gradient
            g = grad_out.reshape(-1, grad_out.shape[-1]).T @ x.reshape(-1, x.shape[-1]).to(dtype)
            grad_w = (g.T if ctx.fan_in_fan_out else g).to(ctx.weight_dtype)
        if ctx.needs_input_grad[3]:
            sum_dtype = torch.promote_types(dtype, torch.float32)  # half-precision sums in fp32
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0, dtype=sum_dtype).to(ctx.bias_dtype)
        return grad_x, grad_v, grad_w, grad_b, None, None, None, None, None, None, None, None


class _ValueGradTap(torch.autograd.Function):
    """Identity on y (returned as a copy) that adds the value gradient; for hooked base layers."""

    @staticmethod
    def forward(ctx, y, x, values, rows, cols, crow, scale, structure=None):
        ctx.save_for_backward(x, rows, cols, crow)
        ctx.scale, ctx.values_dtype, ctx.structure = scale, values.dtype, structure
        # A custom Function may not return an input as-is (in-place ops on it would be refused).
        return y.clone()

    @staticmethod
    def backward(ctx, grad_out):
        x, *pattern = ctx.saved_tensors
        grad_v = (value_grad(grad_out, x, pattern, ctx.structure) * ctx.scale).to(ctx.values_dtype)
        return grad_out, None, grad_v, None, None, None, None, None


def scattered_linear(x, values, weight, bias, pattern: SparsePattern, scale: float, fan_in_fan_out: bool,
                     refill=None, transient: bool = False):
    return _ScatteredLinear.apply(x, values, weight, bias, *pattern.tensors(), scale, fan_in_fan_out, refill,
                                  transient, pattern.structure())


class _SparseDelta(torch.autograd.Function):
    """delta_y = s x S^T; backward dx = s g S (a sparse product with S^T), dv = s SDDMM(g, x).

    torch's own backward of a CSR product forms the dense (m, n) gradient and masks it, a full
    weight-gradient product: this one does K*T work, as the in-weight path does.
    """

    @staticmethod
    def forward(ctx, x, values, pattern, scale):
        x2 = x.reshape(-1, x.shape[-1]).to(values.dtype)
        ctx.save_for_backward(x2, values)
        ctx.pattern, ctx.scale, ctx.x_dtype, ctx.x_shape = pattern, scale, x.dtype, x.shape
        return pattern.product(values * scale, x2).reshape(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_out):
        x2, values = ctx.saved_tensors
        pattern, scale = ctx.pattern, ctx.scale
        g2 = grad_out.reshape(-1, grad_out.shape[-1]).to(values.dtype)
        grad_x = grad_v = None
        if ctx.needs_input_grad[0]:
            grad_x = pattern.product(values * scale, g2, transpose=True).to(ctx.x_dtype).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_v = (value_grad(g2, x2, pattern.tensors(), pattern.structure()) * scale).to(values.dtype)
        return grad_x, grad_v, None, None


def sparse_delta(x: torch.Tensor, values: torch.Tensor, pattern: SparsePattern, scale: float) -> torch.Tensor:
    """``s x S^T`` with S's ``values`` at ``pattern``'s positions, differentiable in x and the values
    without a dense (m, n) tensor: the additive path, for weights that cannot carry the values
    (quantized, tied, several SHiRA adapters on one FSDP-gathered copy) and mixed batches.

    Computed in the values' dtype (fp32 sums for half precision); under autocast the result is
    handed on in autocast's dtype, the dtype of the base product it is added to."""
    if torch.is_grad_enabled() and (x.requires_grad or values.requires_grad):
        delta = _SparseDelta.apply(x, values, pattern, scale)
    else:
        x2 = x.reshape(-1, x.shape[-1]).to(values.dtype)
        delta = pattern.product(values * scale, x2).reshape(*x.shape[:-1], -1)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        delta = delta.to(torch.get_autocast_dtype(device_type))
    return delta


def value_grad_tap(y, x, values, pattern: SparsePattern, scale: float):
    return _ValueGradTap.apply(y, x, values, *pattern.tensors(), scale, pattern.structure())


def gathered_delta(x: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, n_out: int) -> torch.Tensor:
    """delta_y[..., i_k] += v_k * x[..., j_k] for the K positions ``indices`` = (i, j): a gather and
    an ``index_add`` in T*K work, with no sparse tensor, so torch.compile traces it (and autograd
    gives the values their gradient). Positions may repeat: zero-valued padding adds nothing."""
    x2 = x.reshape(-1, x.shape[-1]).to(values.dtype)
    contributions = x2.index_select(1, indices[1]) * values
    delta = x2.new_zeros(x2.shape[0], n_out).index_add_(1, indices[0], contributions)
    return delta.reshape(*x.shape[:-1], n_out)


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
