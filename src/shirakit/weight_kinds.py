"""What kind of tensor a base layer's weight is, and what an adapter may do to it in place.

In-weight adapters (SHiRA, MiSS bat) write into the base weight. Two kinds of weight cannot take
that write as it is:

- **FSDP2-sharded** (``torch.distributed.fsdp.fully_shard``): outside a forward the weight is a
  DTensor holding this rank's rows; inside a forward it is a full copy gathered from every rank's
  rows for that forward only (and gathered again for the backward). A merge writes into the local
  rows (:func:`sharded_rows`, :func:`shard_positions`); training writes into each gathered copy.
- **quantized** (bitsandbytes ``Params4bit``/``Int8Params``, torchao's quantized tensor
  subclasses): the stored values are codes, not weights, and are never written; merging is
  refused. An adapter runs beside the base layer (SHiRA: ``y = base(x) + s x S^T``), except where
  the library itself multiplies by a dense copy dequantized for that one product (bitsandbytes and
  torchao's weight-only tensors on CPU while training, :func:`dequantizer`): SHiRA then writes its
  values into that transient copy, as into an FSDP2-gathered one.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, NamedTuple

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

QUANTIZED_MERGE = (
    "cannot merge into the quantized weight of {where} ({kind}): the sum would be re-quantized, which "
    "moves every value of the block it falls in, not only the adapter's, and could not be unmerged. Keep "
    "the adapter unmerged (it runs beside the quantized base at the same outputs), or fold it in by hand: "
    "dequantize the base layer to a float nn.Linear, shirakit.merge (or merge_and_unload), then quantize again"
)

SHARDED_MERGE = (
    "cannot merge {names} into the FSDP2-sharded weight of this layer: {kinds} would change every element of "
    "the weight, which here is split across ranks (only SHiRA merges into the shards, by scattering each "
    "rank's positions). Merge in one process instead: save the adapter (shirakit.save_adapter on every "
    "rank), load the full base model and the adapter there, then shirakit.merge / merge_and_unload"
)


ZERO3_ALREADY_GATHERED = (
    "cannot {what} while the weight of this layer is gathered by ZeRO-3 outside a forward (inside "
    "deepspeed.zero.GatheredParameters?): a write there is thrown away when that context ends unless it "
    "names a modifier_rank, and shirakit cannot tell which. Call shirakit.{what} outside any "
    "GatheredParameters context, on every rank (it gathers each layer's weight itself and writes the "
    "result back into the partitions)"
)


def fsdp_managed(module: nn.Module) -> bool:
    """Is this module's weight managed by FSDP (``fully_shard`` marks every module it manages)?"""
    return bool(getattr(module, "_is_fsdp_managed_module", False))


def zero3_partitioned(module: nn.Module) -> bool:
    """Is this module's weight partitioned by DeepSpeed ZeRO-3 (an empty placeholder outside the
    module's forward and backward, gathered into the same Parameter around each)? ZeRO-3 marks
    every parameter it manages with a ``ds_id``."""
    return hasattr(getattr(module, "weight", None), "ds_id")


def gathered_per_call(module: nn.Module) -> bool:
    """Is this module's weight a copy gathered for each forward (and again for the backward) from
    shards that must stay clean: FSDP2 (``fully_shard``) or DeepSpeed ZeRO-3?"""
    return fsdp_managed(module) or zero3_partitioned(module)


@contextlib.contextmanager
def whole_weight(module: nn.Module, readers: list[nn.Module], what: str, write: bool = True) -> Iterator[None]:
    """Around a merge or unmerge: under ZeRO-3, the whole weight of ``module`` and the parameters of
    the adapters ``readers`` (partitioned too), gathered on every rank; with ``write``, the weight as
    left by rank 0 goes back into every rank's partition at the end (every rank writes the same, so
    each adapter's own record of what it wrote holds everywhere). A collective: every rank must make
    the same calls in the same order, as for saving. Elsewhere nothing happens.

    Without this a merge under ZeRO-3 wrote into the empty placeholder that stands for the weight
    outside a forward: LoRA's "succeeded" and its delta was silently lost, SHiRA's failed with an
    IndexError."""
    if not zero3_partitioned(module):
        yield
        return
    import deepspeed  # present: the weight carries its marks
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    weight = module.weight
    if weight.ds_status != ZeroParamStatus.NOT_AVAILABLE and not getattr(weight, "ds_persist", False):
        raise RuntimeError(ZERO3_ALREADY_GATHERED.format(what=what))
    reads = [p for reader in readers for p in reader.parameters() if hasattr(p, "ds_id")]
    with deepspeed.zero.GatheredParameters(reads), \
            deepspeed.zero.GatheredParameters([weight], modifier_rank=0 if write else None):
        yield


def is_sharded(weight: torch.Tensor) -> bool:
    """A DTensor (FSDP2's sharded parameter outside a forward)."""
    return hasattr(weight, "to_local") and hasattr(weight, "placements")


def storage_key(tensor: torch.Tensor) -> tuple:
    """Where a tensor's values live, to find the parameters that share them (tied weights). A wrapper
    subclass (torchao's quantized tensors, a DTensor) has no storage of its own: its first inner
    tensor's stands for it. A meta tensor has no memory (every data pointer is 0): its storage object
    stands for it, so two meta parameters share a key only if they share a storage (tied)."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        if names:
            return storage_key(getattr(tensor, names[0]))
    storage = tensor.untyped_storage()
    return tensor.device, storage._cdata if tensor.is_meta else storage.data_ptr()


def quantized_kind(weight: torch.Tensor) -> str | None:
    """The weight's type name if it is a quantized tensor (not plain floating values), else None."""
    if is_sharded(weight):
        return None
    if type(weight) in (torch.Tensor, nn.Parameter) and weight.dtype.is_floating_point:
        return None
    return type(weight).__name__ if type(weight) not in (torch.Tensor, nn.Parameter) else f"{weight.dtype} codes"


def sharded_rows(weight: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(this rank's rows as a writable tensor, first row, end row) of a dim-0 sharded DTensor.

    FSDP2 shards dim 0 like ``torch.chunk``: ``ceil(rows / world)`` rows per rank, the last ranks
    possibly short or empty. The local tensor is a view of the storage FSDP all-gathers from, so
    writing into it changes every later gathered copy.
    """
    placements = tuple(weight.placements)
    if len(placements) != 1 or not placements[0].is_shard(0):
        raise RuntimeError(
            f"expected a weight sharded along dim 0 on a 1-D mesh (FSDP2's default), found placements {placements}; "
            "shirakit writes SHiRA values into local shards only for that layout"
        )
    local = weight.to_local()
    world, rank = weight.device_mesh.size(), weight.device_mesh.get_local_rank()
    rows = weight.shape[0]
    chunk = -(-rows // world)
    start = min(rank * chunk, rows)
    stop = min(start + chunk, rows)
    if local.shape[0] != stop - start:
        raise RuntimeError(f"rank {rank} holds {local.shape[0]} rows of {rows}; expected {stop - start} (chunked)")
    return local, start, stop


def shard_positions(flat_index: torch.Tensor, row_len: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global flat positions -> (positions in the local rows [start, stop), which of the K fall there)."""
    lo, hi = start * row_len, stop * row_len
    selected = ((flat_index >= lo) & (flat_index < hi)).nonzero().squeeze(1)
    return flat_index[selected] - lo, selected


def full_values(param: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value: FSDP shards adapter parameters too (gathering is a collective)."""
    return param.full_tensor() if is_sharded(param) else param

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
