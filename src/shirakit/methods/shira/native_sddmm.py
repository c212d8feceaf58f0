"""The C value-gradient kernels (``native_sddmm.c``), compiled on first use; None where that fails.

Nothing is built at install: the first call compiles the C file with the system compiler
(``$CC``, else ``cc``, ``gcc`` or ``clang``; ``-O3 -march=native``, about a second) into a shared
library under the cache folder, named by a hash of the source, the compiler, its flags and this
machine's CPU, and later processes load that file. Cache folder: ``$SHIRAKIT_CACHE_DIR``, else
``$XDG_CACHE_HOME/shirakit`` or ``~/.cache/shirakit``, else a folder under the temp dir, the first
one writable. The library is written under a temporary name and renamed into place, so processes
compiling at once never load a half-written file.

Where there is no compiler, the build fails or ``SHIRAKIT_NATIVE=0`` is set, :func:`kernels`
returns None and :mod:`cpu_sddmm` keeps its numba kernels (same results within fp32 rounding).
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

from ...core.cache_dir import cache_dir_from_env, default_cache_dir
from .lazy import once

SOURCE = Path(__file__).with_suffix(".c")
FLAGS = ["-O3", "-march=native", "-shared", "-fPIC", "-std=gnu11"]
_POINTER, _LONG = ctypes.c_void_p, ctypes.c_long


class Kernels(NamedTuple):
    """The library's functions wrapped to take numpy arrays, with numba's kernels' signatures."""

    transpose_fp32: object  # (src (T, c) fp32, dst (c, W) fp32, c0, c1)
    dots: object  # (a_rows, b_rows, ia, ib, out, start, stop), ia/ib int64 or int32
    scatter_many: object  # (weights, indices, values, counts: int64 address arrays, element size)


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
    """The compiled library's path, compiling it unless a cache folder has it already."""
    source = SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(FLAGS).encode(),
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
            done = subprocess.run([compiler, *FLAGS, "-o", partial, str(SOURCE)], capture_output=True, text=True,
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

    return Kernels(transpose_fp32, dots, scatter_many)


@once
def kernels() -> Kernels | None:
    """The C kernels, or None (no compiler, a failed build, or ``SHIRAKIT_NATIVE=0``)."""
    if os.environ.get("SHIRAKIT_NATIVE", "1") == "0":
        return None
    compiler = _compiler()
    if compiler is None:
        return None
    try:
        return _wrap(ctypes.CDLL(str(_build(compiler))))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        warnings.warn(f"shirakit: the C value-gradient kernels did not build, numba's are used instead ({error})",
                      RuntimeWarning, stacklevel=2)
        return None
