"""Reading adapter folders ahead, on a worker thread, so a cache miss does not stall the batch.

A miss has two parts: reading the folder (config JSON, safetensors, checks that need no model)
and putting the adapter into the model. Only the second must run on the engine thread (it owns
the model). The engine asks for an adapter's files as soon as a request for it is waiting
(:meth:`Prefetcher.want`); the read runs here while the batch keeps decoding, and the request
joins the batch once its files are ready (:meth:`Prefetcher.take`). A folder that cannot be read
gives its error to the requests that wanted it and to nothing else.

Bounded: at most ``max_ready`` folders are read and not yet taken (their tensors sit in host
memory); further wants wait until the engine takes some. Thread-safe: HTTP threads call
:meth:`want` too (a request is read for as soon as it is queued).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import shirakit.methods  # noqa: F401  (registers every method: reading a config needs them)
from shirakit.io.checkpoint import AdapterFiles, read_adapter_files


class Prefetcher:
    """(name, folder) -> a Future of its :class:`AdapterFiles`, read by worker threads (two by
    default: one slow folder does not hold up the reads of the others)."""

    def __init__(self, max_ready: int = 8, workers: int = 2) -> None:
        if max_ready < 1:
            raise ValueError(f"max_ready must be >= 1, got {max_ready}")
        self.max_ready = max_ready
        self.read_seconds = 0.0  # worker time spent reading (for /metrics)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="shirakit-adapter-reader")
        self._lock = threading.Lock()
        self._futures: dict[tuple[str, Path], Future] = {}

    def want(self, name: str, path: Path) -> bool:
        """Start reading ``path`` for ``name`` unless it is read already or too many are; True if
        its read is started (or done)."""
        key = (name, Path(path))
        with self._lock:
            if key in self._futures:
                return True
            if len(self._futures) >= self.max_ready:
                return False
            self._futures[key] = self._pool.submit(self._read, key[1])
            return True

    def read(self, path: Path) -> Future:
        """Read ``path`` on a worker now, outside the bookkeeping (an explicit load: the engine
        thread only puts the result into the model, so running streams do not stall on the disk)."""
        return self._pool.submit(self._read, Path(path))

    def take(self, name: str, path: Path) -> Future | None:
        """The finished read for (name, path), removed from here; None while it is not done (or not
        started: then it is started if there is room)."""
        key = (name, Path(path))
        with self._lock:
            future = self._futures.get(key)
            if future is not None and future.done():
                return self._futures.pop(key)
        if future is None:
            self.want(name, path)
        return None

    def keep_only(self, wanted: dict[str, Path]) -> None:
        """Drop reads for anything but ``wanted`` (name -> folder): nobody waits for them now."""
        keep = {(name, Path(path)) for name, path in wanted.items()}
        with self._lock:
            for key in [k for k in self._futures if k not in keep]:
                self._futures.pop(key).cancel()

    def forget(self, name: str) -> None:
        """Drop every read for ``name`` (unregistered: its folder may be registered again, elsewhere)."""
        with self._lock:
            for key in [k for k in self._futures if k[0] == name]:
                self._futures.pop(key).cancel()

    def pending(self) -> int:
        with self._lock:
            return len(self._futures)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _read(self, path: Path) -> AdapterFiles:
        start = time.perf_counter()
        try:
            return read_adapter_files(path)
        finally:
            with self._lock:
                self.read_seconds += time.perf_counter() - start
