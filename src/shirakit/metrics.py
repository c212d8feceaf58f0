"""Adapter orthogonality (SHiRA paper §4.2): how much two adapters interfere when fused.

For two adapters with dense deltas A1, A2 (m x n) on the same layer, with P = A1^T A2 (n x n):

    AWOM = ||P||_2                     (Adapter Weight Orthogonality Magnitude; here the l2 norm
                                        of P's entries, i.e. its Frobenius norm)
    AWOR = 1 - ||P||_0 / n^2           (Adapter Weight Orthogonality Ratio: the share of exact
                                        zeros in P; 1 means fully orthogonal)

Sparse adapters (SHiRA) compute P as a sparse x sparse product, so big layers cost memory
proportional to P's non-zeros, not n^2; anything else goes through its dense delta.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SparseDelta:
    """A delta given by its non-zeros: (2, K) (row, col) indices and values, shape (m, n)."""

    indices: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, int]

    def to_sparse(self) -> torch.Tensor:
        return torch.sparse_coo_tensor(self.indices.long(), self.values.float(), self.shape).coalesce()

    def to_dense(self) -> torch.Tensor:
        return self.to_sparse().to_dense()


Delta = torch.Tensor | SparseDelta


@dataclass(frozen=True)
class Orthogonality:
    layer: str
    awom: float
    awor: float
    nonzeros: int
    entries: int


def orthogonality(layer: str, a1: Delta, a2: Delta) -> Orthogonality:
    """AWOM and AWOR of one layer's pair of deltas."""
    shape1 = a1.shape if isinstance(a1, SparseDelta) else tuple(a1.shape)
    shape2 = a2.shape if isinstance(a2, SparseDelta) else tuple(a2.shape)
    if tuple(shape1) != tuple(shape2):
        raise ValueError(f"{layer}: the adapters' deltas differ in shape: {tuple(shape1)} vs {tuple(shape2)}")
    n = shape1[1]
    if isinstance(a1, SparseDelta) and isinstance(a2, SparseDelta):
        product = torch.sparse.mm(a1.to_sparse().t().coalesce(), a2.to_sparse()).coalesce().values()
    else:
        dense1 = a1.to_dense() if isinstance(a1, SparseDelta) else a1.float()
        dense2 = a2.to_dense() if isinstance(a2, SparseDelta) else a2.float()
        product = dense1.T @ dense2
    nonzeros = int(torch.count_nonzero(product))
    return Orthogonality(layer, float(torch.linalg.vector_norm(product)), 1.0 - nonzeros / (n * n), nonzeros, n * n)


def pairwise(deltas1: dict[str, Delta], deltas2: dict[str, Delta]) -> list[Orthogonality]:
    """One row per layer both adapters adapt, in layer order."""
    common = [name for name in deltas1 if name in deltas2]
    if not common:
        raise ValueError("the two adapters share no layer; orthogonality needs the same layers")
    return [orthogonality(name, deltas1[name], deltas2[name]) for name in common]


def model_deltas(model, adapter_name: str) -> dict[str, Delta]:
    """Each layer's delta of an adapter in a model: sparse when the method is (SHiRA)."""
    from .inject import adapter_layers

    out: dict[str, Delta] = {}
    for name, layer in adapter_layers(model):
        if adapter_name in layer.adapters:
            adapter = layer.adapters[adapter_name]
            sparse = getattr(adapter, "sparse_delta", None)
            out[name] = sparse() if sparse is not None else adapter.delta_weight(layer.weight)
    return out


def adapter_orthogonality(model, name1: str, name2: str) -> list[Orthogonality]:
    """AWOM/AWOR per layer for two adapters loaded in one model."""
    from .inject import check_adapter_names

    check_adapter_names(model, [name1, name2])
    return pairwise(model_deltas(model, name1), model_deltas(model, name2))
