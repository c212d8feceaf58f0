"""Build something once, on first use, under a lock (SHiRA's numba kernels: compiling them, or
loading numba's on-disk cache, takes seconds, so it is not done at import)."""

from __future__ import annotations

import functools
import threading
from typing import Callable, TypeVar

T = TypeVar("T")


def once(build: Callable[[], T]) -> Callable[[], T]:
    """``build()`` runs at the first call only; concurrent first calls wait for that one build."""
    lock = threading.Lock()
    built: list[T] = []

    @functools.wraps(build)
    def get() -> T:
        with lock:
            if not built:
                built.append(build())
        return built[0]

    return get
