"""The running batch's key/value cache: preallocated slots, one per row, tokens left-aligned.

Per layer the keys (and the values) are one tensor ``(slots, kv_heads, capacity, head_dim)``,
allocated once and written in place. Row ``r`` of the batch lives in slot ``r`` and holds its
``lengths[r]`` tokens at times ``0 .. lengths[r] - 1``; a forward over rows ``[start, stop)``
feeds ``q`` tokens per row at each row's own positions ``lengths[r] .. lengths[r] + q - 1``,
writes their keys/values there (one ``index_put`` per layer) and attends through a view
``[start:stop, :, :longest]`` of the buffer, no copy (``step``; the engine's usual forward is the
ragged one at the end of this file, which attends per row). A 4-D mask lets query ``t`` of row ``r``
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

import contextlib
import contextvars

import torch
import torch.nn.functional as F
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


# ---- one forward over decoding rows and prefill chunks together (ragged) ------------------------
RAGGED_ATTENTION = "shirakit_ragged"
_CURRENT: contextvars.ContextVar[RaggedStep | None] = contextvars.ContextVar("shirakit_ragged_step", default=None)


class RaggedStep(Cache):
    """One forward that feeds every decoding row its last token and prefill rows a chunk of their
    prompts, as one flat sequence of ``T`` tokens (the batch is ``(1, T)``, or ``(T, 1)`` when rows
    are routed to different adapters: routing is per batch row).

    Token ``i`` belongs to slot ``slots[i]`` at position ``positions[i]``: tokens ``[0, decoding)``
    are the decoding rows' (slots ``0 .. decoding - 1``, one each), then each prefill row's chunk in
    order. :meth:`update` writes every token's key/value into its slot (one ``index_put`` per
    layer) and hands the attention the whole buffers; :func:`ragged_attention` then attends per
    part: the decoding rows as one batch of single queries over ``[0, longest)``, each chunk as one
    causal block over its own row. Grouped-query heads are folded into the query axis (the ``G``
    query heads sharing a key head are ``G`` more queries of it), so keys are never repeated.
    Query ``t`` of a row sees exactly the keys ``j <= its position``: what it would see alone.
    """

    def __init__(self, slots: SlotKV, decoding: int, segments: list[tuple[int, int, int]], device) -> None:
        super().__init__(layers=[])
        self.kv, self.decoding, self.segments = slots, decoding, segments  # segments: (slot, start, count)
        starts = slots.lengths[:decoding]
        slot_list = list(range(decoding))
        position_list = list(starts)
        for slot, start, count in segments:
            slot_list += [slot] * count
            position_list += range(start, start + count)
        self.tokens = len(slot_list)
        self.slots = torch.tensor(slot_list, device=device)
        self.positions = torch.tensor(position_list, device=device)
        self.longest = max([p + 1 for p in position_list], default=0)
        self.decode_keys = max(starts, default=-1) + 1  # keys the decoding rows attend over
        if decoding:
            before = torch.tensor(starts, device=device)
            visible = torch.arange(self.decode_keys, device=device)[None, :] <= before[:, None]
            self.decode_mask = visible[:, None, None]  # (rows, 1, 1, keys): shared by heads and groups
        self._decode_bias: dict[torch.dtype, torch.Tensor] = {}
        self._segment_masks: dict[int, list[torch.Tensor]] = {}

    def decode_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """:attr:`decode_mask` as an additive bias (0 where seen, -inf where not), made once per forward."""
        if dtype not in self._decode_bias:
            bias = torch.zeros(self.decode_mask.shape, dtype=dtype, device=self.decode_mask.device)
            self._decode_bias[dtype] = bias.masked_fill_(~self.decode_mask, float("-inf"))
        return self._decode_bias[dtype]

    def segment_masks(self, groups: int) -> list[torch.Tensor]:
        """Per chunk (1, 1, groups x count, start + count): query ``g * count + t`` sees keys ``<= start + t``."""
        if groups not in self._segment_masks:
            masks = []
            for _, start, count in self.segments:
                device = self.positions.device
                own = torch.arange(start, start + count, device=device)
                causal = torch.arange(start + count, device=device)[None, :] <= own[:, None]
                masks.append(causal.repeat(groups, 1)[None, None])
            self._segment_masks[groups] = masks
        return self._segment_masks[groups]

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        kv = self.kv
        kv._ensure(layer_idx, key_states)
        heads, dim = key_states.shape[1], key_states.shape[3]
        for buffer, new in ((kv.keys[layer_idx], key_states), (kv.values[layer_idx], value_states)):
            # (B, heads, q, dim) with B * q = T tokens in order -> (T, heads, dim)
            flat = new.transpose(1, 2).reshape(self.tokens, heads, dim)
            buffer[self.slots, :, self.positions] = flat.to(buffer.dtype)
        return kv.keys[layer_idx], kv.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.longest

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.longest, 0


def ragged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention for a :class:`RaggedStep` forward (registered with transformers as
    ``RAGGED_ATTENTION``; the engine sets it on the model's config only for such a forward).
    ``query``: (B, heads, q, dim), B * q = T; ``key``/``value``: the whole slot buffers.
    softmax(q k^T * scaling + mask) v per part, as scaled_dot_product_attention computes it."""
    step = _CURRENT.get()
    if step is None:
        raise RuntimeError("ragged attention outside a ragged forward (the engine sets both together)")
    if kwargs.get("softcap") is not None:
        raise ValueError("attention logit soft-capping is not supported by the engine's ragged forward")
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    flat = query.transpose(1, 2).reshape(step.tokens, kv_heads, groups, dim)  # head h = kv head h // groups
    parts = []
    d = step.decoding
    if d:
        keys, values = key[:d, :, :step.decode_keys], value[:d, :, :step.decode_keys]  # views of the slots
        if query.device.type == "cpu" and query.dtype == torch.float32:
            out = decode_attention(flat[:d], keys, values, step.decode_bias(query.dtype),
                                   dim ** -0.5 if scaling is None else scaling)
        else:  # a GPU's fused kernel; half precision keeps its float32 accumulation
            out = F.scaled_dot_product_attention(flat[:d], keys, values, attn_mask=step.decode_mask, scale=scaling)
        parts.append(out.reshape(d, heads, dim))
    offset = d
    for (slot, start, count), mask in zip(step.segments, step.segment_masks(groups)):
        q = flat[offset: offset + count].permute(1, 2, 0, 3).reshape(1, kv_heads, groups * count, dim)
        end = start + count
        out = F.scaled_dot_product_attention(q, key[slot: slot + 1, :, :end], value[slot: slot + 1, :, :end],
                                             attn_mask=mask, scale=scaling)
        parts.append(out.reshape(kv_heads, groups, count, dim).permute(2, 0, 1, 3).reshape(count, heads, dim))
        offset += count
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out.reshape(batch, length, heads, dim), None


def decode_attention(query, key, value, bias, scaling: float) -> torch.Tensor:
    """softmax(q k^T * scaling + bias) v for the decoding rows, as two batched products: ``query``
    (rows, kv_heads, groups, dim), ``key``/``value`` (rows, kv_heads, keys, dim), ``bias`` (rows, 1, 1,
    keys). On CPU at decode sizes (a few queries per key head, ~100 keys) scaled_dot_product_attention's
    flash kernel costs more than these five ops: SmolLM2's decode step at 8 and 16 rows took 0.96x the
    time with them (docs/benchmarks.md)."""
    scores = torch.matmul(query, key.transpose(-1, -2)).mul_(scaling).add_(bias)
    return torch.matmul(scores.softmax(-1), value)


@contextlib.contextmanager
def ragged_forward(model, step: RaggedStep):
    """Within the block the model's attention is :func:`ragged_attention` over ``step``."""
    config = model.config
    before = config._attn_implementation
    token = _CURRENT.set(step)
    config._attn_implementation = RAGGED_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before
        _CURRENT.reset(token)


def supports_ragged(model) -> bool:
    """Whether the model's attention goes through transformers' attention interface (then the engine
    runs decoding rows and prefill chunks as one forward; otherwise as two)."""
    return (_REGISTERED and bool(getattr(model, "_supports_attention_backend", False))
            and hasattr(getattr(model, "config", None), "_attn_implementation"))


try:
    from transformers import AttentionInterface

    AttentionInterface.register(RAGGED_ATTENTION, ragged_attention)
    _REGISTERED = True
except ImportError:  # an older transformers: two forwards per iteration
    _REGISTERED = False
