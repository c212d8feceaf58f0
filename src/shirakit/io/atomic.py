"""Atomic file writes: a file is either the old one or the complete new one, never half."""

from __future__ import annotations

import os
import socket
import stat
import tempfile
from pathlib import Path


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask sets while reading)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _writer_tag() -> str:
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:64]
    return f"{os.getpid()}-{host}"


def write_temp_file(path: str | Path, data: bytes) -> str:
    """Write ``data`` to a new temp file ``.<name>.<pid>-<host>.<random>.tmp`` beside ``path``,
    fsynced; returns its name. The writer's tag lets a later save tell a dead writer's leftover
    from a live one's file (:func:`is_stale_temp`)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_writer_tag()}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # the usual permissions (0644 by default), not mkstemp's 0600
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def is_stale_temp(temp: Path, name: str) -> bool:
    """Was ``temp`` (a temp file of :func:`write_temp_file` for ``name``) left by a writer that is
    gone? Files of other hosts (a shared file system) and of live processes are not."""
    tag = temp.name[len(name) + 2 :].split(".", 1)[0]
    pid, _, host = tag.partition("-")
    if not pid.isdigit() or not host:
        return True  # not a tagged name: written by an older shirakit
    if host != _writer_tag().partition("-")[2]:
        return False
    if int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


def fsync_directory(directory: str | Path) -> None:
    """Make renames in ``directory`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temp file in the same folder, fsync it, then rename over ``path``.

    The file gets the usual permissions (0666 less the umask: 0644 by default), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = write_temp_file(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_directory(path.parent)


def read_regular_file(path: Path, limit: int, what: str) -> bytes:
    """The bytes of a regular file (symlinks followed) of at most ``limit`` bytes. It is opened
    non-blocking and checked on the open descriptor, so a FIFO, device or folder is refused
    without ever blocking (a blocking open of a FIFO waits forever for a writer)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no {what} here (expected {Path(path).name})") from None
    except OSError as exc:  # a symlink loop, a folder on some systems, no permission, ...
        raise ValueError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise ValueError(f"{path}: the {what} is not a regular file")
    with os.fdopen(fd, "rb") as handle:
        if info.st_size > limit:
            raise ValueError(f"{path}: {info.st_size} bytes is too large for an {what} (at most {limit})")
        try:
            return handle.read(limit + 1)
        except OSError as exc:
            raise ValueError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None


def check_regular_file(path: Path, what: str) -> None:
    """Refuse a missing path, a FIFO, a device or a folder (safetensors would block on a FIFO)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no {what} here (expected {Path(path).name})") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path}: the {what} is not a regular file")
