"""Sharded weights (FSDP2, DeepSpeed ZeRO-3), and where a tensor's values live (tied weights).

In-weight adapters (SHiRA, MiSS bat) write into the base weight. An **FSDP2-sharded** weight
(``torch.distributed.fsdp.fully_shard``) cannot take that write as it is: outside a forward it is a
DTensor holding this rank's rows; inside a forward it is a full copy gathered from every rank's rows
for that forward only (and gathered again for the backward). A merge writes into the local rows
(:func:`sharded_rows`, :func:`shard_positions`); training writes into each gathered copy. ZeRO-3's
partitioned weights are gathered around a merge (:func:`whole_weight`). Quantized weights are
:mod:`shirakit.core.quantized_weights`'s.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

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

