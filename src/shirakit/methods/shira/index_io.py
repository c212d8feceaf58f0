"""Loading SHiRA indices in one pass: decode and validate straight into the adapter's own buffers.

A SHiRA layer's K positions arrive either as PEFT's ``(2, K)`` (row, col) tensor or as the compact
layout's uint16 gaps between successive row-major flat positions (:mod:`shirakit.methods.shira.compact`). Both
must be checked (range, count, strictly increasing = sorted and unique) before they are used. The
torch way is a dozen whole-tensor passes (min/max per axis, the flat positions, a diff, a compare,
the storage positions, dtype conversions), each allocating K-sized temporaries; here one numba loop
does it all and writes the final int32 ``shira_indices`` and int64 storage positions as it goes.

Only the common, valid case takes this path: sorted, in range, the far gaps in order. Anything
else (unsorted files from other tools, errors, no numba) returns False and the caller runs the
reference torch path, which sorts what can be sorted and raises the precise error.
"""

from __future__ import annotations

import torch

from .lazy import once

try:
    import numba
except ImportError:  # pragma: no cover - without numba the torch path loads everything
    numba = None

AVAILABLE = numba is not None
_U16_MAX = 0xFFFF


@once
def _kernels():
    """The numba kernels, compiled (or loaded from numba's cache) at the first call."""
    options = dict(nogil=True, boundscheck=False, cache=True)

    @numba.njit(**options)
    def check_pairs(rows, cols, n_rows, n_cols, fan_in_fan_out, out_indices, out_storage):
        """Copy (row, col) pairs into the final buffers; False at the first out-of-range or non-increasing."""
        previous = -1
        for k in range(rows.shape[0]):
            r, c = rows[k], cols[k]
            if r < 0 or r >= n_rows or c < 0 or c >= n_cols:
                return False
            flat = r * n_cols + c
            if flat <= previous:
                return False
            previous = flat
            out_indices[0, k], out_indices[1, k] = r, c
            out_storage[k] = c * n_rows + r if fan_in_fan_out else flat
        return True

    @numba.njit(**options)
    def decode_gaps(gaps, far_k, far_gap, n_rows, n_cols, out_indices):
        """Compact gaps (uint16, far ones patched from (far_k, far_gap) in k order) -> (2, K) pairs."""
        total = n_rows * n_cols
        flat = 0
        p = 0
        for k in range(gaps.shape[0]):
            if p < far_k.shape[0] and far_k[p] == k:
                gap = far_gap[p]
                p += 1
            else:
                gap = gaps[k]
            if gap <= 0 and k > 0:
                return False
            flat += gap
            if flat < 0 or flat >= total:
                return False
            out_indices[0, k], out_indices[1, k] = flat // n_cols, flat % n_cols
        return p == far_k.shape[0]

    return check_pairs, decode_gaps


def load_pairs(indices: torch.Tensor, n_rows: int, n_cols: int, fan_in_fan_out: bool,
               out_indices: torch.Tensor, out_storage: torch.Tensor) -> bool:
    """Fill ``out_indices`` (2, K) int32 and ``out_storage`` (K,) int64 from PEFT's (2, K) pairs, or
    return False (nothing promised about the buffers) when the reference path must decide."""
    ok_types = (torch.int32, torch.int64)
    if not AVAILABLE or indices.dim() != 2 or indices.shape[0] != 2 or indices.dtype not in ok_types:
        return False
    if indices.device.type != "cpu" or out_indices.device.type != "cpu" or indices.shape[1] != out_indices.shape[1]:
        return False
    check_pairs, _ = _kernels()
    pairs = indices.contiguous().numpy()
    return bool(check_pairs(pairs[0], pairs[1], n_rows, n_cols, fan_in_fan_out, out_indices.numpy(),
                            out_storage.numpy()))


def decode_compact(gaps: torch.Tensor, far: torch.Tensor, n_rows: int, n_cols: int) -> torch.Tensor | None:
    """The compact layout's gaps -> validated (2, K) int32 pairs, or None for the reference decoder."""
    if not AVAILABLE or gaps.dtype != torch.int16 or gaps.dim() != 1:
        return None
    if far.dtype != torch.int64 or far.dim() != 2 or far.shape[0] != 2:
        return None
    if far.shape[1] > 1 and not bool((far[0, 1:] > far[0, :-1]).all()):
        return None
    _, decode_gaps = _kernels()
    out = torch.empty(2, gaps.numel(), dtype=torch.int32)
    far = far.contiguous()
    unsigned = gaps.contiguous().view(torch.uint16).numpy()
    if not decode_gaps(unsigned, far[0].numpy(), far[1].numpy(), n_rows, n_cols, out.numpy()):
        return None
    return out
