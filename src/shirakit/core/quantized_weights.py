"""Quantized weights: what an adapter may do beside a base layer whose weight holds codes.

bitsandbytes ``Params4bit``/``Int8Params`` and torchao's quantized tensor subclasses store codes,
not weights: they are never written, and merging is refused. An adapter runs beside the base layer
(SHiRA: ``y = base(x) + s x S^T``), except where the library itself multiplies by a dense copy
dequantized for that one product (bitsandbytes and torchao's weight-only tensors on CPU while
training, :func:`dequantizer`): SHiRA then writes its values into that transient copy, as into an
FSDP2-gathered one (:mod:`shirakit.core.sharded_weights`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn

from .sharded_weights import is_sharded

QUANTIZED_MERGE = (
    "cannot merge into the quantized weight of {where} ({kind}): the sum would be re-quantized, which "
    "moves every value of the block it falls in, not only the adapter's, and could not be unmerged. Keep "
    "the adapter unmerged (it runs beside the quantized base at the same outputs), or fold it in by hand: "
    "dequantize the base layer to a float nn.Linear, shirakit.merge (or merge_and_unload), then quantize again"
)

def quantized_kind(weight: torch.Tensor) -> str | None:
    """The weight's type name if it is a quantized tensor (not plain floating values), else None."""
    if is_sharded(weight):
        return None
    if type(weight) in (torch.Tensor, nn.Parameter) and weight.dtype.is_floating_point:
        return None
    return type(weight).__name__ if type(weight) not in (torch.Tensor, nn.Parameter) else f"{weight.dtype} codes"



REPACKED_FOR_INFERENCE = (
    "this layer's bitsandbytes 4-bit weight was repacked for CPU inference by an eval-mode forward without "
    "gradients (bitsandbytes 0.50 does that on CPUs with AVX512-BF16, rounding the block scales to bf16); its "
    "product on that layout has no backward, so the input would get no gradient and every layer below would "
    "train on a wrong one. To evaluate between training steps, keep the model in train mode under "
    "torch.no_grad() (bitsandbytes repacks only in eval mode), or reload the quantized base"
)


ACTIVATION_QUANTIZED = (
    "this layer's quantized weight ({kind}, torchao) quantizes its input too (a dynamic or static activation "
    "config): that rounding has no gradient, so torch gives the input none through the base product (silently) "
    "and every layer below would train on a wrong gradient, LoRA's as much as SHiRA's. Train over a weight-only "
    "config (torchao Int8WeightOnlyConfig, IntxWeightOnlyConfig, Float8WeightOnlyConfig, to_nf4) and keep the "
    "activation-quantized model for inference (under torch.no_grad() it works as is)"
)

NO_INPUT_GRADIENT = (
    "this layer's quantized base ({kind}) returned an output with no gradient path while its input needs one: "
    "the library's product drops the input gradient, so every layer below would train on a wrong gradient. "
    "Train over a base whose product has a backward (a weight-only quantization), or run this model under "
    "torch.no_grad()"
)


def activation_quantized(weight: torch.Tensor) -> bool:
    """Does this torchao weight quantize the layer's input as well (its dynamic/static activation
    configs: ``Int8Tensor.act_quant_kwargs``, ``IntxUnpackedToInt8Tensor.activation_quantization``,
    ``Float8Tensor.act_quant_kwargs``)? Their products give the input no gradient."""
    if not type(weight).__module__.startswith("torchao"):
        return False
    return any(getattr(weight, attr, None) is not None for attr in ("act_quant_kwargs", "activation_quantization"))


def input_gradient_blocked(layer: nn.Module) -> str | None:
    """Why the input of this quantized ``layer`` would get no gradient through its base product
    (the message to raise with), or None where it gets the right one."""
    if repacked_for_inference(layer):
        return REPACKED_FOR_INFERENCE
    if activation_quantized(layer.weight):
        return ACTIVATION_QUANTIZED.format(kind=type(layer.weight).__name__)
    return None


def repacked_for_inference(layer: nn.Module) -> bool:
    """Has bitsandbytes repacked this 4-bit layer's weight into its CPU inference layout?"""
    state = getattr(layer.weight, "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


class Dequantizer(NamedTuple):
    """How a quantized layer's library computes its training product: ``linear(x.to(dtype), weight(), b)``."""

    dtype: torch.dtype  # the compute dtype (inputs are cast to it, outputs cast back)
    weight: Callable[[], torch.Tensor]  # a fresh dense (out, in) copy in that dtype, exactly the library's
    # The library's own product lets autograd keep that copy for the backward (torchao): every adapted
    # layer then holds a dense weight between its forward and backward. See recomputed_linear.
    kept_by_library: bool = False


class _RecomputedLinear(torch.autograd.Function):
    """``y = x deq(W)^T + b``, dequantizing again for ``dx = g deq(W)`` instead of keeping the copy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, dequantizer: Dequantizer) -> torch.Tensor:
        ctx.dequantizer = dequantizer
        return torch.nn.functional.linear(x, dequantizer.weight(), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dx = grad @ ctx.dequantizer.weight() if ctx.needs_input_grad[0] else None
        dbias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return dx, dbias, None


def recomputed_linear(x: torch.Tensor, bias: torch.Tensor | None, dequantizer: Dequantizer) -> torch.Tensor:
    """A quantized base layer's product with no dense copy kept for the backward: the copy is made
    for the forward's product and made again for the backward's, as bitsandbytes' CPU path and
    torchtune's ``LinearNF4`` do. For a library that would keep it (``kept_by_library``), this
    trades one more dequantization per step for one dense weight per layer held through the step."""
    bias = None if bias is None else bias.to(dequantizer.dtype)
    return _RecomputedLinear.apply(x.to(dequantizer.dtype), bias, dequantizer).to(x.dtype)


def dequantizer(layer: nn.Module, x: torch.Tensor) -> Dequantizer | None:
    """The library's dense product of a quantized ``layer`` on ``x``, where that is what it runs.

    bitsandbytes 0.50 on CPU has no 4-bit or 8-bit training kernel: ``Linear4bit`` (``gemm_4bit``'s
    default kernel, and ``MatMul4Bit``'s backward) and ``Linear8bitLt`` in training mode
    (``MatMul8bitFp``) dequantize the whole weight into a dense transient and call a dense product,
    once in the forward and again for dx in the backward. Where it runs something else (CUDA kernels,
    the eval-mode CPU packing of 4-bit weights, 8-bit int8 products outside training, a 4-bit
    weight already repacked for CPU inference, other libraries), None: adapters then run beside
    ``layer(x)`` as it is.

    torchao 0.18's weight-only tensors on CPU do the same in the forward (``Int8Tensor``: the codes cast
    to the input's dtype, the product scaled by row; ``IntxUnpackedToInt8Tensor``, ``Float8Tensor``,
    ``NF4Tensor``: the dequantized weight), see :func:`_torchao_dequantizer`.
    """
    weight = layer.weight
    if x.device.type != "cpu" or weight.device.type != "cpu":
        return None
    if type(weight).__module__.startswith("torchao"):
        return _torchao_dequantizer(weight, x)
    if not type(weight).__module__.startswith("bitsandbytes"):
        return None
    kind = type(weight).__name__
    if kind == "Params4bit":
        state = getattr(weight, "quant_state", None)
        state = getattr(layer, "quant_state", None) if state is None else state  # as Linear4bit.forward finds it
        if state is None or getattr(state, "packing_format_for_cpu", False):
            return None
        from bitsandbytes.functional import dequantize_4bit

        dtype = getattr(layer, "compute_dtype", None) or x.dtype
        return Dequantizer(dtype, lambda: dequantize_4bit(weight.data, state).to(dtype))
    if kind == "Int8Params" and layer.training and weight.dtype == torch.int8:
        scales = weight.SCB if weight.SCB is not None else getattr(getattr(layer, "state", None), "SCB", None)
        if scales is None:
            return None
        dtype = x.dtype  # MatMul8bitFp: codes * (row scale / 127), in the input's dtype
        return Dequantizer(dtype, lambda: weight.data.to(dtype).mul_(scales.unsqueeze(1).mul(1.0 / 127.0)))
    return None


def _torchao_dequantizer(weight: torch.Tensor, x: torch.Tensor) -> Dequantizer | None:
    """torchao's weight-only tensors on CPU multiply by a dense copy: ``Int8Tensor`` casts its codes to
    the input's dtype (``(x codes^T) * scale`` by row, or the dequantized weight for group scales),
    ``IntxUnpackedToInt8Tensor`` and ``Float8Tensor`` dequantize to their own dtype, ``NF4Tensor``
    (torchtune's QLoRA base, ``LinearNF4``) to the input's. The copy here is ``dequantize()`` itself
    (for ``Int8Tensor`` by row the same values up to fp rounding, ~1e-7 relative). torchao's own
    products keep their copy for the backward (autograd saves it; ``LinearNF4`` does not), so the
    layer runs them through :func:`recomputed_linear` when the input needs a gradient. Weights
    that quantize the input too (:func:`activation_quantized`) or pre-scale it are left alone."""
    kind = type(weight).__name__
    if kind == "NF4Tensor":
        dtype = x.dtype
        return Dequantizer(dtype, lambda: weight.get_original_weight().to(dtype))  # LinearNF4 keeps none
    if activation_quantized(weight) or getattr(weight, "act_pre_scale", None) is not None:
        return None
    if kind == "Int8Tensor":
        dtype = x.dtype
        return Dequantizer(dtype, lambda: weight.dequantize(dtype), kept_by_library=True)
    if kind in ("IntxUnpackedToInt8Tensor", "Float8Tensor"):
        dtype = weight.dtype
        return Dequantizer(dtype, lambda: weight.dequantize().to(dtype), kept_by_library=True)
    return None
