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

import re
import warnings
from dataclasses import dataclass

import torch

from .checkpoint import COMPACT_V1, FORMAT_KEY, PREFIX, read_weights
from .config import read_config
from .registry import method_for_config
from .state import adapter_layers, check_adapter_names


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


def deltas_from_dir(directory) -> tuple[dict[str, Delta], str]:
    """Each layer's delta read straight from a saved adapter, with no base model.

    The method turns each layer's file tensors into its delta (:meth:`Adapter.file_delta`):
    SHiRA gives sparse deltas whose shape is inferred from the largest index, LoRA dense
    ``s * B A``. Methods whose delta depends on the base weight need a model: load both adapters
    into it and use :func:`adapter_orthogonality`. Returns the deltas and a note on how shapes
    were found.
    """
    config = read_config(directory)
    path, tensors, metadata = read_weights(directory)
    method = method_for_config(config)
    if not method.file_keys:
        raise ValueError(f"{path}: a {config.peft_type} adapter's delta needs the base model; load both adapters "
                         "into it and use shirakit.adapter_orthogonality")
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        leaf = next((k for k in method.file_keys if key.startswith(PREFIX) and key.endswith("." + k)), None)
        if leaf is not None:
            layers.setdefault(key[len(PREFIX) : -len(leaf) - 1], {})[leaf] = tensor
    compact = metadata.get(FORMAT_KEY) == COMPACT_V1
    out = {name: method.file_delta(config, parts, compact, f"{path}: {name}") for name, parts in layers.items()}
    inferred = any(isinstance(d, SparseDelta) and d.shape_inferred for d in out.values())
    return out, "shapes inferred from the largest index" if inferred else ""


def align_shapes(d1: dict[str, Delta], d2: dict[str, Delta]) -> None:
    """Give two adapters' inferred sparse deltas the larger of the two inferred shapes, per layer."""
    for name in set(d1) & set(d2):
        a, b = d1[name], d2[name]
        shape = (max(a.shape[0], b.shape[0]), max(a.shape[1], b.shape[1]))
        for deltas, delta in ((d1, a), (d2, b)):
            if isinstance(delta, SparseDelta) and delta.shape_inferred:
                deltas[name] = SparseDelta(delta.indices, delta.values, shape, shape_inferred=True)


def heatmap(rows: list[Orthogonality], path, title: str = "AWOR per layer") -> None:
    """A PNG: one cell per layer (blocks x projection when names allow), colour = AWOR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks, kinds, cells = [], [], {}
    for row in rows:
        match = re.match(r"(.*?\.)(\d+)\.(.*)", row.layer)
        block, kind = (match.group(2), match.group(3)) if match else ("-", row.layer)
        blocks += [block] if block not in blocks else []
        kinds += [kind] if kind not in kinds else []
        cells[(block, kind)] = row.awor
    grid = torch.full((len(blocks), len(kinds)), float("nan"))
    for (block, kind), value in cells.items():
        grid[blocks.index(block), kinds.index(kind)] = value
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(kinds), 1.0 + 0.4 * len(blocks)))
    image = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")  # whole names: "dense" alone is ambiguous
    ax.set_yticks(range(len(blocks)), blocks)
    ax.set(xlabel="layer", ylabel="block", title=title)
    fig.colorbar(image, ax=ax, label="AWOR (1 = orthogonal)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
