"""Public path of :mod:`shirakit.integrations.vllm`: SHiRA served fused inside vLLM (docs/vllm.md)."""

from .integrations.vllm import WORKER_EXTENSION, ModuleDelta, read_shira
from .integrations.vllm.dense import write_dense_deltas
from .integrations.vllm.engine import POLICIES, GroupScheduler, engine_args

__all__ = ["POLICIES", "WORKER_EXTENSION", "GroupScheduler", "ModuleDelta", "engine_args", "read_shira",
           "write_dense_deltas"]
