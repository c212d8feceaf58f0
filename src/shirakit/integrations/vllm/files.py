"""A SHiRA adapter folder read as per-module positions and values, for a model that is not a
``torch.nn.Module`` of ours (vLLM's): no base model, only each target module's (out, in) shape.

SHiRA (Bhardwaj et al., arXiv 2406.13175) changes K = r(m+n) entries of a weight:
``W' = W + s S``, ``S[i_k, j_k] = v_k``. What a foreign engine needs per module is therefore the K
(row, col) positions and the K values ``s v_k``; it writes ``W0[i_k, j_k] + s v_k`` there (fp32 sum,
rounded to the weight's dtype, as :meth:`ShiraAdapter.merged_values` does) and the saved ``W0`` back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ...core.adapter import LayerGeometry
from ...io.checkpoint import COMPACT_V1, FORMAT_KEY, PREFIX, read_weights
from ...io.config_file import read_config
from ...methods.shira import ShiraConfig
from ...methods.shira import compact as shira_compact
from ...methods.shira.masks import shira_budget, validate_indices


@dataclass(frozen=True)
class ModuleDelta:
    """One module's SHiRA delta: sorted row-major (rows, cols) int64 and fp32 values (scale folded in)."""

    rows: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, int]


def read_shira(directory: str | Path, shapes: dict[str, tuple[int, int]]) -> dict[str, ModuleDelta]:
    """Every module of a SHiRA adapter folder (PEFT's layout or shirakit's compact one), checked
    against ``shapes`` (Hugging Face module name -> (out_features, in_features)).

    Raises ValueError naming the file and the module for another method, a module the model does not
    have, a count other than K = r(in+out), indices out of range or repeated, or values that are
    not finite.
    """
    config = read_config(directory)
    if not isinstance(config, ShiraConfig):
        raise ValueError(f"{Path(directory)}: a {config.peft_type} adapter; the fused vLLM path takes SHiRA only")
    if config.modules_to_save:
        raise ValueError(f"{Path(directory)}: modules_to_save {config.modules_to_save} cannot be served fused "
                         "(whole modules, not sparse positions)")
    path, tensors, metadata = read_weights(directory)
    compact = metadata.get(FORMAT_KEY) == COMPACT_V1
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        leaf = key.rsplit(".", 1)[-1]
        if not key.startswith(PREFIX) or not leaf.startswith("shira_"):
            raise ValueError(f"{path}: unexpected tensor {key!r} (expected {PREFIX}<module>.shira_*)")
        layers.setdefault(key[len(PREFIX):-len(leaf) - 1], {})[leaf] = tensor
    out = {}
    for name, parts in sorted(layers.items()):
        source = f"{path}: {name}"
        if name not in shapes:
            raise ValueError(f"{source}: the model has no linear module {name!r} (it has e.g. "
                             f"{sorted(shapes)[:3]})")
        m, n = shapes[name]
        if compact:
            parts = shira_compact.decode(parts, n, source, m)
        if set(parts) != {"shira_weight", "shira_indices"}:
            raise ValueError(f"{source}: expected shira_weight and shira_indices, found {sorted(parts)}")
        geometry = LayerGeometry(in_features=n, out_features=m)
        indices, order = validate_indices(parts["shira_indices"], geometry, shira_budget(config.r, geometry), source)
        values = parts["shira_weight"].float()
        if values.shape != (indices.shape[1],):
            raise ValueError(f"{source}: shira_weight has shape {tuple(values.shape)}, expected ({indices.shape[1]},)")
        if not torch.isfinite(values).all():
            raise ValueError(f"{source}: shira_weight holds non-finite values")
        values = values if order is None else values[order]
        out[name] = ModuleDelta(indices[0].contiguous(), indices[1].contiguous(), values.contiguous(), (m, n))
    if not out:
        raise ValueError(f"{path}: no SHiRA module in the file")
    return out
