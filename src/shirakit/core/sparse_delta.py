"""A weight delta given by its non-zeros: what a sparse method (SHiRA) hands the orthogonality
metrics (:mod:`shirakit.model.metrics`) instead of a dense m x n matrix."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SparseDelta:
    """A delta given by its non-zeros: (2, K) (row, col) indices and values, shape (m, n).

    ``shape_inferred``: the shape was read off the largest index (a file without its base model),
    so it is a lower bound that :func:`align_shapes` may grow.
    """

    indices: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, int]
    shape_inferred: bool = False

    def to_sparse(self) -> torch.Tensor:
        # indices come from a validated adapter or file: skip torch's (warning-emitting) invariant checks
        return torch.sparse_coo_tensor(self.indices.long(), self.values.float(), self.shape,
                                       check_invariants=False).coalesce()

    def to_dense(self) -> torch.Tensor:
        return self.to_sparse().to_dense()


Delta = torch.Tensor | SparseDelta
