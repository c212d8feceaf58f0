"""Adapter orthogonality (SHiRA paper §4.2): how much two adapters interfere when fused.

For two adapters with dense deltas A1, A2 (m x n) on the same layer, with P = A1^T A2 (n x n):

    AWOM = ||P||_2                     (Adapter Weight Orthogonality Magnitude; here the l2 norm
                                        of P's entries, i.e. its Frobenius norm)
    AWOR = 1 - ||P||_0 / n^2           (Adapter Weight Orthogonality Ratio: the share of exact
                                        zeros in P; 1 means fully orthogonal)

Each method gives its own delta (:meth:`Adapter.delta_for_metrics`, and from a saved file
without a base model :meth:`Adapter.file_delta`): dense, or a :class:`SparseDelta` for sparse
methods (SHiRA), whose P is then a sparse x sparse product, so big layers cost memory
proportional to P's non-zeros, not n^2. Nothing here knows a method's tensors or scaling.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..core.sparse_delta import Delta, SparseDelta
from ..core.state import adapter_layers, check_adapter_names


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
        with warnings.catch_warnings():  # torch's sparse product warns that CSR support is "beta"
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
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
    """Each layer's delta of an adapter in a model, as its method gives it (sparse for SHiRA)."""
    return {
        name: layer.adapters[adapter_name].delta_for_metrics(layer.weight)
        for name, layer in adapter_layers(model)
        if adapter_name in layer.adapters
    }


def adapter_orthogonality(model, name1: str, name2: str) -> list[Orthogonality]:
    """AWOM/AWOR per layer for two adapters loaded in one model."""
    check_adapter_names(model, [name1, name2])
    return pairwise(model_deltas(model, name1), model_deltas(model, name2))


def align_shapes(d1: dict[str, Delta], d2: dict[str, Delta]) -> None:
    """Give two adapters' inferred sparse deltas the larger of the two inferred shapes, per layer."""
    for name in set(d1) & set(d2):
        a, b = d1[name], d2[name]
        shape = (max(a.shape[0], b.shape[0]), max(a.shape[1], b.shape[1]))
        for deltas, delta in ((d1, a), (d2, b)):
            if isinstance(delta, SparseDelta) and delta.shape_inferred:
                deltas[name] = SparseDelta(delta.indices, delta.values, shape, shape_inferred=True)
