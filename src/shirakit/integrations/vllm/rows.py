"""Per-request SHiRA inside vLLM's mixed batches on CPU: each row of a step gets its own adapter's delta.

A SHiRA adapter (Bhardwaj et al., arXiv 2406.13175) adds ``s S x`` to a layer's output, S sparse with
K = r(m+n) entries. Served per row, a layer computes ``y = W0 x`` with vLLM's own packed kernel for the
whole batch and then, for each token row t of a request on adapter a(t),

    y[t, i] += sum_{k in row i of S_a} v_k * x[t, j_k]

one call per layer for the whole batch (``methods/shira/grouped.py``: the builtin engine's grouped
kernel, every adapter's CSR laid end to end). So requests on different adapters (and base and vLLM-LoRA
requests) share one step, with no scatter into the weights.

VeRA (arXiv 2310.11454) and MiSS (arXiv 2409.15371) rows take the simple exact route: their rows' output
is recomputed with the adapter's merged weight ``W0 + ΔW`` (the one fused mode writes), ``y[rows] =
x[rows] (W0 + ΔW)^T + b``, one dense product per adapter present per touched layer. It costs a dense
product for those rows (their low-rank forms would cost r(m+n) per row instead; not built).

Where it hooks in, without changing vLLM's files (vLLM 0.32): on CPU an unquantized linear layer
multiplies through an instance attribute, ``layer.cpu_linear(x, weight, bias)``
(``vllm/model_executor/layers/utils.py``, ``cpu_unquantized_gemm``), bound by
``dispatch_cpu_unquantized_gemm``. Every layer an adapter touches gets a wrapper there that calls the
bound kernel and adds the deltas (it is bound again after each fused switch's repacking). Which row
belongs to which request, and which adapter the request wants, the wrapper reads once per forward
(vLLM sets a new forward context per step) from the model runner: ``input_batch.req_ids`` (the batch's
request order, which is the token order), ``query_start_loc`` (each request's first token row) and
``requests[id].sampling_params.extra_args[ROWS_KEY]`` (set by shirakit's front,
``serve/vllm_backend.py``). These are vLLM's private model-runner attributes: a vLLM upgrade must rerun
``tests/test_vllm.py``. On GPUs vLLM has no such attribute (the adapters are served fused there).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

ROWS_KEY = "shirakit_rows"  # sampling_params.extra_args key: the SHiRA adapter of a per-row request


@dataclass
class _Layer:
    """One vLLM module's SHiRA adapters laid out for the kernel, and adapter id -> its index there; and its
    dense adapters (VeRA, MiSS): 1 + adapter id -> the whole merged weight ``W0 + ΔW``."""

    packed: object  # grouped.PackedRows, or None (only dense adapters touch the module)
    dtype: torch.dtype  # what it was laid out for (the model's)
    lut: np.ndarray  # (1 + adapters ever named,) int32: lut[1 + id] = index in ``packed``, -1 if absent
    dense: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class RowState:
    ids: dict[str, int] = field(default_factory=dict)  # adapter name -> its id (never reused)
    layers: dict[str, _Layer] = field(default_factory=dict)  # vLLM module name -> its layout
    step: object = None  # the forward context the rows below were read for
    rows: np.ndarray | None = None  # 1 + adapter id per token row of that step (0: no delta), or None
    calls: int = 0  # layer calls that added deltas (tests, profiles)


def front_supported(model_config) -> str | None:
    """What the front can tell before any worker answers: None if per-row SHiRA may run, else why not."""
    from vllm.platforms import current_platform

    from ...methods.shira import grouped

    if not current_platform.is_cpu():
        return "vLLM runs on a GPU here: per-row SHiRA hooks vLLM's CPU linear path only"
    if not grouped.AVAILABLE:
        return "numba is not importable (the grouped kernel needs it)"
    if model_config.dtype not in (torch.float32, torch.float64):
        return f"the model runs in {model_config.dtype}; the grouped CPU kernel takes float32/float64"
    return None


def supported(model_runner, dtype: torch.dtype) -> str | None:
    """None if per-row SHiRA can run in this worker, else why not."""
    from ...methods.shira import grouped

    if not grouped.AVAILABLE:
        return "numba is not importable (the grouped kernel needs it)"
    if dtype not in (torch.float32, torch.float64):
        return f"the model runs in {dtype}; the grouped CPU kernel takes float32/float64"
    if getattr(model_runner, "device", torch.device("cpu")).type != "cpu":
        return "vLLM runs on a GPU here: per-row SHiRA hooks vLLM's CPU linear path only"
    for attr in ("input_batch", "query_start_loc", "requests"):
        if not hasattr(model_runner, attr):
            return f"vLLM's model runner has no {attr!r} (another vLLM version?)"
    return None


def relayout(state: RowState, per_module: dict[str, list[tuple[str, torch.Tensor, torch.Tensor]]],
             shapes: dict[str, tuple[int, int]], dtype: torch.dtype,
             dense: dict[str, list[tuple[str, torch.Tensor]]] | None = None) -> None:
    """Lay out again every module's adapters: ``per_module[module] = [(adapter, flat positions, values)]``
    (SHiRA) and ``dense[module] = [(adapter, merged weight)]`` (VeRA, MiSS)."""
    from ...methods.shira.grouped import pack_rows

    dense = dense or {}
    for deltas in (*per_module.values(), *dense.values()):
        for name, *_ in deltas:
            state.ids.setdefault(name, len(state.ids))
    state.layers = {}
    for module in {*per_module, *dense}:
        deltas = per_module.get(module, [])
        lut = np.full(1 + len(state.ids), -1, dtype=np.int32)
        for index, (name, _, _) in enumerate(deltas):
            lut[1 + state.ids[name]] = index
        packed = pack_rows(shapes[module], [(p, v) for _, p, v in deltas], dtype) if deltas else None
        merged = {1 + state.ids[name]: weight for name, weight in dense.get(module, [])}
        state.layers[module] = _Layer(packed, dtype, lut, merged)
    state.step, state.rows = None, None


def step_rows(state: RowState, model_runner) -> np.ndarray | None:
    """1 + adapter id per token row of the running step (0: no per-row adapter), or None when no row
    has one; read once per forward context."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    context = get_forward_context() if is_forward_context_available() else None
    if context is not None and context is state.step:
        return state.rows
    rows = None
    batch = model_runner.input_batch
    count = batch.num_reqs
    if count and state.ids:
        ids = np.zeros(count, dtype=np.int32)
        for i, request_id in enumerate(batch.req_ids[:count]):
            request = model_runner.requests.get(request_id) if request_id is not None else None
            params = getattr(request, "sampling_params", None)
            extra = getattr(params, "extra_args", None)
            name = extra.get(ROWS_KEY) if extra else None
            if name is not None:
                if name not in state.ids:
                    raise KeyError(f"request {request_id} wants SHiRA adapter {name!r} per row; it is not loaded")
                ids[i] = 1 + state.ids[name]
        if ids.any():
            starts = model_runner.query_start_loc.np[:count + 1]
            rows = np.repeat(ids, np.diff(starts))
    state.step, state.rows = context, rows
    return rows


def wrap(state: RowState, module: torch.nn.Module, module_name: str, model_runner) -> None:
    """Bind ``module.cpu_linear`` to vLLM's kernel plus the step's per-row deltas (once per binding)."""
    from ...methods.shira.grouped import add_packed_rows

    inner = getattr(module, "cpu_linear", None)
    if inner is None:
        raise ValueError(f"{module_name} ({type(module).__name__}) has no cpu_linear: vLLM's CPU linear path, "
                         "which per-row adapters hook, does not run it")
    if getattr(inner, "_shirakit_rows", False):
        return

    def linear(x, weight, bias):
        y = inner(x, weight, bias)
        layer = state.layers.get(module_name)
        if layer is None:
            return y
        rows = step_rows(state, model_runner)
        if rows is None:
            return y
        x2 = x.reshape(-1, x.shape[-1])
        tokens = x2.shape[0]
        ids = rows[:tokens] if rows.size >= tokens else np.concatenate([rows, np.zeros(tokens - rows.size, np.int32)])
        which = layer.lut[ids] if layer.packed is not None else None
        sparse = which is not None and bool((which >= 0).any())
        dense = [(merged, np.flatnonzero(ids == key)) for key, merged in layer.dense.items()]
        dense = [(merged, at) for merged, at in dense if at.size]
        if not sparse and not dense:
            return y
        if x2.dtype != layer.dtype or y.dtype != x2.dtype:
            raise TypeError(f"{module_name}: per-row adapters laid out for {layer.dtype}, the step "
                            f"runs {x2.dtype} -> {y.dtype}")
        y2 = y.reshape(tokens, -1)
        if not y2.is_contiguous():
            y2 = y2.contiguous()
            y = y2.view(y.shape)
        if sparse:
            add_packed_rows(layer.packed, which, x2.contiguous(), y2)
        for merged, at in dense:  # VeRA/MiSS rows: their fused weight's product, for those rows only
            index = torch.from_numpy(at)
            y2[index] = torch.nn.functional.linear(x2[index], merged, bias)
        state.calls += 1
        return y

    linear._shirakit_rows = True
    module.cpu_linear = linear
