"""Adapters whose delta is dense per layer (VeRA, MiSS) served fused in vLLM: their per-layer deltas
``ΔW`` (out, in), fp32, computed once by shirakit on a CPU copy of the Hugging Face model and written to
a safetensors file every worker reads (:meth:`~.worker.ShiraWorkerExtension.shira_load_dense`).

A switch then writes ``W0 + ΔW`` (computed in fp32, rounded to the weight's dtype, as the generic
merge does) and back ``W0``: one copy per weight each way instead of SHiRA's scatters. VeRA's
(Kopiczko et al., arXiv 2310.11454) ``ΔW = diag(b) B diag(d) A`` with frozen shared random A, B, and
MiSS's block-sharing delta (Kang et al., arXiv 2409.15371) are dense m x n matrices, so they cannot
ride SHiRA's sparse path; the cost is one dense m x n delta per layer per adapter kept on each worker.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...io.atomic import atomic_write_bytes
from ...io.checkpoint import load_adapter
from ...model.control import delta_weights
from ...model.inject import delete_adapter


def write_dense_deltas(model: torch.nn.Module, folder: str | Path, out: str | Path) -> int:
    """Load the adapter at ``folder`` into ``model`` (a CPU Hugging Face model), write each targeted
    layer's fp32 delta to ``out`` (safetensors, keyed by module name), take the adapter out again.
    Returns the number of layers."""
    from safetensors.torch import save

    name = "__shirakit_vllm_dense__"
    load_adapter(model, folder, name)
    try:
        deltas = {k: v.float().contiguous() for k, v in delta_weights(model, name).items()}
    finally:
        delete_adapter(model, name)
    atomic_write_bytes(Path(out), save(deltas))
    return len(deltas)
