"""The adapter cache: which adapters sit in the model now, which only on disk.

Two tiers. The upper tier is the model itself (adapters injected with ``load_adapter``), an LRU
bounded by a count (``max_loaded``) and by bytes (``max_bytes``, the adapters' own tensors). The
lower tier is the disk: every registered adapter has a folder, and a miss loads it from there
(the compact SHiRA layout expands in one pass, see ``shirakit.methods.shira.compact``).

An adapter is *pinned* while a running sequence uses it; a pinned adapter is never evicted. When
everything is pinned and the cache is full, :meth:`acquire` says "not now" and the scheduler keeps
the request waiting until a pin is released.

Names and keys: a name is what clients ask for; a *key* is one registration of a name, the
adapter's name inside the model. A name always means the folder it was last registered with:
unregistering a pinned name retires its key (the running rows finish on those tensors, which leave
the model with the last pin), and registering the name again while that key is still pinned gives
the new registration a fresh key (``name#2``), so the new folder is read and new rows get it.

This class does no model work itself: the engine passes ``load`` / ``unload`` callables, so the
policy can be tested without a model.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable

from .metrics import Counters


class AdapterLoadError(ValueError):
    """An adapter's folder could not be loaded (missing, corrupt, wrong shapes for this model)."""


def hide_folder(message: str, folder: Path) -> str:
    """``message`` with the adapter's folder (as given and resolved) written as ``<adapter>``:
    clients learn which file is wrong, not where the server keeps it."""
    for form in sorted({str(folder), str(Path(folder).resolve())}, key=len, reverse=True):
        message = message.replace(form, "<adapter>")
    return message


class AdapterCache:
    """LRU of loaded adapters over a registry of adapter folders (name -> path).

    ``load(name, source) -> bytes`` puts the adapter into the model and returns its size (``source``:
    the registered folder, or what the caller passed to :meth:`acquire`, e.g. files read ahead);
    ``unload(name)`` takes it out. Both are called from the engine thread only.
    """

    def __init__(self, load: Callable[[str, object], int], unload: Callable[[str], None],
                 max_loaded: int = 8, max_bytes: int | None = None) -> None:
        if max_loaded < 1:
            raise ValueError(f"max_loaded must be >= 1, got {max_loaded}")
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self._load, self._unload = load, unload
        self.max_loaded, self.max_bytes = max_loaded, max_bytes
        self.paths: dict[str, Path] = {}  # name -> folder: the registry clients see
        self.keys: dict[str, str] = {}  # name -> key of its current registration
        self.folders: dict[str, Path] = {}  # key -> folder, for every key registered or still loaded
        self.loaded: OrderedDict[str, int] = OrderedDict()  # key -> bytes, least recently used first
        self.pins: dict[str, int] = {}  # key -> running sequences using it
        self.retired: set[str] = set()  # keys unregistered while pinned: dropped when the last pin goes
        self._generation = 1
        self.stats = Counters("cache")

    # ---- registry (the disk tier) --------------------------------------------------------
    def register(self, name: str, path: str | Path) -> str:
        """Register ``name`` as ``path``; returns its key (``name`` unless an older registration of
        ``name`` is still pinned in the model)."""
        if name in self.paths:
            raise ValueError(f"an adapter named {name!r} is already registered")
        key = name
        while key in self.folders or key in self.paths:  # the old tensors are still in use
            self._generation += 1
            key = f"{name}#{self._generation}"
        self.paths[name] = self.folders[key] = Path(path)
        self.keys[name] = key
        return key

    def unregister(self, name: str) -> None:
        """Forget ``name``; its tensors leave the model now, or when their last running sequence ends."""
        self.paths.pop(name)
        key = self.keys.pop(name)
        if self.pins.get(key):
            self.retired.add(key)
        else:
            if key in self.loaded:
                self._drop(key)
            self.folders.pop(key, None)

    def known(self, name: str) -> bool:
        return name in self.paths

    def key(self, name: str) -> str:
        """The key (the name inside the model) of ``name``'s current registration."""
        return self.keys[name]

    def is_loaded(self, name: str) -> bool:
        return name in self.keys and self.keys[name] in self.loaded

    @property
    def loaded_bytes(self) -> int:
        return sum(self.loaded.values())

    # ---- the model tier ----------------------------------------------------------------
    def acquire(self, name: str, source: object = None) -> bool:
        """Pin ``name``'s current registration (its key: :meth:`key`), loading it on a miss (from
        ``source`` if given, else its folder). False: no room now (everything loaded is pinned).

        Raises :class:`AdapterLoadError` when the folder cannot be loaded; the cache and the model
        are then as they were, apart from evictions that made room for it.
        """
        name = self.keys[name]
        if name in self.loaded:
            self.stats.cache_hits += 1
            self.loaded.move_to_end(name)
        else:
            if not self._make_room(extra_count=1, extra_bytes=0):
                return False
            self.stats.cache_misses += 1
            self.loaded[name] = self._timed_load(name, self.folders[name] if source is None else source)
            self._make_room(extra_count=0, extra_bytes=0, keep=name)  # the byte bound, now that size is known
        self.pins[name] = self.pins.get(name, 0) + 1
        return True

    def has_room(self) -> bool:
        """Could one more adapter be loaded now (a free slot, or an unpinned one to evict)?"""
        return not self._over(extra_count=1, extra_bytes=0) or any(not self.pins.get(n) for n in self.loaded)

    def release(self, name: str) -> None:
        """Unpin a key (what :meth:`key` gave when it was acquired)."""
        count = self.pins.get(name, 0) - 1
        if count < 0:
            raise RuntimeError(f"adapter {name!r} released more often than acquired")
        if count:
            self.pins[name] = count
            return
        del self.pins[name]
        if name in self.retired:
            self.retired.discard(name)
            self.folders.pop(name, None)
            self._drop(name)

    def evict(self, name: str) -> bool:
        """Take ``name`` out of the model if it is loaded and unpinned (it stays registered)."""
        name = self.keys.get(name, name)
        if name not in self.loaded or self.pins.get(name):
            return False
        self._drop(name)
        self.stats.cache_evictions += 1
        return True

    def _timed_load(self, name: str, source: object) -> int:
        start = time.perf_counter()
        try:
            size = self._load(name, source)
        except Exception as exc:
            self.stats.adapter_load_failures += 1
            raise AdapterLoadError(f"adapter {name.split('#')[0]!r} could not be loaded: "
                                   f"{hide_folder(str(exc), self.folders[name])}") from exc
        self.stats.adapter_load_seconds += time.perf_counter() - start
        return size

    def _over(self, extra_count: int, extra_bytes: int) -> bool:
        too_many = len(self.loaded) + extra_count > self.max_loaded
        too_big = self.max_bytes is not None and self.loaded_bytes + extra_bytes > self.max_bytes
        return too_many or too_big

    def _make_room(self, extra_count: int, extra_bytes: int, keep: str | None = None) -> bool:
        """Evict unpinned adapters, least recently used first, until the bounds hold."""
        while self._over(extra_count, extra_bytes):
            victim = next((n for n in self.loaded if not self.pins.get(n) and n != keep), None)
            if victim is None:
                return False
            self._drop(victim)
            self.stats.cache_evictions += 1
        return True

    def _drop(self, name: str) -> None:
        del self.loaded[name]
        self._unload(name)
