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

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """``with LiveTensorBytes() as counter: ...``; then ``counter.peak`` (bytes)."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict[int, int] = {}  # id(storage object) -> bytes counted for it
        self.now = 0
        self.peak = 0
        self._resize = torch.UntypedStorage.resize_

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if any(t is DTensor for t in types):
            return NotImplemented  # DTensor turns into ops on its local tensors, which come back here
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                for part in _strided_parts(t):
                    self._set(part.untyped_storage())
        return out

    def _set(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if key not in self.sizes:
            weakref.finalize(storage, self._freed, key)
        self.now += storage.nbytes() - self.sizes.get(key, 0)
        self.sizes[key] = storage.nbytes()
        self.peak = max(self.peak, self.now)

    def _freed(self, key: int) -> None:
        self.now -= self.sizes.pop(key, 0)

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


def _strided_parts(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors holding a (possibly sparse) tensor's memory."""
    if t.layout == torch.sparse_csr:
        return t.crow_indices(), t.col_indices(), t.values()
    if t.layout == torch.sparse_coo:
        return t._indices(), t._values()
    return (t,)
