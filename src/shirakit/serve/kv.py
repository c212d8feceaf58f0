"""The running batch's key/value cache: preallocated slots, one per row, tokens left-aligned.

Per layer the keys (and the values) are one tensor ``(slots, kv_heads, capacity, head_dim)``,
allocated once and written in place. Row ``r`` of the batch lives in slot ``r`` and holds its
``lengths[r]`` tokens at times ``0 .. lengths[r] - 1``; a forward over rows ``[start, stop)``
feeds ``q`` tokens per row at each row's own positions ``lengths[r] .. lengths[r] + q - 1``,
writes their keys/values there (one ``index_put`` per layer) and attends through a view
``[start:stop, :, :longest]`` of the buffer, no copy. A 4-D mask lets query ``t`` of row ``r``
see exactly the keys ``j <= lengths[r] + t``: what the row would see alone, so greedy outputs
equal an offline ``generate``. Keys past a row's length are stale or padding and always masked
(they are finite: the buffer starts at zero and only ever holds projections of real embeddings).

What moves, and when (``bytes_copied`` counts it):

- a row leaves: the last row is moved into its slot (that one row's tokens, not the batch);
- a prefilling row finishes its prompt: it is swapped to the end of the decoding rows (two rows;
  none when it is already there, the usual case);
- the slots or the capacity must grow (more rows than ever, or a longer row) or may shrink by
  half: the buffer is reallocated and the used part copied once.

The previous layout (one left-padded tensor rebuilt on every admission and retirement and masked
on every padded step, a full copy of the batch's keys/values each time) is measured against this
one in docs/benchmarks.md (benchmarks/serve.py --engine-only).
"""

from __future__ import annotations

import torch
from transformers import Cache, DynamicCache


def cache_from(kv: list[tuple[torch.Tensor, torch.Tensor]] | None) -> DynamicCache:
    return DynamicCache() if kv is None else DynamicCache(kv)


def tensors_of(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values), each (batch, heads, time, head_dim)."""
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))  # older releases


def round_up(value: int, step: int) -> int:
    return -(-value // step) * step


class SlotKV:
    """Keys/values of the rows in the batch, one preallocated slot per row.

    ``plan(rows, longest)`` sets the size the buffers must have (slots rounded up to ``row_step``,
    time to ``time_step``, within ``max_rows`` x ``max_time``); layers are (re)allocated to it at
    their next write. :meth:`footprint` is that size in tokens, what the engine's KV budget counts.
    """

    def __init__(self, max_rows: int, max_time: int, row_step: int = 4, time_step: int = 64) -> None:
        self.max_rows, self.max_time, self.row_step, self.time_step = max_rows, max_time, row_step, time_step
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths: list[int] = []  # tokens held, per row in use
        self.shape = (0, 0)  # (slots, capacity) the buffers must have
        self.bytes_copied = 0  # keys/values moved inside the cache (rows moved, reallocations)

    # ---- size ----------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return len(self.lengths)

    def fit(self, rows: int, longest: int) -> tuple[int, int]:
        """(slots, capacity) the buffers take for ``rows`` rows of at most ``longest`` tokens."""
        return (min(round_up(max(rows, 1), self.row_step), max(self.max_rows, rows)),
                min(round_up(max(longest, 1), self.time_step), max(self.max_time, longest)))

    def footprint(self, rows: int, longest: int) -> int:
        """Token positions the buffers hold (per layer) for ``rows`` rows of at most ``longest`` tokens."""
        slots, capacity = self.fit(rows, longest)
        return slots * capacity

    def plan(self, rows: int, longest: int) -> None:
        """Size the buffers for ``rows`` rows of at most ``longest`` tokens: grow at once when
        needed, shrink only by half or more (no reallocation back and forth)."""
        slots, capacity = self.fit(rows, longest)
        old_slots, old_capacity = self.shape
        if slots <= old_slots and 2 * slots > old_slots:
            slots = old_slots
        if capacity <= old_capacity and 2 * capacity > old_capacity:
            capacity = old_capacity
        self.shape = (slots, capacity)

    def _ensure(self, layer: int, like: torch.Tensor) -> None:
        """Layer ``layer``'s buffers at ``self.shape``; the used part kept. ``like``: (n, heads, q, dim)."""
        slots, capacity = self.shape
        if layer < len(self.keys) and tuple(self.keys[layer].shape[::2]) == (slots, capacity):
            return
        shape = (slots, like.shape[1], capacity, like.shape[3])
        fresh = [torch.zeros(shape, dtype=like.dtype, device=like.device) for _ in range(2)]
        if layer < len(self.keys):
            old_slots, old_capacity = self.keys[layer].shape[0], self.keys[layer].shape[2]
            rows, used = min(self.rows, old_slots, slots), min(max(self.lengths, default=0), old_capacity, capacity)
            for new, old in zip(fresh, (self.keys[layer], self.values[layer])):
                part = old[:rows, :, :used]
                new[:rows, :, :used] = part
                self.bytes_copied += part.numel() * part.element_size()
            self.keys[layer], self.values[layer] = fresh
        else:
            self.keys.append(fresh[0])
            self.values.append(fresh[1])

    def release(self) -> None:
        """No rows left: free the buffers."""
        self.keys, self.values, self.lengths, self.shape = [], [], [], (0, 0)

    # ---- rows ---------------------------------------------------------------------------
    def add(self, count: int) -> None:
        """``count`` empty rows after the last one."""
        self.lengths += [0] * count

    @torch.inference_mode()  # the buffers are made inside forwards, so they are inference tensors
    def _copy_row(self, src: int, dst: int, length: int) -> None:
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                buffer[dst, :, :length] = buffer[src, :, :length]
                self.bytes_copied += buffer[0, :, :length].numel() * buffer.element_size()

    def move(self, src: int, dst: int) -> None:
        """Row ``src`` takes slot ``dst`` (whatever was there is gone); ``src`` keeps a stale copy."""
        if src != dst:
            self._copy_row(src, dst, self.lengths[src])
            self.lengths[dst] = self.lengths[src]

    @torch.inference_mode()
    def swap(self, a: int, b: int) -> None:
        if a == b:
            return
        la, lb = self.lengths[a], self.lengths[b]
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                held = buffer[a, :, :la].clone()
                buffer[a, :, :lb] = buffer[b, :, :lb]
                buffer[b, :, :la] = held
                self.bytes_copied += (2 * held.numel() + buffer[0, :, :lb].numel()) * buffer.element_size()
        self.lengths[a], self.lengths[b] = lb, la

    def pop(self) -> None:
        """Forget the last row (its slot is free)."""
        self.lengths.pop()
        if not self.lengths:
            self.release()

    # ---- one forward --------------------------------------------------------------------
    def step(self, start: int, stop: int, query: int, dtype: torch.dtype, device) -> tuple[StepCache, torch.Tensor,
                                                                                            torch.Tensor]:
        """(cache, attention mask, position ids) for a forward of ``query`` tokens per row over rows
        ``[start, stop)``. Call :meth:`advance` after it with the real tokens each row fed."""
        if stop <= start:
            raise ValueError(f"a forward needs at least one row; got rows [{start}, {stop})")
        starts = torch.tensor(self.lengths[start:stop], device=device)
        longest = int(starts.max()) + query
        if longest > self.shape[1] or stop > self.shape[0]:
            raise RuntimeError(f"the KV buffers hold {self.shape[0]} rows x {self.shape[1]} tokens; this forward "
                               f"needs rows up to {stop} and {longest} tokens (plan() was not called)")
        steps = torch.arange(query, device=device)
        positions = starts[:, None] + steps  # (n, q): each row's own positions
        visible = torch.arange(longest, device=device)[None, None, :] <= positions[:, :, None]  # (n, q, keys)
        mask = torch.zeros(visible.shape, dtype=dtype, device=device)
        mask.masked_fill_(~visible, torch.finfo(dtype).min)
        return StepCache(self, start, stop, positions, longest), mask[:, None], positions

    def advance(self, start: int, fed: list[int]) -> None:
        for i, count in enumerate(fed):
            self.lengths[start + i] += count


class StepCache(Cache):
    """What the model sees for one forward: writes go into the slots, reads are views of them."""

    def __init__(self, slots: SlotKV, start: int, stop: int, positions: torch.Tensor, longest: int) -> None:
        super().__init__(layers=[])
        self.slots, self.start, self.stop, self.longest = slots, start, stop, longest
        self.positions = positions
        self.rows = torch.arange(stop - start, device=positions.device)[:, None]

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        slots = self.slots
        slots._ensure(layer_idx, key_states)
        out = []
        for buffer, new in ((slots.keys[layer_idx], key_states), (slots.values[layer_idx], value_states)):
            view = buffer[self.start:self.stop]
            # advanced indices on dims 0 and 2 put their (n, q) first: (n, q, heads, dim)
            view[self.rows, :, self.positions] = new.transpose(1, 2).to(buffer.dtype)
            out.append(view[:, :, : self.longest])
        return out[0], out[1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.longest

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.longest, 0
