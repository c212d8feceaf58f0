"""The running batch's key/value cache, left-padded so rows of different lengths decode together.

Row ``i`` holds its real tokens at the right end of the time axis; ``mask[i, t] = 1`` marks them.
A decode step feeds one token per row at position ``mask[i].sum()`` (its own count of real
tokens, not the padded length), so a row's positions and attended keys are exactly those it
would have alone: padding changes nothing but which keys are masked out.

Continuous batching is then three tensor operations between decode steps:
``extend`` (new rows join: both sides left-padded to a common length and concatenated),
``select`` (finished rows leave) and ``trim`` (time columns that are padding in every row go).
The tensors go in and out of a ``transformers`` ``DynamicCache`` at each step.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


def cache_from(kv: list[tuple[torch.Tensor, torch.Tensor]] | None) -> DynamicCache:
    return DynamicCache() if kv is None else DynamicCache(kv)


def tensors_of(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values), each (batch, heads, time, head_dim)."""
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))  # older releases


def _left_pad(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class BatchKV:
    """Keys/values and the padding mask of the rows that are decoding now."""

    def __init__(self) -> None:
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.mask: torch.Tensor | None = None  # (rows, time), int64: 1 = real token

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def positions(self) -> torch.Tensor:
        """(rows, 1): the position of the token each row feeds next."""
        return self.mask.sum(dim=1, keepdim=True)

    def set(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Take the cache a forward returned, with the mask it was run under."""
        self.kv = tensors_of(cache)
        self.mask = mask
        # Padded query positions may hold NaN keys/values (attention over no key); masked keys
        # get weight 0, but 0 * NaN is NaN, so padding must hold finite values.
        pad = (mask == 0)[:, None, :, None]
        if bool(pad.any()):
            self.kv = [(k.masked_fill(pad, 0), v.masked_fill(pad, 0)) for k, v in self.kv]

    def extend(self, other: BatchKV) -> None:
        """Append ``other``'s rows below ours."""
        if self.rows == 0:
            self.kv, self.mask = other.kv, other.mask
            return
        length = max(self.mask.shape[1], other.mask.shape[1])
        self.kv = [
            (torch.cat([_left_pad(k, length, 2), _left_pad(ok, length, 2)]),
             torch.cat([_left_pad(v, length, 2), _left_pad(ov, length, 2)]))
            for (k, v), (ok, ov) in zip(self.kv, other.kv)
        ]
        self.mask = torch.cat([_left_pad(self.mask, length, 1), _left_pad(other.mask, length, 1)])

    def select(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` (in that order), then drop all-padding columns."""
        if not keep:
            self.kv, self.mask = None, None
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.kv]
        self.mask = self.mask.index_select(0, index)
        self.trim()

    def trim(self) -> None:
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else self.mask.shape[1]
        if start:
            self.kv = [(k[:, :, start:], v[:, :, start:]) for k, v in self.kv]
            self.mask = self.mask[:, start:]

    def step_mask(self) -> torch.Tensor:
        """The mask for one decode step: ours plus the column of the token being fed."""
        return torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)
