"""Peak bytes of live tensor storages, counted by torch itself (not by the process's resident memory).

Resident memory (VmHWM) also holds what the allocator keeps after a tensor is freed (glibc arenas,
pages not returned) and the import-time libraries; this counts only what tensors need. Every
storage an op creates inside the context is counted by its size until it is freed; FSDP2 frees and
re-allocates its unsharded parameters with ``UntypedStorage.resize_``, which is followed too.
torch's own ``torch.distributed._tools.mem_tracker.MemTracker`` does the same but installs a
gradient hook on every parameter of every module it sees, and refuses a frozen (base) parameter.

Not counted: tensors created before the context, and storages made outside torch's dispatcher
(``torch.from_numpy`` of a numpy/numba result, mmapped files).
"""

from __future__ import annotations

import sys
import weakref
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """``with LiveTensorBytes() as counter: ...``; then ``counter.peak`` (bytes).

    ``record=True`` also labels every storage when it is made (the op, dtype and shape, the
    autograd node whose backward made it, the innermost shirakit/transformers/benchmark line that
    called the op) and keeps the labelled list of the storages alive at the peak
    (``counter.at_peak``: label -> bytes; :func:`breakdown` prints it). A snapshot is taken at each
    new peak 1 MiB above the last one, so ``at_peak`` is within 1 MiB of the peak.
    """

    def __init__(self, record: bool = False) -> None:
        super().__init__()
        self.sizes: dict[int, int] = {}  # id(storage object) -> bytes counted for it
        self.now = 0
        self.peak = 0
        self._resize = torch.UntypedStorage.resize_
        self.record = record
        self.labels: dict[int, tuple] = {}  # id(storage object) -> its label (record=True)
        self.at_peak: Counter = Counter()  # label -> bytes, at the last snapshot (record=True)
        self._snapshot_at = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if any(t is DTensor for t in types):
            return NotImplemented  # DTensor turns into ops on its local tensors, which come back here
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                for part in _strided_parts(t):
                    self._set(part.untyped_storage(), (func, part) if self.record else None)
        return out

    def _set(self, storage: torch.UntypedStorage, made_by=None) -> None:
        key = id(storage)
        if key not in self.sizes:
            weakref.finalize(storage, self._freed, key)
            if self.record:
                self.labels[key] = _label(*made_by) if made_by else ("resize_ (FSDP unsharded copy)",)
        self.now += storage.nbytes() - self.sizes.get(key, 0)
        self.sizes[key] = storage.nbytes()
        if self.now > self.peak:
            self.peak = self.now
            if self.record and self.peak >= self._snapshot_at + (1 << 20):
                self._snapshot()

    def _snapshot(self) -> None:
        self._snapshot_at = self.peak
        self.at_peak = Counter()
        for key, size in self.sizes.items():
            self.at_peak[self.labels.get(key, ("unlabelled",))] += size

    def _freed(self, key: int) -> None:
        self.now -= self.sizes.pop(key, 0)
        self.labels.pop(key, None)

    def __enter__(self):
        counter, resize = self, self._resize

        def resize_(storage: torch.UntypedStorage, size: int):
            resize(storage, size)
            if id(storage) in counter.sizes or size:
                counter._set(storage)

        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*exc)


_OWN_CODE = ("shirakit", "transformers", "benchmarks", "/tests/")


def _label(func, t: torch.Tensor) -> tuple:
    """(op, dtype, shape, autograd node or "forward", innermost own-code line)."""
    node = torch._C._current_autograd_node()
    frame, where = sys._getframe(1), "?"
    while frame is not None:
        name = frame.f_code.co_filename
        if any(part in name for part in _OWN_CODE) and "_tensor_memory" not in name:
            where = f"{name.rsplit('/', 1)[-1]}:{frame.f_lineno} {frame.f_code.co_name}"
            break
        frame = frame.f_back
    return (str(func.overloadpacket.__name__), str(t.dtype).replace("torch.", ""), tuple(t.shape),
            node.name() if node is not None else "forward", where)


def breakdown(at_peak: Counter, top: int = 40) -> str:
    """The storages alive at the peak, grouped by label, largest first (MiB)."""
    lines = [f"{size / 2**20:9.2f} MiB  {label}" for label, size in at_peak.most_common(top)]
    return "\n".join([f"{sum(at_peak.values()) / 2**20:9.2f} MiB in all, {len(at_peak)} labels"] + lines)


def _strided_parts(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors holding a (possibly sparse) tensor's memory."""
    if t.layout == torch.sparse_csr:
        return t.crow_indices(), t.col_indices(), t.values()
    if t.layout == torch.sparse_coo:
        return t._indices(), t._values()
    return (t,)
