"""SHiRA inside vLLM (docs/vllm.md); public path ``shirakit.vllm``; needs the ``vllm`` extra.

- :mod:`.files`   an adapter folder -> per Hugging Face module positions and values (no base model)
- :mod:`.worker`  ``ShiraWorkerExtension``: vLLM's ``worker_extension_cls``; maps positions into vLLM's
  packed, tensor-parallel weights through its own loaders and switches by two scatters per weight
- :mod:`.rows`    per-row SHiRA inside vLLM's mixed batches on CPU: each touched layer's ``cpu_linear``
  wrapped to add every row's own adapter delta (the grouped kernel), rows -> requests from the model runner
- :mod:`.engine`  ``VllmEngine``: vLLM's async engine behind a front scheduler that groups requests by
  adapter (SHiRA fused or per row, LoRA through vLLM's own LoRA)

Only :mod:`.engine` and :mod:`.worker`'s callers import vLLM; :mod:`.files` needs nothing beyond shirakit.
"""

from .files import ModuleDelta, read_shira

WORKER_EXTENSION = "shirakit.integrations.vllm.worker.ShiraWorkerExtension"

__all__ = ["WORKER_EXTENSION", "ModuleDelta", "read_shira"]
