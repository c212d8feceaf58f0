"""The compact SHiRA file: at most 6 bytes per value, lossless, told apart from PEFT's by metadata.

PEFT stores a SHiRA layer as ``shira_weight`` (K values) and ``shira_indices`` ((2, K) int32):
4 + 8 = 12 bytes per fp32 value. The compact form keeps the values as they are (the adapter's
own dtype, so nothing is rounded) and replaces the indices by the gaps between successive
row-major flat positions ``f_k = row_k * in_features + col_k`` (sorted, so gaps are positive):

    shira_weight      (K,)    values, same order as the sorted positions
    shira_index_gaps  (K,)    int16 holding the uint16 bit pattern of gap_k = f_k - f_{k-1} (f_{-1} = 0)
    shira_index_far   (2, F)  int64: (k, gap_k) for the rare gaps >= 65535, whose slot holds 65535

Decoding is ``f = cumsum(gaps)`` after patching the far gaps: vectorized, no Python loop.
Bytes per value: 4 + 2 for fp32 values, 2 + 2 for half values (plus 16 per far gap, which a
1-5% density mask essentially never has). The safetensors metadata ``shirakit_format`` says
which layout a file uses (``shirakit.io.checkpoint.FORMAT_KEY``); the loader reads both.
"""

from __future__ import annotations

import torch

from . import index_io

_U16_MAX = 0xFFFF
_MAX_FLAT = 2**40  # no weight has 2^40 entries; bounds the sum of K gaps far below 2^63


def encode(indices: torch.Tensor, values: torch.Tensor, in_features: int) -> dict[str, torch.Tensor]:
    """(2, K) sorted (row, col) indices + values -> the compact tensors."""
    flat = indices[0].long() * in_features + indices[1].long()
    gaps = torch.diff(flat, prepend=flat.new_zeros(1))
    far = torch.nonzero(gaps >= _U16_MAX).flatten()
    stored = gaps.clamp(max=_U16_MAX).to(torch.int32).to(torch.int16)  # wraps to the uint16 bit pattern
    return {
        "shira_weight": values.contiguous(),
        "shira_index_gaps": stored.contiguous(),
        "shira_index_far": torch.stack([far, gaps[far]]).contiguous(),
    }


def decode(
    tensors: dict[str, torch.Tensor], in_features: int, source: str, out_features: int | None = None
) -> dict[str, torch.Tensor]:
    """The compact tensors -> PEFT's (``shira_weight``, ``shira_indices``) for the usual checks.

    With ``out_features`` a valid, ordinary file is decoded and range-checked in one numba pass
    (:mod:`shirakit.methods.shira.index_io`); anything else goes through the torch decoder below.
    """
    expected = {"shira_weight", "shira_index_gaps", "shira_index_far"}
    if set(tensors) != expected:
        raise ValueError(f"{source}: compact SHiRA layer expects keys {sorted(expected)}, found {sorted(tensors)}")
    gaps_raw, far = tensors["shira_index_gaps"], tensors["shira_index_far"]
    if gaps_raw.dtype != torch.int16 or gaps_raw.dim() != 1:
        found = f"{gaps_raw.dtype} {tuple(gaps_raw.shape)}"
        raise ValueError(f"{source}: shira_index_gaps must be 1-D int16, found {found}")
    if far.dtype != torch.int64 or far.dim() != 2 or far.shape[0] != 2:
        raise ValueError(f"{source}: shira_index_far must be (2, F) int64, found {far.dtype} {tuple(far.shape)}")
    if out_features is not None:
        fast = index_io.decode_compact(gaps_raw, far, out_features, in_features)
        if fast is not None:
            return {"shira_weight": tensors["shira_weight"], "shira_indices": fast}
    gaps = gaps_raw.view(torch.uint16).to(torch.int64)  # the stored bits, read unsigned
    if far.shape[1]:
        if far[0].min() < 0 or far[0].max() >= gaps.numel():
            raise ValueError(f"{source}: shira_index_far points outside the {gaps.numel()} gaps")
        if far[1].min() < _U16_MAX or far[1].max() > _MAX_FLAT:  # far gaps only; no int64 overflow in cumsum
            raise ValueError(f"{source}: shira_index_far holds a gap outside [{_U16_MAX}, {_MAX_FLAT}]")
        gaps[far[0]] = far[1]
    flat = torch.cumsum(gaps, 0)
    indices = torch.stack([flat // in_features, flat % in_features])  # range-checked by the loader
    return {"shira_weight": tensors["shira_weight"], "shira_indices": indices}
