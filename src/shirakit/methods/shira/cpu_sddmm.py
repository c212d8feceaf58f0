"""SHiRA's value gradient on CPU: K sampled dot products in K x T work, on every core (numba).

The gradient of the K trained values of a layer ``y = x W^T`` (SHiRA, arXiv 2406.13175) is

    dL/dv_k = s * sum_t g[t, i_k] x[t, j_k]     g = dL/dy (T, m), x (T, n), k = 1..K

a sampled dense-dense product (SDDMM): K dots of length T, i.e. K*T multiply-adds, against the
m*n*T of one dense product (about 2% of it for r = 16 on a 1024 x 2816 layer).

How it runs: ``g`` and ``x`` are transposed once into fp32 buffers whose rows are the T-long
columns (padded to a multiple of 16 with zeros, and off power-of-two strides to dodge cache-set
conflicts), then every dot reads two contiguous rows. The positions are sorted row-major, so
consecutive k usually share their row of ``g``: the kernel takes them 8 (or 4) at a time, one
load of g's row feeding 8 accumulators. The transposes split the columns and the dots split the
K positions evenly over ``torch.get_num_threads()`` workers of a plain thread pool (the kernels
release the GIL); there is no spinning OpenMP barrier, which on a shared machine is what makes
``torch.sparse.sampled_addmm`` slower with more threads than with one.

Measured against ``torch.sparse.sampled_addmm`` (``benchmarks/value_grad.py``): faster at every
shape and thread count measured, so it replaces it on CPU whenever numba imports; fp64 inputs and
other devices (CUDA: cuSPARSE's sampled_addmm) keep the torch path. Half-precision g and x are
upcast to fp32 inside the transposes (exact), accumulation is fp32.

Compilation: numba compiles the three kernels on first use (about a second) and caches the machine
code next to this file, or in numba's user cache when that folder is read-only
(``NUMBA_CACHE_DIR`` overrides both); the cache is keyed by this file's path and timestamp.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .lazy import once

try:  # numba is a dependency, but the torch path must keep working without it
    import numba
except ImportError:  # pragma: no cover - exercised by monkeypatching AVAILABLE in the tests
    numba = None

AVAILABLE = numba is not None
_PAD = 16  # a row holds T rounded up to this many floats (one AVX-512 vector)
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

    @numba.njit("void(float32[:, ::1], float32[:, ::1], int64, int64)", **options)
    def transpose_fp32(src, dst, c0, c1):
        """dst[c, t] = src[t, c] for columns c in [c0, c1), in 16 x 64 blocks that stay in L1."""
        rows = src.shape[0]
        for t0 in range(0, rows, 16):
            t1 = min(t0 + 16, rows)
            for cb in range(c0, c1, 64):
                for c in range(cb, min(cb + 64, c1)):
                    for t in range(t0, t1):
                        dst[c, t] = src[t, c]

    @numba.njit("void(float32[:, ::1], float32[:, ::1], int64[::1], int64[::1], float32[::1], int64, int64)",
                fastmath=True, **options)
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

    return transpose_fp32, dots


def _workers() -> ThreadPoolExecutor:
    """One process-wide pool; a forked child (a DataLoader worker) gets a new one, as the parent's
    threads do not exist there."""
    global _pool, _pool_pid
    with _lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1), thread_name_prefix="shirakit-sddmm")
            _pool_pid = os.getpid()
        return _pool


def _run_split(fn, args: tuple, total: int, parts: int) -> None:
    """fn(*args, start, stop) over [0, total) cut into ``parts`` even pieces; the first runs here."""
    parts = max(1, min(parts, total))
    bounds = [total * p // parts for p in range(parts + 1)]
    pending = [_workers().submit(fn, *args, bounds[p], bounds[p + 1]) for p in range(1, parts)]
    try:
        fn(*args, bounds[0], bounds[1])
    finally:
        for job in pending:
            job.result()


def _padded_width(tokens: int) -> int:
    width = -(-tokens // _PAD) * _PAD
    return width + _PAD if width % 128 == 0 else width  # a 2^k-byte row stride maps rows to few cache sets


def _scratch_buffer(slot: int, count: int) -> torch.Tensor:
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


def _columns_as_rows(src: torch.Tensor, threads: int, slot: int) -> np.ndarray:
    """``src`` (T, c) -> fp32 (c, padded T) with zeros past T: each column becomes a contiguous row."""
    tokens, cols = src.shape
    width = _padded_width(tokens)
    dst = _scratch_buffer(slot, cols * width).view(cols, width)
    dst[:, tokens:].zero_()
    if src.dtype == torch.float32:
        transpose_fp32, _ = _kernels()
        _run_split(transpose_fp32, (src.contiguous().numpy(), dst.numpy()), cols, threads)
    else:  # bf16/fp16: torch converts exactly while it transposes
        dst[:, :tokens].copy_(src.T)
    return dst.numpy()


def value_grad(
    grad_out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, threads: int | None = None
) -> torch.Tensor:
    """(K,) fp32: out[k] = sum_t grad_out[t, rows[k]] * x[t, cols[k]] over all leading dims of the inputs.

    ``rows``/``cols``: int64, contiguous, on CPU, sorted row-major (so equal rows are adjacent; any
    order is correct, sorted is fast). ``threads``: default ``torch.get_num_threads()``. Callers
    check :func:`usable` first.
    """
    g2 = grad_out.detach().reshape(-1, grad_out.shape[-1])
    x2 = x.detach().reshape(-1, x.shape[-1])
    count = rows.numel()
    out = torch.empty(count, dtype=torch.float32)
    if count == 0:
        return out
    if g2.shape[0] == 0:
        return out.zero_()
    threads = threads or torch.get_num_threads()
    g_rows = _columns_as_rows(g2, threads, slot=0)
    x_rows = _columns_as_rows(x2, threads, slot=1)
    _, dots = _kernels()
    _run_split(dots, (g_rows, x_rows, rows.numpy(), cols.numpy(), out.numpy()), count, threads)
    return out
