"""The C value-gradient kernels (``native_sddmm.c``), compiled on first use; None where that fails.

Nothing is built at install: the first call compiles the C file with the system compiler
(``$CC``, else ``cc``, ``gcc`` or ``clang``; ``-O3 -march=native -ffp-contract=off -fopenmp``, about a second; without
``-fopenmp`` where the compiler has no OpenMP) into a shared
library under the cache folder, named by a hash of the source, the compiler, its flags and this
machine's CPU, and later processes load that file. Cache folder: ``$SHIRAKIT_CACHE_DIR``, else
``$XDG_CACHE_HOME/shirakit`` or ``~/.cache/shirakit``, else a folder under the temp dir, the first
one writable. The library is written under a temporary name and renamed into place, so processes
compiling at once never load a half-written file.

Where there is no compiler, the build fails or ``SHIRAKIT_NATIVE=0`` is set, :func:`kernels`
returns None and :mod:`cpu_sddmm` keeps its numba kernels (same results within fp32 rounding).

OpenMP: the library's ``libgomp.so.1`` is resolved by name when it loads, after torch, so in a
torch built with GNU OpenMP (the Linux wheels, which ship ``torch/lib/libgomp.so.1``) the kernels'
parallel regions run on torch's own OpenMP workers: those that just ran torch's products and are
still spinning take the work at once, and no second pool competes with them for the cores.
:attr:`Kernels.openmp` is True only then: built with OpenMP and one OpenMP runtime in the process
(a second one, e.g. torch on Intel's ``libiomp5``, would spin against the first one's workers; then
the threads come from :mod:`cpu_sddmm`'s pool as before).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ...core.cache_dir import cache_dir_from_env, default_cache_dir
from .lazy import once

SOURCE = Path(__file__).with_suffix(".c")
# -ffp-contract=off: GCC otherwise fused a multiply-add into one FMA in some of the inlined dot loops and
# not in others, so on an AVX2 CPU the one-call kernel and the per-task ``dots`` disagreed in the last bit
# (the kernels promise the same bits for every thread count and path); timed no slower here
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC", "-std=gnu11"]
OPENMP_FLAGS = ["-fopenmp"]  # tried first; a compiler without OpenMP builds the serial library
_POINTER, _LONG = ctypes.c_void_p, ctypes.c_long


class Kernels(NamedTuple):
    """The library's functions wrapped to take numpy arrays, with numba's kernels' signatures."""

    transpose_fp32: object  # (src (T, c) fp32, dst (c, W) fp32, c0, c1)
    dots: object  # (a_rows, b_rows, ia, ib, out, start, stop), ia/ib int64 or int32
    scatter_many: object  # (weights, indices, values, counts: int64 address arrays, element size)
    # {torch.int64 / int32: fn(g, g_rows, m, g_ready, x, x_rows, n, x_ready, T, W, ia, ib, out, K, threads)},
    # addresses and sizes (shirakit_value_grad_* in the C file): both transposes and the dots in one call
    value_grad: dict
    openmp: bool  # value_grad's threads run on the process's one OpenMP runtime (see the module doc)


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU's model and flags (Linux), else the platform."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        return next((line for line in info.splitlines() if line.startswith(("flags", "Features"))), info[:2000]) \
            + next((line for line in info.splitlines() if line.startswith("model name")), "")
    except OSError:
        return platform.platform() + platform.processor()


def cache_dirs() -> list[Path]:
    # Per user under the temp dir: a shared name there could be made by someone else first.
    user = os.getuid() if hasattr(os, "getuid") else "user"  # Windows: the temp dir is per user
    candidates = [cache_dir_from_env(), default_cache_dir(),
                  Path(tempfile.gettempdir()) / f"shirakit-cache-{user}"]
    return [Path(c) for c in candidates if c]


def _trusted(path: Path) -> bool:
    """May we load code from (or write code into) ``path``? Only if this user owns it and nobody
    else may write to it: a shared library runs code as it loads, so a file someone else could place
    or replace (a world-writable temp folder, a group-writable cache) would run their code here."""
    if not hasattr(os, "getuid"):  # no POSIX owners (Windows): the per-user folders are private
        return True
    try:
        info = path.stat()
    except OSError:
        return False
    return info.st_uid == os.getuid() and not info.st_mode & 0o022


def _build(compiler: str) -> Path:
    """The compiled library's path (with OpenMP where the compiler has it), compiling it unless a
    cache folder has it already."""
    try:
        return _build_with(compiler, FLAGS + OPENMP_FLAGS)
    except RuntimeError as error:
        if "failed:" not in str(error):  # no writable folder: the same without OpenMP
            raise
        return _build_with(compiler, FLAGS)


def _build_with(compiler: str, flags: list[str]) -> Path:
    source = SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(flags).encode(),
                                      _cpu_signature().encode()])).hexdigest()[:20]
    name = f"native_sddmm-{key}.so"
    for folder in cache_dirs():
        if (folder / name).is_file() and _trusted(folder) and _trusted(folder / name):
            return folder / name
    errors = []
    for folder in cache_dirs():
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not _trusted(folder):
                raise OSError("not owned by this user, or writable by others")
            handle, partial = tempfile.mkstemp(suffix=".so.partial", dir=folder)
            os.close(handle)
        except OSError as error:
            errors.append(f"{folder}: {error}")
            continue
        try:
            done = subprocess.run([compiler, *flags, "-o", partial, str(SOURCE)], capture_output=True, text=True,
                                  timeout=300)
            if done.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {done.stderr[-2000:]}")
            os.chmod(partial, 0o700)  # whatever the umask: loaded only while nobody else may write it
            os.replace(partial, folder / name)
            return folder / name
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    raise RuntimeError("no writable cache folder: " + "; ".join(errors))


def _wrap(library: ctypes.CDLL) -> Kernels:
    dots_by_index = {}
    for index, suffix in ((np.int64, "i64"), (np.int32, "i32")):
        fn = getattr(library, f"shirakit_dots_{suffix}")
        fn.argtypes = [_POINTER] * 5 + [_LONG] * 3
        fn.restype = None
        dots_by_index[np.dtype(index)] = fn
    transpose = library.shirakit_transpose_f32
    transpose.argtypes = [_POINTER, _LONG, _LONG, _POINTER, _LONG, _LONG, _LONG]
    transpose.restype = None

    def transpose_fp32(src: np.ndarray, dst: np.ndarray, c0: int, c1: int) -> None:
        transpose(src.ctypes.data, src.shape[0], src.shape[1], dst.ctypes.data, dst.shape[1], c0, c1)

    def dots(a_rows, b_rows, ia, ib, out, start: int, stop: int) -> None:
        dots_by_index[ia.dtype](a_rows.ctypes.data, b_rows.ctypes.data, ia.ctypes.data, ib.ctypes.data,
                                out.ctypes.data, a_rows.shape[1], start, stop)

    many = library.shirakit_scatter_many
    many.argtypes = [_LONG, _POINTER, _POINTER, _POINTER, _POINTER, _LONG]
    many.restype = None

    def scatter_many(weights: np.ndarray, indices: np.ndarray, values: np.ndarray, counts: np.ndarray,
                     size: int) -> None:
        many(len(weights), weights.ctypes.data, indices.ctypes.data, values.ctypes.data, counts.ctypes.data, size)

    value_grad = {}  # torch index dtype -> the C function, called with addresses (no numpy views: ~2 us each)
    for index, suffix in ((torch.int64, "i64"), (torch.int32, "i32")):
        fn = getattr(library, f"shirakit_value_grad_{suffix}")
        fn.argtypes = [_POINTER, _POINTER, _LONG, ctypes.c_int, _POINTER, _POINTER, _LONG, ctypes.c_int, _LONG, _LONG,
                       _POINTER, _POINTER, _POINTER, _LONG, _LONG]
        fn.restype = None
        value_grad[index] = fn

    probe = library.shirakit_openmp_threads
    probe.argtypes, probe.restype = [], _LONG
    return Kernels(transpose_fp32, dots, scatter_many, value_grad, probe() > 0 and _one_openmp_runtime())


def _one_openmp_runtime() -> bool:
    """Is one OpenMP runtime mapped in this process (Linux: read from /proc/self/maps)? Elsewhere
    we cannot tell, and say no: the kernels then keep to one thread per call."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    names = ("libgomp", "libiomp", "libomp")
    runtimes = {line.split()[-1] for line in maps.splitlines() if any(n in line.rsplit("/", 1)[-1] for n in names)}
    return len(runtimes) == 1


def openmp_here(native: Kernels) -> bool:
    """May ``native.value_grad`` take more than one thread in this process? Not in a forked child
    of the process that loaded the library: GNU OpenMP's workers do not survive a fork, and a
    parallel region in the child waits for them forever (torch's own products hang there as well)."""
    return native.openmp and os.getpid() == _loaded_in


_loaded_in = -1  # the process that loaded the library


@once
def kernels() -> Kernels | None:
    """The C kernels, or None (no compiler, a failed build, or ``SHIRAKIT_NATIVE=0``)."""
    if os.environ.get("SHIRAKIT_NATIVE", "1") == "0":
        return None
    compiler = _compiler()
    if compiler is None:
        return None
    global _loaded_in
    try:
        native = _wrap(ctypes.CDLL(str(_build(compiler))))
        _loaded_in = os.getpid()
        return native
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        warnings.warn(f"shirakit: the C value-gradient kernels did not build, numba's are used instead ({error})",
                      RuntimeWarning, stacklevel=2)
        return None
