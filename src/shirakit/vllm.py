"""Public path of :mod:`shirakit.integrations.vllm`: SHiRA served fused inside vLLM (docs/vllm.md)."""

from .integrations.vllm import WORKER_EXTENSION, ModuleDelta, read_shira

__all__ = ["WORKER_EXTENSION", "ModuleDelta", "read_shira"]
