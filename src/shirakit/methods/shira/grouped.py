"""Many SHiRA adapters' deltas in one call: a mixed batch's rows, each with its own adapter (numba, CPU).

In a routed step (``shirakit.route``: row b uses adapter a(b)) a layer adds, to each row's base output,

    y[b, i] += s_a * sum_{k in row i of S_a} v_k * x[b, j_k]        a = a(b)

for every adapter's K positions (i_k, j_k) (SHiRA, arXiv 2406.13175). Done one adapter at a time
(a sparse product per group) that is a dozen small torch calls per adapter per layer: with 16
decoding rows over 16 adapters on SmolLM2-135M, ~960 calls per step, and a routed step took ~1.4x
a fused one although the arithmetic is ~0.5% of the base product. Here one kernel call per layer
does every group: the adapters' CSR arrays are laid end to end (``crow`` offsets, ``col``, values
times scale) and kept per layer (for all its SHiRA adapters: ~6 bytes per value more, column
indices as uint16 where the input is at most 65,536 wide).

Layout for few tokens per adapter (decoding: 16 rows over 4 adapters is 4 tokens each). The
kernel takes an adapter's tokens in blocks of 8 (the last <= 4 in a block of 4), transposes the
block's x to (n, W), and walks the adapter's CSR once per block: each value v_k at column j_k
does one W-wide ``acc += v_k * xt[j_k, :]`` from a contiguous slice, in a vector register
(:mod:`.vector_ops`), two output rows at a time (two independent add chains). So the values and
column indices stream once per block instead of once per token, and each read feeds W
multiply-adds. Measured on one 512 x 1376 layer, 4 adapters x 4 tokens, fp32, 1 thread: 0.13-0.15
ns per multiply-add with the arrays in cache (the previous kernel, one token at a time with a
scalar gather: 1.15-1.25), ~0.2-0.35 with them streamed from memory, as in a model's step.

Each lane's sum runs in CSR order from +0.0 and multiplies each value (already times its scale)
by x without a fused multiply-add, then adds the sum to y: what the per-group sparse product
does, so the results are bit-identical to it. The arrays are laid out again when an adapter of
a call is not in them or has changed (its values' and indices' storage and version, and its scale,
are compared; the arena holds its adapters, so a deleted adapter's id or memory cannot be taken
by a new one while the arena could still match it).

Used for inference on CPU (no gradient: training keeps the sparse product, whose values get their
gradient from autograd), fp32/fp64, when numba imports; anything else takes the per-group path.
Compiled on first use; numba caches the machine code like ``cpu_sddmm``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch

from .lazy import once

try:  # numba is a dependency, but the torch path must keep working without it
    import numba
except ImportError:  # pragma: no cover
    numba = None

AVAILABLE = numba is not None
_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}


@once
def _kernel():
    from .vector_ops import lane, step, zeros4, zeros8

    options = dict(nogil=True, cache=True)

    @numba.njit(**options)
    def transpose_block(x, tok, t0, tw, xt, w):  # pragma: no cover - numba
        # xt[j * w + t] = x[tok[t0 + t], j] for t < tw, zero-padded to w lanes: each value's
        # column then reads its w tokens as one contiguous vector
        for j in range(x.shape[1]):
            for t in range(w):
                xt[j * w + t] = x[tok[t0 + t], j] if t < tw else 0

    @numba.njit(**options)
    def add_block(crow, col, vals, c0, n0, xt, tok, t0, tw, y, zero):  # pragma: no cover - numba
        # y[tok[t0 + t], i] += sum over row i of the adapter's CSR of v_k * x[tok[t0 + t], j_k] for
        # t < tw, all W tokens in one vector (zero's width); in CSR order, one chain per lane, two
        # rows at a time (two independent chains: the loop is bound by the add's latency)
        m = y.shape[1]
        i = 0
        while i < m:
            pair = i + 1 < m
            k1, e1 = n0 + crow[c0 + i], n0 + crow[c0 + i + 1]
            e2 = n0 + crow[c0 + i + 2] if pair else e1
            acc1, acc2 = zero, zero
            both = min(e1 - k1, e2 - e1)
            for j in range(both):
                acc1 = step(acc1, xt, col, vals, k1 + j)
                acc2 = step(acc2, xt, col, vals, e1 + j)
            for k in range(k1 + both, e1):
                acc1 = step(acc1, xt, col, vals, k)
            for k in range(e1 + both, e2):
                acc2 = step(acc2, xt, col, vals, k)
            for t in range(tw):
                y[tok[t0 + t], i] += lane(acc1, t)
                if pair:
                    y[tok[t0 + t], i + 1] += lane(acc2, t)
            i += 2

    @numba.njit(**options)
    def add_rows(crow, col, vals, crow_start, nnz_start, which, tokens, x, y):  # pragma: no cover - numba
        # token row r = b * tokens + t belongs to batch row b, adapter which[b] (-1: none). Per
        # adapter, its token rows in blocks of 8 (or 4 for the last <= 4), x transposed per block.
        n_adapters = crow_start.shape[0]
        starts = np.zeros(n_adapters + 1, np.int64)
        for b in range(which.shape[0]):
            if which[b] >= 0:
                starts[which[b] + 1] += tokens
        for a in range(n_adapters):
            starts[a + 1] += starts[a]
        tok = np.empty(starts[n_adapters], np.int64)
        fill = starts[:n_adapters].copy()
        for b in range(which.shape[0]):
            if which[b] >= 0:
                for t in range(tokens):
                    tok[fill[which[b]]] = b * tokens + t
                    fill[which[b]] += 1
        xt = np.empty(8 * x.shape[1], x.dtype)
        for a in range(n_adapters):
            t0 = starts[a]
            while t0 < starts[a + 1]:
                tw = min(8, starts[a + 1] - t0)
                if tw > 4:
                    transpose_block(x, tok, t0, tw, xt, 8)
                    add_block(crow, col, vals, crow_start[a], nnz_start[a], xt, tok, t0, tw, y, zeros8(xt))
                else:
                    transpose_block(x, tok, t0, tw, xt, 4)
                    add_block(crow, col, vals, crow_start[a], nnz_start[a], xt, tok, t0, tw, y, zeros4(xt))
                t0 += tw

    return add_rows


def blocks(tokens: int) -> tuple[int, int]:
    """How the kernel runs a group of ``tokens`` tokens: (blocks of 8, blocks of 4). Each block
    reads the adapter's values once; a block of 4 (the last <= 4 tokens) costs less per value."""
    eights, rest = divmod(tokens, 8)
    return (eights + 1, 0) if rest > 4 else (eights, int(rest > 0))


@dataclass
class _Arena:
    """A layer's SHiRA adapters' CSR arrays laid end to end, and where each one starts."""

    dtype: torch.dtype
    adapters: tuple  # held, so no other object can take an id (or a tensor address) in ``stamps``
    stamps: dict[int, tuple]  # id(adapter) -> its _stamp when laid out
    position: dict[int, int]  # id(adapter) -> its index in the arrays below
    crow: np.ndarray
    col: np.ndarray
    vals: np.ndarray  # each adapter's values times its scale, as the per-group sparse product takes them
    crow_start: np.ndarray
    nnz_start: np.ndarray


# layer -> its arena, laid out again when an adapter of a call is not in it or has changed since
# (a load, a write into its values or indices, a new scale). Kept between steps, so a batch's rows
# can come and go without gathering every adapter's arrays again on every layer of every step.
# Only the adapters a call uses are checked: with many adapters loaded, a step pays for its own.
_ARENAS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _narrow(cols: np.ndarray) -> np.ndarray:
    """Column indices as uint16 where they fit (inputs up to 65,536 wide): the kernel streams
    6 bytes per value instead of 8, and a decoding step's time is mostly that stream."""
    return cols.astype(np.uint16) if cols.size and int(cols.max()) < 1 << 16 else cols


def _stamp(adapter) -> tuple:
    # the module's dicts, not its attributes: this runs for every group of every layer of every
    # step, and Module.__getattr__ costs a microsecond a lookup
    w, idx = adapter._parameters["shira_weight"], adapter._buffers["shira_indices"]
    return (w.data_ptr(), w._version, w.dtype, w.is_cpu, idx.data_ptr(), idx._version, adapter.scale)


def _fits(adapter, dtype: torch.dtype) -> bool:
    w = adapter.shira_weight
    return w.dtype == dtype and w.is_cpu and adapter.shira_indices.is_cpu


def _arena(layer, kind: type, dtype: torch.dtype, used: list) -> _Arena | None:
    """The layer's arena holding ``used`` (adapters) current, laid out again if needed; None when
    one of them cannot go in (another dtype, not on CPU)."""
    arena = _ARENAS.get(layer)
    if arena is not None and arena.dtype == dtype and all(arena.stamps.get(id(a)) == _stamp(a) for a in used):
        return arena
    if not all(_fits(a, dtype) for a in used):
        return None
    adapters = [a for a in layer.adapters.values() if isinstance(a, kind) and _fits(a, dtype)]
    crows, cols = zip(*(a.pattern().csr_int32() for a in adapters))
    crow_start = np.cumsum([0] + [c.numel() for c in crows[:-1]], dtype=np.int64)
    nnz_start = np.cumsum([0] + [c.numel() for c in cols[:-1]], dtype=np.int64)
    values = torch.cat([a.shira_weight.detach() * a.scale for a in adapters])
    arena = _Arena(dtype, tuple(adapters), {id(a): _stamp(a) for a in adapters},
                   {id(a): i for i, a in enumerate(adapters)}, torch.cat(crows).numpy(),
                   _narrow(torch.cat(cols).numpy()), values.numpy(), crow_start, nnz_start)
    _ARENAS[layer] = arena
    return arena


def can_group(y: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether :func:`add_grouped` may apply: inference on CPU, fp32/fp64, numba present (the
    adapters' own dtype and device are checked by it)."""
    if not AVAILABLE or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    return y.dtype in _NUMPY and x.dtype == y.dtype and y.is_cpu and x.is_cpu and y.is_contiguous()


def add_grouped(layer, y: torch.Tensor, x: torch.Tensor, groups: list[tuple[object, torch.Tensor]],
                kind: type) -> bool:
    """``y[rows] += adapter's delta of x[rows]`` for every (SHiRA adapter of ``layer``, row indices)
    group, in place, one kernel call (groups' rows are disjoint; rows in no group are untouched).
    False, and nothing done, when an adapter cannot take part (another dtype or device)."""
    arena = _arena(layer, kind, y.dtype, [adapter for adapter, _ in groups])
    if arena is None:
        return False
    batch = x.shape[0]
    which = np.full(batch, -1, dtype=np.int32)
    for adapter, rows in groups:
        which[rows.numpy()] = arena.position[id(adapter)]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y2 = y.view(-1, y.shape[-1])
    _kernel()(arena.crow, arena.col, arena.vals, arena.crow_start, arena.nnz_start, which,
              x2.shape[0] // batch, x2.numpy(), y2.numpy())
    return True
