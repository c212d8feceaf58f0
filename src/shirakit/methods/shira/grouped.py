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
(:mod:`.vector_ops`), four output rows at a time (four independent add chains over one run of
values: the rows' first values are stored interleaved by quads of rows, :func:`_quad_order`). So
the values and column indices stream once per block instead of once per token, and each read
feeds W multiply-adds. Measured on one 512 x 1376 layer, 4 adapters x 4 tokens, fp32, 1 thread:
0.12-0.15 ns per multiply-add with the arrays in cache (the previous kernel, one token at a time
with a scalar gather: 1.15-1.25), ~0.18-0.25 with them streamed from memory, as in a model's step
(quads instead of row pairs: 6-11% less; in a 512-wide model's decode step 2.00 -> 1.96 ms).

Each lane's sum runs in column order from +0.0 and multiplies each value (already times its scale)
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
    def transpose_block(x, tok, t0, tw, xt, w, zero):  # pragma: no cover - numba
        # xt[j * w + t] = x[tok[t0 + t], j] for t < tw, zero-padded to w lanes: each value's
        # column then reads its w tokens as one contiguous vector. The w rows are named up front
        # (a missing token reads the zero row), so the loop is straight stores LLVM can schedule:
        # ~6x faster than a loop over lanes with a test per element
        r0 = x[tok[t0]]
        r1 = x[tok[t0 + 1]] if tw > 1 else zero
        r2 = x[tok[t0 + 2]] if tw > 2 else zero
        r3 = x[tok[t0 + 3]] if tw > 3 else zero
        if w == 4:
            for j in range(x.shape[1]):
                xt[4 * j], xt[4 * j + 1], xt[4 * j + 2], xt[4 * j + 3] = r0[j], r1[j], r2[j], r3[j]
            return
        r4 = x[tok[t0 + 4]] if tw > 4 else zero
        r5 = x[tok[t0 + 5]] if tw > 5 else zero
        r6 = x[tok[t0 + 6]] if tw > 6 else zero
        r7 = x[tok[t0 + 7]] if tw > 7 else zero
        for j in range(x.shape[1]):
            xt[8 * j], xt[8 * j + 1], xt[8 * j + 2], xt[8 * j + 3] = r0[j], r1[j], r2[j], r3[j]
            xt[8 * j + 4], xt[8 * j + 5], xt[8 * j + 6], xt[8 * j + 7] = r4[j], r5[j], r6[j], r7[j]

    @numba.njit(**options)
    def add_pair(col, vals, xt, k1, e1, k2, e2, acc1, acc2):  # pragma: no cover - numba
        # two rows' sums continued over their values [k1, e1) and [k2, e2): side by side (two
        # independent chains) while both have values, then each alone
        both = min(e1 - k1, e2 - k2)
        for j in range(both):
            acc1 = step(acc1, xt, col, vals, k1 + j)
            acc2 = step(acc2, xt, col, vals, k2 + j)
        for k in range(k1 + both, e1):
            acc1 = step(acc1, xt, col, vals, k)
        for k in range(k2 + both, e2):
            acc2 = step(acc2, xt, col, vals, k)
        return acc1, acc2

    @numba.njit(**options)
    def add_block(crow, col, vals, c0, n0, xt, tok, t0, tw, y, zero):  # pragma: no cover - numba
        # y[tok[t0 + t], i] += sum over row i of the adapter's S of v_k * x[tok[t0 + t], j_k] for
        # t < tw, all W tokens in one vector (zero's width), each row's values in column order.
        # Rows by quads (laid out by _quad_order): the first `common` values of the 4 rows
        # interleaved, 4 independent chains, then each row's remaining values
        m = y.shape[1]
        full = m - m % 4
        for q in range(0, full, 4):
            r0, r1, r2, r3, r4 = crow[c0 + q], crow[c0 + q + 1], crow[c0 + q + 2], crow[c0 + q + 3], crow[c0 + q + 4]
            common = min(min(r1 - r0, r2 - r1), min(r3 - r2, r4 - r3))
            a0, a1, a2, a3 = zero, zero, zero, zero
            k = n0 + r0
            for _ in range(common):
                a0 = step(a0, xt, col, vals, k)
                a1 = step(a1, xt, col, vals, k + 1)
                a2 = step(a2, xt, col, vals, k + 2)
                a3 = step(a3, xt, col, vals, k + 3)
                k += 4
            e0 = k + r1 - r0 - common
            e1 = e0 + r2 - r1 - common
            e2 = e1 + r3 - r2 - common
            a0, a1 = add_pair(col, vals, xt, k, e0, e0, e1, a0, a1)
            a2, a3 = add_pair(col, vals, xt, e1, e2, e2, e2 + r4 - r3 - common, a2, a3)
            for t in range(tw):
                r = tok[t0 + t]
                y[r, q] += lane(a0, t)
                y[r, q + 1] += lane(a1, t)
                y[r, q + 2] += lane(a2, t)
                y[r, q + 3] += lane(a3, t)
        for i in range(full, m):  # the last m % 4 rows: as in CSR
            k, e = n0 + crow[c0 + i], n0 + crow[c0 + i + 1]
            acc, _ = add_pair(col, vals, xt, k, e, e, e, zero, zero)
            for t in range(tw):
                y[tok[t0 + t], i] += lane(acc, t)

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
        zero = np.zeros(x.shape[1], x.dtype)
        for a in range(n_adapters):
            t0 = starts[a]
            while t0 < starts[a + 1]:
                tw = min(8, starts[a + 1] - t0)
                if tw > 4:
                    transpose_block(x, tok, t0, tw, xt, 8, zero)
                    add_block(crow, col, vals, crow_start[a], nnz_start[a], xt, tok, t0, tw, y, zeros8(xt))
                else:
                    transpose_block(x, tok, t0, tw, xt, 4, zero)
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
    adapters: tuple  # held, so no other object can take an id in ``stamps``
    sources: tuple  # their values and indices as laid out, held: no new tensor can take their addresses
    stamps: dict[int, tuple]  # id(adapter) -> its _stamp when laid out
    position: dict[int, int]  # id(adapter) -> its index in the arrays below
    crow: np.ndarray
    col: np.ndarray  # in the kernel's order (_quad_order), as vals
    vals: np.ndarray  # each adapter's values times its scale, as the per-group sparse product takes them
    crow_start: np.ndarray
    nnz_start: np.ndarray

    def holds_current(self, groups: list) -> bool:
        """Are the groups' adapters all laid out here, unchanged since? (a plain loop: it runs for
        every layer of every step, on objects a step's dense products have evicted from cache)"""
        stamps = self.stamps
        for adapter, _ in groups:
            if stamps.get(id(adapter)) != _stamp(adapter):
                return False
        return True


# layer -> its arena, laid out again when an adapter of a call is not in it or has changed since
# (a load, a write into its values or indices, a new scale). Kept between steps, so a batch's rows
# can come and go without gathering every adapter's arrays again on every layer of every step.
# Only the adapters a call uses are checked: with many adapters loaded, a step pays for its own.
_ARENAS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

# (batch, (id(rows), rows._version, arena position) per group) -> (which, the row tensors): every
# layer of a step gets the same row tensors (the route's, cached) and, as a rule, the same
# positions, so the per-row adapter index is built once per step, not once per layer. The row
# tensors are held, so their ids stay unique; an in-place write changes the version, so the key.
_WHICH: dict[tuple, tuple[np.ndarray, list]] = {}
_WHICH_KEPT = 64


def _quad_order(crow: np.ndarray) -> np.ndarray:
    """The kernel's order of one adapter's CSR values (``crow``: m + 1 row offsets): position p of
    the layout holds CSR value ``order[p]``. Rows go by quads (4i .. 4i + 3); a quad keeps its CSR
    span but stores the first ``common`` (its shortest row's length) values of its 4 rows
    interleaved -- row 0's j-th, row 1's j-th, row 2's, row 3's, then the (j + 1)-th -- and then each
    row's remaining values in turn (sliced ELLPACK with slices of 4 rows, Kreutzer et al. 2014,
    arXiv 1307.6209, the remainders kept as CSR). The kernel streams one run of values for 4
    independent sums; each row's values stay in column order. The last m % 4 rows stay as in CSR."""
    m = crow.size - 1
    lengths = np.diff(crow)
    common = np.zeros(m, np.int64)
    full = m - m % 4
    common[:full] = np.repeat(lengths[:full].reshape(-1, 4).min(axis=1), 4)
    row = np.repeat(np.arange(m), lengths)
    first = row - row % 4  # each value's quad's first row
    j = np.arange(crow[-1]) - crow[row]  # its place in its row
    rest = lengths - common
    rest_before = np.cumsum(rest) - rest  # remaining values of earlier rows, from row 0
    in_rest = crow[first] + 4 * common[row] + rest_before[row] - rest_before[first] + j - common[row]
    new = np.where(j < common[row], crow[first] + 4 * j + row % 4, in_rest)
    order = np.empty_like(new)
    order[new] = np.arange(new.size)
    return order


def _narrow(cols: np.ndarray) -> np.ndarray:
    """Column indices as uint16 where they fit (inputs up to 65,536 wide): the kernel streams
    6 bytes per value instead of 8, and a decoding step's time is mostly that stream."""
    return cols.astype(np.uint16) if cols.size and int(cols.max()) < 1 << 16 else cols


def _stamp(adapter) -> tuple:
    # the module's dicts, not its attributes: this runs for every group of every layer of every
    # step, and Module.__getattr__ costs a microsecond a lookup. Addresses and versions suffice:
    # the arena holds the tensors it was laid out from (``sources``), so no tensor of another
    # dtype or device can take the same address while it could match
    w, idx = adapter._parameters["shira_weight"], adapter._buffers["shira_indices"]
    return (w.data_ptr(), w._version, idx.data_ptr(), idx._version, adapter.scale)


def _fits(adapter, dtype: torch.dtype) -> bool:
    w = adapter.shira_weight
    return w.dtype == dtype and w.is_cpu and adapter.shira_indices.is_cpu


def _arena(layer, kind: type, dtype: torch.dtype, groups: list) -> _Arena | None:
    """The layer's arena holding the groups' adapters current, laid out again if needed; None when
    one of them cannot go in (another dtype, not on CPU)."""
    arena = _ARENAS.get(layer)
    if arena is not None and arena.dtype == dtype and arena.holds_current(groups):
        return arena
    if not all(_fits(a, dtype) for a, _ in groups):
        return None
    adapters = [a for a in layer.adapters.values() if isinstance(a, kind) and _fits(a, dtype)]
    crows, cols = zip(*(a.pattern().csr_int32() for a in adapters))
    crow_start = np.cumsum([0] + [c.numel() for c in crows[:-1]], dtype=np.int64)
    nnz_start = np.cumsum([0] + [c.numel() for c in cols[:-1]], dtype=np.int64)
    order = np.concatenate([_quad_order(c.numpy()) + start for c, start in zip(crows, nnz_start)])
    values = torch.cat([a.shira_weight.detach() * a.scale for a in adapters]).numpy()[order]
    sources = tuple((a.shira_weight.detach(), a.shira_indices) for a in adapters)
    arena = _Arena(dtype, tuple(adapters), sources, {id(a): _stamp(a) for a in adapters},
                   {id(a): i for i, a in enumerate(adapters)}, torch.cat(crows).numpy(),
                   _narrow(torch.cat(cols).numpy()[order]), values, crow_start, nnz_start)
    _ARENAS[layer] = arena
    return arena


def _which(arena: _Arena, groups: list, batch: int) -> np.ndarray:
    """int32 per batch row: its adapter's index in the arena, -1 for none (see ``_WHICH``)."""
    position = arena.position
    try:
        key = (batch, *[(id(rows), rows._version, position[id(adapter)]) for adapter, rows in groups])
    except RuntimeError:  # an inference tensor has no version counter: not kept (the route's have one)
        key = None
    kept = _WHICH.get(key)
    if kept is not None:
        return kept[0]
    which = np.full(batch, -1, dtype=np.int32)
    for adapter, rows in groups:
        which[rows.numpy()] = position[id(adapter)]
    if key is not None:
        if len(_WHICH) >= _WHICH_KEPT:
            _WHICH.clear()
        _WHICH[key] = (which, [rows for _, rows in groups])
    return which


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
    arena = _arena(layer, kind, y.dtype, groups)
    if arena is None:
        return False
    batch = x.shape[0]
    which = _which(arena, groups, batch)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    _kernel()(arena.crow, arena.col, arena.vals, arena.crow_start, arena.nnz_start, which,
              x2.shape[0] // batch, x2.numpy(), y.view(-1, y.shape[-1]).numpy())
    return True


@dataclass
class PackedRows:
    """Several sparse deltas of one (m, n) weight laid out for the grouped kernel, for callers that keep
    their deltas outside shirakit's layers (vLLM's workers, ``integrations/vllm/rows.py``)."""

    shape: tuple[int, int]
    crow: np.ndarray
    col: np.ndarray
    vals: np.ndarray
    crow_start: np.ndarray
    nnz_start: np.ndarray


def pack_rows(shape: tuple[int, int], deltas: list[tuple[torch.Tensor, torch.Tensor]],
              dtype: torch.dtype = torch.float32) -> PackedRows:
    """Lay out deltas ``(flat positions sorted ascending, values with their scale folded in)`` of one
    ``shape`` weight end to end in the kernel's order; delta ``a`` is index ``a`` of :func:`add_packed_rows`."""
    if dtype not in _NUMPY:
        raise ValueError(f"the grouped kernel takes float32 or float64, found {dtype}")
    m, n = shape
    crows, cols, values = [], [], []
    for positions, vals in deltas:
        positions = positions.cpu().long()
        if positions.numel() > 1 and not bool((positions[1:] > positions[:-1]).all()):
            raise ValueError("pack_rows: positions must be sorted ascending and unique")
        rows = positions // n
        crow = torch.zeros(m + 1, dtype=torch.int64)
        crow[1:] = torch.bincount(rows, minlength=m).cumsum(0)
        crows.append(crow.int().numpy())
        cols.append((positions % n).int().numpy())
        values.append(vals.detach().cpu().to(dtype).numpy())
    crow_start = np.cumsum([0] + [c.size for c in crows[:-1]], dtype=np.int64)
    nnz_start = np.cumsum([0] + [c.size for c in cols[:-1]], dtype=np.int64)
    order = np.concatenate([_quad_order(c) + start for c, start in zip(crows, nnz_start)])
    return PackedRows(shape, np.concatenate(crows), _narrow(np.concatenate(cols)[order]),
                      np.concatenate(values)[order], crow_start, nnz_start)


def add_packed_rows(packed: PackedRows, which: np.ndarray, x: torch.Tensor, y: torch.Tensor) -> None:
    """``y[t] += delta_{which[t]} x[t]`` for every token row t with ``which[t] >= 0`` (int32, one per row
    of the 2-D ``x`` (T, n) and ``y`` (T, m), both contiguous CPU tensors of the packed dtype), in place,
    one kernel call: the same sums, in the same order, as :func:`add_grouped`."""
    _kernel()(packed.crow, packed.col, packed.vals, packed.crow_start, packed.nnz_start, which, 1,
              x.numpy(), y.numpy())


# ---- CUDA: the same grouped delta by one Triton launch (methods/shira/triton_kernels.py) ----------

@dataclass
class _DeviceArena:
    """A layer's SHiRA adapters' CSR arrays end to end on their device, for the Triton kernel (plain
    CSR order: the kernel takes a block of rows and walks their values side by side)."""

    dtype: torch.dtype
    adapters: tuple  # held, as in _Arena
    sources: tuple
    stamps: dict[int, tuple]
    position: dict[int, int]
    crow: torch.Tensor  # int32
    col: torch.Tensor  # int32
    vals: torch.Tensor  # values times scale, in the adapters' dtype
    crow_start: torch.Tensor  # int64
    nnz_start: torch.Tensor  # int64

    holds_current = _Arena.holds_current


_DEVICE_ARENAS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def can_group_on_device(y: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether :func:`add_grouped_on_device` may apply: inference, outside torch.compile, y and x
    of one float dtype that the Triton kernels take on their device (CUDA; CPU only when forced,
    see :func:`.triton_kernels.usable`), y contiguous."""
    from . import triton_kernels

    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    return x.dtype == y.dtype and y.is_contiguous() and x.device == y.device and triton_kernels.usable(y, x)


def _device_arena(layer, kind: type, y: torch.Tensor, groups: list) -> _DeviceArena | None:
    def fits(a) -> bool:
        return a.shira_weight.dtype == y.dtype and a.shira_weight.device == y.device \
            and a.shira_indices.device == y.device

    arena = _DEVICE_ARENAS.get(layer)
    if arena is not None and arena.dtype == y.dtype and arena.crow.device == y.device and arena.holds_current(groups):
        return arena
    if not all(fits(a) for a, _ in groups):
        return None
    adapters = [a for a in layer.adapters.values() if isinstance(a, kind) and fits(a)]
    crows, cols = zip(*(a.pattern().csr_int32() for a in adapters))
    crow_start = torch.tensor([0] + [c.numel() for c in crows[:-1]], dtype=torch.int64).cumsum(0)
    nnz_start = torch.tensor([0] + [c.numel() for c in cols[:-1]], dtype=torch.int64).cumsum(0)
    values = torch.cat([a.shira_weight.detach() * a.scale for a in adapters])
    sources = tuple((a.shira_weight.detach(), a.shira_indices) for a in adapters)
    arena = _DeviceArena(y.dtype, tuple(adapters), sources, {id(a): _stamp(a) for a in adapters},
                         {id(a): i for i, a in enumerate(adapters)}, torch.cat(crows), torch.cat(cols), values,
                         crow_start.to(y.device), nnz_start.to(y.device))
    _DEVICE_ARENAS[layer] = arena
    return arena


_WHICH_ON_DEVICE: dict[tuple, tuple[torch.Tensor, list]] = {}


def _which_on_device(arena: _DeviceArena, groups: list, batch: int, device: torch.device) -> torch.Tensor:
    """int32 per batch row on ``device``: its adapter's index in the arena, -1 for none. Built on
    the host and copied once, then kept for the step's other layers (keyed as ``_WHICH``): one small
    host-to-device copy per step, not one per group and layer."""
    position = arena.position
    try:
        key = (batch, str(device), *[(id(rows), rows._version, position[id(adapter)]) for adapter, rows in groups])
    except RuntimeError:  # inference tensors have no version counter: not kept
        key = None
    kept = _WHICH_ON_DEVICE.get(key)
    if kept is not None:
        return kept[0]
    which = torch.full((batch,), -1, dtype=torch.int32)
    for adapter, rows in groups:
        which[rows.cpu()] = position[id(adapter)]
    which = which.to(device)
    if key is not None:
        if len(_WHICH_ON_DEVICE) >= _WHICH_KEPT:
            _WHICH_ON_DEVICE.clear()
        _WHICH_ON_DEVICE[key] = (which, [rows for _, rows in groups])
    return which


def add_grouped_on_device(layer, y: torch.Tensor, x: torch.Tensor, groups: list[tuple[object, torch.Tensor]],
                          kind: type) -> bool:
    """:func:`add_grouped` on CUDA: every group's ``y[rows] += s x[rows] S^T`` in one Triton launch
    (fp32 sums, one rounding into y's dtype). False, and nothing done, when an adapter cannot take
    part (another dtype or device)."""
    from . import triton_kernels

    arena = _device_arena(layer, kind, y, groups)
    if arena is None:
        return False
    batch = x.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    which = _which_on_device(arena, groups, batch, y.device)
    triton_kernels.csr_rows(y.view(-1, y.shape[-1]), x2, arena.crow, arena.col, arena.vals, arena.crow_start,
                            arena.nnz_start, which)
    return True
