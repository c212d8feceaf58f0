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

import re
import warnings
from dataclasses import dataclass

import torch

from .checkpoint import PREFIX, read_weights
from .compact import COMPACT_V1, FORMAT_KEY
from .config import read_config
from .state import adapter_layers, check_adapter_names


@dataclass(frozen=True)
class SparseDelta:
    """A delta given by its non-zeros: (2, K) (row, col) indices and values, shape (m, n)."""

    indices: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, int]

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
    """Each layer's delta of an adapter in a model: sparse when the method is (SHiRA)."""
    out: dict[str, Delta] = {}
    for name, layer in adapter_layers(model):
        if adapter_name in layer.adapters:
            adapter = layer.adapters[adapter_name]
            sparse = getattr(adapter, "sparse_delta", None)
            out[name] = sparse() if sparse is not None else adapter.delta_weight(layer.weight)
    return out


def adapter_orthogonality(model, name1: str, name2: str) -> list[Orthogonality]:
    """AWOM/AWOR per layer for two adapters loaded in one model."""
    check_adapter_names(model, [name1, name2])
    return pairwise(model_deltas(model, name1), model_deltas(model, name2))


def deltas_from_dir(directory) -> tuple[dict[str, Delta], str]:
    """Each layer's delta read straight from a saved adapter, with no base model.

    SHiRA gives sparse deltas; their shape is inferred from the largest index (a lower bound
    when the last rows/columns are untouched, which a 1-5% random mask practically never leaves).
    LoRA gives dense ``s * B A``. Methods whose delta depends on the base weight need a model:
    load both adapters into it and use :func:`adapter_orthogonality`.
    Returns the deltas and a note on how shapes were found.
    """
    config = read_config(directory)
    path, tensors, metadata = read_weights(directory)
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        for leaf in ("shira_weight", "shira_indices", "shira_index_gaps", "shira_index_far",
                     "lora_A.weight", "lora_B.weight"):
            if key.startswith(PREFIX) and key.endswith("." + leaf):
                layers.setdefault(key[len(PREFIX) : -len(leaf) - 1], {})[leaf] = tensor
    if not layers:
        raise ValueError(f"{path}: orthogonality from files needs a SHiRA or LoRA adapter, found {config.peft_type}")
    out: dict[str, Delta] = {}
    for name, parts in layers.items():
        if "lora_A.weight" in parts:
            scaling = config.lora_alpha / (config.r**0.5 if config.use_rslora else config.r)
            out[name] = parts["lora_B.weight"].float() @ parts["lora_A.weight"].float() * scaling
            continue
        if metadata.get(FORMAT_KEY) == COMPACT_V1:
            raise ValueError(f"{path}: a compact file stores flat positions; its shapes need the base model")
        idx = parts["shira_indices"].long()
        shape = (int(idx[0].max()) + 1, int(idx[1].max()) + 1)
        out[name] = SparseDelta(idx, parts["shira_weight"].float(), shape)
    note = "shapes inferred from the largest index" if any(isinstance(d, SparseDelta) for d in out.values()) else ""
    return out, note


def align_shapes(d1: dict[str, Delta], d2: dict[str, Delta]) -> None:
    """Give two adapters' inferred sparse deltas the larger of the two inferred shapes, per layer."""
    for name in set(d1) & set(d2):
        a, b = d1[name], d2[name]
        if isinstance(a, SparseDelta) or isinstance(b, SparseDelta):
            shape_a = a.shape if isinstance(a, SparseDelta) else tuple(a.shape)
            shape_b = b.shape if isinstance(b, SparseDelta) else tuple(b.shape)
            shape = (max(shape_a[0], shape_b[0]), max(shape_a[1], shape_b[1]))
            if isinstance(a, SparseDelta):
                d1[name] = SparseDelta(a.indices, a.values, shape)
            if isinstance(b, SparseDelta):
                d2[name] = SparseDelta(b.indices, b.values, shape)


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
