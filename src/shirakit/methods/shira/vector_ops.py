"""Short vectors held in registers inside numba kernels (SHiRA's grouped kernel, :mod:`.grouped`).

numba has no SIMD type, and LLVM does not vectorize a loop that carries several scalar
accumulators (a sparse row's dot product with a few tokens at once), so the kernel spells the
vector out: ``Vec(dtype, width)`` is LLVM's ``<width x dtype>``, a value numba keeps in a
register, and three intrinsics work on it:

- ``zeros4(array)`` / ``zeros8(array)``: a vector of +0.0 of the array's dtype;
- ``step(acc, xt, col, vals, k)``: ``acc + vals[k] * xt[col[k]*W : col[k]*W + W]``, one
  broadcast multiply and one add, each rounded on its own (no fused multiply-add: every lane
  does what a scalar ``acc += v * x`` does, so results are bit-identical to it);
- ``lane(vec, t)``: element ``t``.

``step`` reads its three arrays with raw loads: no bounds check and no negative-index wrap (the
caller guarantees ``0 <= k < len(col)`` and the column indices; numba's own indexing adds a
sign test per load, which in a 2-instruction-per-value loop costs a third of the time).
Importing this module needs numba.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic, models, register_model


class Vec(types.Type):
    """``<width x dtype>`` in LLVM: a short vector numba passes by value (a register)."""

    def __init__(self, dtype: types.Type, width: int) -> None:
        self.dtype, self.width = dtype, width
        super().__init__(name=f"Vec({dtype}, {width})")


@register_model(Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type: Vec) -> None:
        scalar = dmm.lookup(fe_type.dtype).get_value_type()
        super().__init__(dmm, fe_type, ir.VectorType(scalar, fe_type.width))


def _zeros_of(vec_width: int):
    @intrinsic
    def zeros(typingctx, array):
        if not isinstance(array, types.Array):
            return None
        vec = Vec(array.dtype, vec_width)

        def codegen(context, builder, sig, args):
            return ir.Constant(context.get_value_type(vec), None)  # zeroinitializer: +0.0

        return vec(array), codegen

    return zeros


zeros4 = _zeros_of(4)
zeros8 = _zeros_of(8)


def _element(context, builder, array_type, array, index):
    """Pointer to ``array[index]`` (a C-contiguous 1-d array), no checks."""
    data = context.make_array(array_type)(context, builder, array).data
    return builder.gep(data, [index])


def _splat(builder, vec_type: ir.VectorType, scalar):
    one = builder.insert_element(ir.Constant(vec_type, ir.Undefined), scalar, ir.Constant(ir.IntType(32), 0))
    mask = ir.Constant(ir.VectorType(ir.IntType(32), vec_type.count), [0] * vec_type.count)
    return builder.shuffle_vector(one, ir.Constant(vec_type, ir.Undefined), mask)


@intrinsic
def step(typingctx, acc, xt, col, vals, k):
    """``acc + vals[k] * xt[col[k] * W : col[k] * W + W]`` (multiply, then add; no FMA)."""
    if not (isinstance(acc, Vec) and isinstance(col.dtype, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        acc_v, xt_v, col_v, vals_v, k_v = args
        vec_type, i64 = acc_v.type, ir.IntType(64)
        c = builder.load(_element(context, builder, sig.args[2], col_v, k_v))
        if c.type.width < 64:
            c = builder.zext(c, i64) if not sig.args[2].dtype.signed else builder.sext(c, i64)
        start = builder.mul(c, ir.Constant(i64, vec_type.count))
        pointer = builder.bitcast(_element(context, builder, sig.args[1], xt_v, start), vec_type.as_pointer())
        x = builder.load(pointer, align=sig.args[1].dtype.bitwidth // 8)
        v = builder.load(_element(context, builder, sig.args[3], vals_v, k_v))
        return builder.fadd(acc_v, builder.fmul(_splat(builder, vec_type, v), x))

    return acc(acc, xt, col, vals, k), codegen


@intrinsic
def lane(typingctx, vec, t):
    if not isinstance(vec, Vec):
        return None

    def codegen(context, builder, sig, args):
        return builder.extract_element(args[0], args[1])

    return vec.dtype(vec, t), codegen
