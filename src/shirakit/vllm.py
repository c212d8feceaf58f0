"""Public path of :mod:`shirakit.integrations.vllm`: SHiRA served fused inside vLLM, or per row in its mixed
batches on CPU (docs/vllm.md)."""

from .integrations.vllm import WORKER_EXTENSION, ModuleDelta, read_shira
from .integrations.vllm.dense import write_dense_deltas
from .integrations.vllm.engine import POLICIES, GroupScheduler, engine_args
from .integrations.vllm.rows import ROWS_KEY, front_supported

__all__ = ["POLICIES", "ROWS_KEY", "WORKER_EXTENSION", "GroupScheduler", "ModuleDelta", "engine_args",
           "front_supported", "read_shira", "write_dense_deltas"]
