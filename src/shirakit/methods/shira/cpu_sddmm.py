"""SHiRA's value gradient on CPU: K sampled dot products in K x T work, on every core (C or numba).

The gradient of the K trained values of a layer ``y = x W^T`` (SHiRA, arXiv 2406.13175) is

    dL/dv_k = s * sum_t g[t, i_k] x[t, j_k]     g = dL/dy (T, m), x (T, n), k = 1..K

a sampled dense-dense product (SDDMM): K dots of length T, i.e. K*T multiply-adds, against the
m*n*T of one dense product (about 2% of it for r = 16 on a 1024 x 2816 layer).

How it runs: ``g`` and ``x`` are transposed into fp32 buffers whose rows are the T-long columns
(padded to a multiple of 16 with zeros, and off power-of-two strides to dodge cache-set
conflicts), then every dot reads two contiguous rows. The positions are sorted row-major, so
consecutive k usually share their row of ``g``: the kernel takes a run of up to 8 at a time, one
load of g's row feeding 8 accumulators.

Two implementations of the transposes and the dots, with the same results up to fp32 rounding:

- C (:mod:`native_sddmm`, ``native_sddmm.c``), compiled with the system compiler at first use
  and cached: the transposes go through LANES x LANES register blocks (16 with AVX-512, else 8),
  the dots are LANES floats wide, 8 sums in registers, one shuffle-tree reduction per run. On this
  project's AVX2 machine (2.0 GHz EPYC, 2026-12-04, 1 thread, T = 512, r = 16): the dots 8.4-10
  GMAC/s with x's rows in L2/L3 (11.6 with them in L2, 5.3 for a 2816-wide x that spills L3:
  ~80% of the 9-loads-per-8-FMAs bound), the transposes at about memcpy speed (0.41 ms for 1024
  columns, 1.7 ms for 2816). Until then the sums were 16 floats wide on every machine: on AVX2 the
  8 accumulators then needed all 16 registers, GCC kept them on the stack and the dots ran at 2.3.
- numba (the fallback without a compiler, or with ``SHIRAKIT_NATIVE=0``): the transposes go by
  16 x 16 blocks through a small tile, element by element above 2048 columns
  (``_TILED_MAX_COLUMNS``); numba vectorizes the 8-run dot loop only 4 floats wide.

In a training step of the 576 x 1536 benchmark model (2 layers x 7 projections, T = 512, r = 16)
the 14 value gradients take about 31 ms at 1 thread and 20 ms at 2 (C kernels; measured inside
the step, where g and x come from memory; ``benchmarks/struct_step.py`` for the whole step).

Projections that read the same input (q/k/v, gate/up) share its transpose: the last two
transposed inputs are kept per thread, each holding a reference to its source tensor (so its
memory cannot become another tensor's while the entry lives), keyed by address, shape, strides,
dtype and version counter (an in-place write through any view bumps it).

Threads. The C kernels do a whole call (both transposes, then the dots) in one OpenMP parallel
region, on torch's own OpenMP workers where torch runs GNU OpenMP (see :mod:`native_sddmm`): the
threads that just ran torch's products, still spinning, take the pieces at once, dealt one at a
time (dynamic schedule). Calls of at least ``_MACS_PER_EXTRA_OPENMP_THREAD`` multiply-adds take a
second thread (in the benchmark models, every call). In the 2-thread step that took SHiRA / LoRA
from 0.99 to 0.965 (1024 x 2816) and from 0.98 to 0.97 (576 x 1536) against the same kernels on the
calling thread alone (interleaved in one process, 2026-12-04, benchmarks/struct_step.py).
Without OpenMP in the library (or in a forked child, or with a second OpenMP runtime in the
process) the Python pool runs them: the columns of a transpose and the K positions cut into a few
tasks per thread that workers of a plain thread pool (the kernels release the GIL) take one after
another, and there only calls above ``_MACS_PER_EXTRA_THREAD`` (64 M) spread out, as that pool
competes with torch's spinning workers.
Each value is one thread's dot in a fixed order, so the results do not depend on the threads.

Measured against ``torch.sparse.sampled_addmm`` before the AVX2 fix (``benchmarks/value_grad.py``,
2026-11-28, load 1.6; wall-time ratios): with x's transpose shared (k, v, up) 0.25-0.41x at 1 thread
and 0.30-0.72x at 2; with x transposed afresh 0.39-0.73x at 1 thread and 0.55-1.38x at 2. It stays
the CPU path whenever numba imports, since in a training step 3 of a layer's 7 calls share x, and
unlike sampled_addmm it handles bf16/fp16. fp64 inputs and other devices (CUDA: cuSPARSE's
sampled_addmm) keep the torch path. Half-precision g and x are upcast to fp32 (exact), and the
accumulation is fp32.

Compilation: the C kernels, see :mod:`native_sddmm`. numba compiles its kernels on first use
(about a second) and caches the machine code next to this file, or in numba's user cache when that
folder is read-only (``NUMBA_CACHE_DIR`` overrides both); the cache is keyed by this file's path
and timestamp.
"""

from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from . import native_sddmm
from .lazy import once

try:  # numba is a dependency, but the torch path must keep working without it
    import numba
except ImportError:  # pragma: no cover - exercised by monkeypatching AVAILABLE in the tests
    numba = None

AVAILABLE = numba is not None
_PAD = 16  # a row holds T rounded up to this many floats (one AVX-512 vector)
# The tiled transpose (16 columns over all tokens) is up to 2x faster than the element-wise one
# where rows are 4-8 KB apart (1024 and 2048 columns: 0.39 vs 0.78 ms, 1.05 vs 1.59 ms at 512
# tokens), ties at 576-1536, and is slower on wider sources (2816: 2.4 vs 1.4 ms; 4096: 4.1 vs
# 3.5; 5632: 6.9 vs 5.9), 1 thread, this project's machine, 2026-11-28.
_TILED_MAX_COLUMNS = 2048
_INDEX_TYPES = ("int64", "int32")  # position indices the kernel is compiled for (int32: half the bytes)
_TASKS_PER_THREAD = 3  # enough for a free worker to take over a slow one's share, few enough to dispatch
# By default a call takes one more worker per this many multiply-adds (K x T), so every call of the
# benchmark models (at most 31 M: 1024 x 2816, r = 16, T = 512, about 1.6 ms) runs on the calling
# thread alone. Why: in a backward, torch's OpenMP workers spin for a while after each product and
# take the cores the pool would use; measured in the 2-thread step (interleaved A/B, heavy lock,
# 2026-11-28): 576 x 1536 196 -> 190 ms per step; the 14 calls of the 1024 x 2816 step took 39 ms
# with the pool and 31 ms on the caller. Bigger calls (wide layers, long batches) still spread out.
_MACS_PER_EXTRA_THREAD = 64 * 2**20
# The same where the C kernels run on torch's own OpenMP workers (native_sddmm.openmp_here): those
# are the threads that spin after torch's products, so they take the work at once; only calls too
# small to pay for waking a second thread stay on the caller.
_MACS_PER_EXTRA_OPENMP_THREAD = 2 * 2**20
_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_pid = -1
# Transposed operands go to per-thread scratch kept between calls: a fresh multi-MB buffer per
# call costs its page faults every time (about 0.1 ms per MB). Buffers above this size are not kept.
_SCRATCH_KEEP_BYTES = 256 * 2**20
_scratch = threading.local()


def usable(g: torch.Tensor, x: torch.Tensor) -> bool:
    """Does this kernel handle these inputs? (CPU, a float type it can upcast to fp32 exactly.)"""
    ok_dtypes = (torch.float32, torch.bfloat16, torch.float16)
    return AVAILABLE and g.device.type == "cpu" and x.device.type == "cpu" and g.dtype in ok_dtypes \
        and x.dtype in ok_dtypes


@once
def _kernels():
    """The numba kernels, compiled (or loaded from numba's cache) at the first call."""
    options = dict(nogil=True, boundscheck=False, cache=True)

    @numba.njit(**options)
    def transpose_block(src, dst, t0, c0, c1, tile):
        """dst[c, t] = src[t, c] for 16 tokens from t0 and the columns [c0, c1), at most 16. A full
        16 x 16 block goes through ``tile``: both loops then read and write contiguous runs."""
        t1 = min(t0 + 16, src.shape[0])
        if t1 - t0 == 16 and c1 - c0 == 16:
            for i in range(16):
                for j in range(16):
                    tile[j, i] = src[t0 + i, c0 + j]
            for j in range(16):
                for i in range(16):
                    dst[c0 + j, t0 + i] = tile[j, i]
        else:
            for c in range(c0, c1):
                for t in range(t0, t1):
                    dst[c, t] = src[t, c]

    @numba.njit("void(float32[:, ::1], float32[:, ::1], int64, int64)", **options)
    def transpose_fp32(src, dst, c0, c1):
        """dst[c] = src[:, c] with zeros past T, for the columns c in [c0, c1)."""
        tokens = src.shape[0]
        dst[c0:c1, tokens:] = 0.0
        tile = np.empty((16, 16), dtype=np.float32)
        for c in range(c0, c1, 16):  # 16 columns at a time, all tokens: those 16 rows fill while in cache
            for t0 in range(0, tokens, 16):
                transpose_block(src, dst, t0, c, min(c + 16, c1), tile)

    @numba.njit("void(float32[:, ::1], float32[:, ::1], int64, int64)", **options)
    def transpose_wide_fp32(src, dst, c0, c1):
        """The same as :func:`transpose_fp32` in 16-token x 64-column blocks, element by element:
        faster where the source is wider than 2048 columns (see ``_TILED_MAX_COLUMNS``)."""
        tokens = src.shape[0]
        dst[c0:c1, tokens:] = 0.0
        for t0 in range(0, tokens, 16):
            t1 = min(t0 + 16, tokens)
            for cb in range(c0, c1, 64):
                for c in range(cb, min(cb + 64, c1)):
                    for t in range(t0, t1):
                        dst[c, t] = src[t, c]

    @numba.njit([f"void(float32[:, ::1], float32[:, ::1], {index}[::1], {index}[::1], float32[::1], int64, int64)"
                 for index in _INDEX_TYPES], fastmath=True, **options)
    def dots(a_rows, b_rows, ia, ib, out, start, stop):
        """out[k] = a_rows[ia[k]] . b_rows[ib[k]] for k in [start, stop); runs of equal ia share loads."""
        width = a_rows.shape[1]
        k = start
        while k < stop:
            a = a_rows[ia[k]]
            run = 1  # how many of the next positions share this row (any order is allowed)
            while run < 8 and k + run < stop and ia[k + run] == ia[k]:
                run += 1
            if run == 8:
                b0, b1, b2, b3 = b_rows[ib[k]], b_rows[ib[k + 1]], b_rows[ib[k + 2]], b_rows[ib[k + 3]]
                b4, b5, b6, b7 = b_rows[ib[k + 4]], b_rows[ib[k + 5]], b_rows[ib[k + 6]], b_rows[ib[k + 7]]
                s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.float32(0.0)
                for t in range(width):
                    at = a[t]
                    s0 += at * b0[t]
                    s1 += at * b1[t]
                    s2 += at * b2[t]
                    s3 += at * b3[t]
                    s4 += at * b4[t]
                    s5 += at * b5[t]
                    s6 += at * b6[t]
                    s7 += at * b7[t]
                out[k], out[k + 1], out[k + 2], out[k + 3] = s0, s1, s2, s3
                out[k + 4], out[k + 5], out[k + 6], out[k + 7] = s4, s5, s6, s7
                k += 8
            elif run >= 4:
                b0, b1, b2, b3 = b_rows[ib[k]], b_rows[ib[k + 1]], b_rows[ib[k + 2]], b_rows[ib[k + 3]]
                s0 = s1 = s2 = s3 = np.float32(0.0)
                for t in range(width):
                    at = a[t]
                    s0 += at * b0[t]
                    s1 += at * b1[t]
                    s2 += at * b2[t]
                    s3 += at * b3[t]
                out[k], out[k + 1], out[k + 2], out[k + 3] = s0, s1, s2, s3
                k += 4
            else:
                b = b_rows[ib[k]]
                acc = np.float32(0.0)
                for t in range(width):
                    acc += a[t] * b[t]
                out[k] = acc
                k += 1

    return transpose_fp32, transpose_wide_fp32, dots


def _workers() -> ThreadPoolExecutor:
    """One process-wide pool; a forked child (a DataLoader worker) gets a new one, as the parent's
    threads do not exist there."""
    global _pool, _pool_pid
    with _lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1), thread_name_prefix="shirakit-sddmm")
            _pool_pid = os.getpid()
        return _pool


def _run_tasks(fn, args: tuple, total: int, threads: int, align: int = 1) -> None:
    """fn(*args, start, stop) over [0, total) cut into a few tasks per thread (cuts at multiples of
    ``align``), taken in turn by ``threads`` workers, this thread one of them: whoever is free
    takes the next task."""
    parts = 1 if threads == 1 else threads * _TASKS_PER_THREAD
    cuts = {total * p // parts // align * align for p in range(1, parts)} - {0}
    bounds = [0, *sorted(c for c in cuts if c < total), total]
    next_task = itertools.count()  # next() on it is atomic under the GIL

    def work() -> None:
        for j in next_task:
            if j >= len(bounds) - 1:
                return
            fn(*args, bounds[j], bounds[j + 1])

    helpers = [_workers().submit(work) for _ in range(min(threads, len(bounds) - 1) - 1)]
    try:
        work()
    finally:
        for job in helpers:
            job.result()


def _padded_width(tokens: int) -> int:
    width = -(-tokens // _PAD) * _PAD
    return width + _PAD if width % 128 == 0 else width  # a 2^k-byte row stride maps rows to few cache sets


def _scratch_buffer(slot: object, count: int) -> torch.Tensor:
    """``count`` fp32 of this thread's scratch ``slot`` (grown on demand, reused across calls)."""
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    buffer = buffers.get(slot)
    if buffer is None or buffer.numel() < count:
        buffer = torch.empty(count, dtype=torch.float32)
        if count * 4 <= _SCRATCH_KEEP_BYTES:
            buffers[slot] = buffer
    return buffer[:count]


def _rows_buffer(slot: object, tokens: int, cols: int) -> torch.Tensor:
    """This thread's scratch ``slot`` as fp32 (cols, padded T): where a (T, cols) source's columns go."""
    return _scratch_buffer(slot, cols * _padded_width(tokens)).view(cols, _padded_width(tokens))


def _half_as_rows(src: torch.Tensor, dst: torch.Tensor) -> None:
    """bf16/fp16 ``src`` (T, c) into fp32 ``dst`` (c, padded T): torch converts exactly while it transposes."""
    tokens = src.shape[0]
    dst[:, tokens:].zero_()
    dst[:, :tokens].copy_(src.T)


def _columns_as_rows(src: torch.Tensor, threads: int, slot: object) -> torch.Tensor:
    """``src`` (T, c) -> fp32 (c, padded T) with zeros past T: each column becomes a contiguous row."""
    tokens, cols = src.shape
    dst = _rows_buffer(slot, tokens, cols)
    if src.dtype == torch.float32:
        native = native_sddmm.kernels()
        if native is not None:
            transpose = native.transpose_fp32
        else:
            tiled, wide, _ = _kernels()
            transpose = tiled if cols <= _TILED_MAX_COLUMNS else wide
        _run_tasks(transpose, (src.contiguous().numpy(), dst.numpy()), cols, threads, align=16)
    else:
        _half_as_rows(src, dst)
    return dst


def _input_key(x2: torch.Tensor) -> tuple:
    return (x2.data_ptr(), tuple(x2.shape), x2.stride(), x2.dtype, x2._version)


def _kept_inputs() -> list:
    kept = getattr(_scratch, "inputs", None)
    if kept is None:
        kept = _scratch.inputs = []  # [(key, source tensor, scratch slot, rows)], most recent first
    return kept


def _kept_input(x2: torch.Tensor) -> torch.Tensor | None:
    """x^T as rows if this thread kept it for this very input, unchanged (see :func:`_input_rows`)."""
    key = _input_key(x2)
    return next((entry[3] for entry in _kept_inputs() if entry[0] == key), None)


def _free_input_slot() -> object:
    """A scratch slot for a new kept input: a new one while fewer than two are kept, else the oldest's."""
    kept = _kept_inputs()
    return ("input", len(kept)) if len(kept) < 2 else kept.pop()[2]


def _keep_input(x2: torch.Tensor, slot: object, rows: torch.Tensor) -> None:
    # x2 held: its memory cannot become another tensor's while the entry lives
    _kept_inputs().insert(0, (_input_key(x2), x2, slot, rows))


def _input_rows(x2: torch.Tensor, threads: int) -> torch.Tensor:
    """x^T as rows (:func:`_columns_as_rows`), reused while the same unchanged input comes back
    (q, k and v read one input, gate and up another): the last two are kept per thread."""
    rows = _kept_input(x2)
    if rows is None:
        slot = _free_input_slot()
        rows = _columns_as_rows(x2, threads, slot)
        _keep_input(x2, slot, rows)
    return rows


def forget_inputs() -> None:
    """Drop this thread's kept transposed inputs, and with them the references to their sources."""
    _scratch.inputs = []


def _default_threads(macs: int, openmp: bool = False) -> int:
    """torch's thread count, capped at one thread per ``_MACS_PER_EXTRA_THREAD`` of work
    (``_MACS_PER_EXTRA_OPENMP_THREAD`` where the kernels run on torch's OpenMP workers)."""
    per_thread = _MACS_PER_EXTRA_OPENMP_THREAD if openmp else _MACS_PER_EXTRA_THREAD
    return max(1, min(torch.get_num_threads(), 1 + macs // per_thread))


def value_grad(
    grad_out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, threads: int | None = None
) -> torch.Tensor:
    """(K,) fp32: out[k] = sum_t grad_out[t, rows[k]] * x[t, cols[k]] over all leading dims of the inputs.

    ``rows``/``cols``: both int64 or both int32, contiguous, on CPU, sorted row-major (so equal rows
    are adjacent; any order is correct, sorted is fast). ``threads``: default
    ``torch.get_num_threads()``, but one per ``_MACS_PER_EXTRA_OPENMP_THREAD`` multiply-adds at most
    where the C kernels run on torch's OpenMP workers, else per ``_MACS_PER_EXTRA_THREAD`` (the
    calling thread alone for small calls, see there); given, it is used as is. Callers check
    :func:`usable` first. Each value is one thread's dot, whatever the threads: the results do not
    depend on them.
    """
    if rows.dtype != cols.dtype or rows.dtype not in (torch.int64, torch.int32) or rows.shape != cols.shape:
        raise TypeError(f"value_grad takes rows and cols of one shape, both int64 or both int32; found "
                        f"{rows.dtype} {tuple(rows.shape)} and {cols.dtype} {tuple(cols.shape)}")
    g2 = grad_out.detach().reshape(-1, grad_out.shape[-1])
    x2 = x.detach().reshape(-1, x.shape[-1])
    count = rows.numel()
    out = torch.empty(count, dtype=torch.float32)
    if count == 0:
        return out
    if g2.shape[0] == 0:
        return out.zero_()
    native = native_sddmm.kernels()
    openmp = native is not None and native_sddmm.openmp_here(native)
    threads = threads or _default_threads(count * g2.shape[0], openmp)
    rows, cols = rows.contiguous(), cols.contiguous()
    if native is not None and (threads == 1 or openmp):
        _native_value_grad(native, g2, x2, rows, cols, out, threads)
        return out
    positions = (rows.numpy(), cols.numpy())
    g_rows = _columns_as_rows(g2, threads, slot="grad").numpy()
    x_rows = _input_rows(x2, threads).numpy()
    dots = native.dots if native is not None else _kernels()[2]
    _run_tasks(dots, (g_rows, x_rows, *positions, out.numpy()), count, threads, align=8)
    return out


def _native_value_grad(native, g2: torch.Tensor, x2: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                       out: torch.Tensor, threads: int) -> None:
    """The C kernels in one call (transposes and dots, ``threads`` OpenMP threads): fp32 sources are
    transposed there, half-precision ones here by torch first; x's rows reused when kept. Called
    with addresses: a call costs a few microseconds of Python, not a hundred."""
    (tokens, m), n = g2.shape, x2.shape[1]
    width = _padded_width(tokens)
    g_rows = _rows_buffer("grad", tokens, m)
    g_src = g2.contiguous() if g2.dtype == torch.float32 else None
    if g_src is None:
        _half_as_rows(g2, g_rows)
    x_rows, x_src, slot = _kept_input(x2), None, None
    if x_rows is None:
        slot = _free_input_slot()
        x_rows = _rows_buffer(slot, tokens, n)
        x_src = x2.contiguous() if x2.dtype == torch.float32 else None
        if x_src is None:
            _half_as_rows(x2, x_rows)
    native.value_grad[rows.dtype](
        0 if g_src is None else g_src.data_ptr(), g_rows.data_ptr(), m, int(g_src is None),
        0 if x_src is None else x_src.data_ptr(), x_rows.data_ptr(), n, int(x_src is None), tokens, width,
        rows.data_ptr(), cols.data_ptr(), out.data_ptr(), out.numel(), threads)
    if slot is not None:
        _keep_input(x2, slot, x_rows)
