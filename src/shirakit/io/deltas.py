"""Per-layer weight deltas read from a saved adapter folder, with no base model (for the
orthogonality metrics of :mod:`shirakit.model.metrics` on adapters on disk)."""

from __future__ import annotations

import torch

from ..core.capabilities import DeltaFromFile, supports
from ..core.registry import method_for_config
from ..core.sparse_delta import Delta, SparseDelta
from .checkpoint import COMPACT_V1, FORMAT_KEY, PREFIX, read_weights
from .config_file import read_config


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
    if not supports(method, DeltaFromFile):
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
