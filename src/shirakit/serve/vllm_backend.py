"""``shirakit serve --engine vllm``: the same HTTP app (``app.py``) over vLLM's async engine.

SHiRA adapters are fused into vLLM's weights by the worker extension (:mod:`shirakit.vllm`, two
scatters per weight) while one adapter's requests run, or, where the workers can (CPU, fp32; policies
``auto`` and ``rows``), served per row on the base weights inside vLLM's mixed batches
(``integrations/vllm/rows.py``; VeRA and MiSS too, by their merged weights' product for their rows);
the front scheduler (``GroupScheduler``) decides which, per request;
VeRA and MiSS are fused the same way with their dense deltas (computed once here on a CPU copy of the
model, one copy per weight per switch); LoRA adapters go through vLLM's own LoRA and run with the base
model's requests (the base weights). docs/vllm.md says why nothing but LoRA runs per request.
Tokens come from vLLM; text, stop strings and streaming deltas are made here by the built-in engine's
:class:`Sequence`, so both engines cut and stream text the same way.
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

from .build import adapter_folders
from .engine import Output, UnknownModel
from .metrics import Counters
from .policy import Policy
from .sequence import SamplingParams, Sequence

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's LoRAConfig.max_lora_rank accepts


SPARSE, NATIVE, DENSE = "sparse", "native", "dense"  # fused by scatters, vLLM's own LoRA, fused by dense deltas


def adapter_method(folder: Path) -> tuple[str, int]:
    """(how vLLM serves it, r) of an adapter folder, from its config alone: SHiRA by scatters, LoRA
    natively, every other method by its dense per-layer deltas."""
    from shirakit.io.config_file import read_config
    from shirakit.methods.lora import LoraConfig
    from shirakit.methods.shira import ShiraConfig

    config = read_config(folder)
    kind = SPARSE if isinstance(config, ShiraConfig) else NATIVE if isinstance(config, LoraConfig) else DENSE
    return kind, int(getattr(config, "r", 0) or 0)


class VllmBackend:
    """What ``app.py`` talks to, over ``vllm.v1.engine.async_llm.AsyncLLM``."""

    supports_top_k = True  # passed to vLLM's SamplingParams (its 0 is off, as ours)

    def __init__(self, model_dir: str | Path, adapters: str | Path | None = None, served_model_name: str | None = None,
                 dtype: str = "auto", max_model_len: int | None = None, max_lora_rank: int | None = None,
                 max_loras: int = 4, policy: str = "auto", slice_s: float = 0.5, memory_fraction: float = 0.25,
                 tensor_parallel_size: int = 1, access: Policy | None = None) -> None:
        from transformers import AutoTokenizer
        from vllm.v1.engine.async_llm import AsyncLLM

        from shirakit.vllm import GroupScheduler, engine_args

        self.policy = access or Policy()  # who may call what (app.py reads it); `policy` above is the scheduler's
        self.model_dir = Path(model_dir)
        self.base_name = served_model_name or self.model_dir.name
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.paths = adapter_folders(adapters)
        if self.base_name in self.paths:
            raise ValueError(f"adapter folder {self.paths[self.base_name]} has the served model's name "
                             f"{self.base_name!r}; rename one")
        lora_ranks = [r for kind, r in map(adapter_method, self.paths.values()) if kind == NATIVE]
        wanted = max(lora_ranks, default=0) if max_lora_rank is None else max_lora_rank
        self.max_lora_rank = next((r for r in LORA_RANKS if r >= wanted), 0) if wanted else 0
        if wanted > LORA_RANKS[-1]:
            raise ValueError(f"LoRA rank {wanted} exceeds vLLM's largest max_lora_rank {LORA_RANKS[-1]}")
        if dtype == "auto":  # as the builtin engine: CPUs run half precision slowly, GPUs keep the file's dtype
            import torch

            dtype = "auto" if torch.cuda.is_available() else "float32"
        args = engine_args(str(self.model_dir), dtype=dtype,
                           max_model_len=max_model_len, lora_rank=self.max_lora_rank, max_loras=max_loras,
                           memory_fraction=memory_fraction, tensor_parallel_size=tensor_parallel_size)
        self.engine = AsyncLLM.from_engine_args(args)
        self.max_context = self.engine.model_config.max_model_len
        self.eos_ids = self._eos_ids()
        self.scheduler = GroupScheduler(self._switch, policy, slice_s)
        # per-row SHiRA (rows.py) needs vLLM's CPU linear path and the grouped kernel (each worker checks
        # again when it loads an adapter); None: SHiRA may run per row
        from shirakit.vllm import front_supported

        self.rows_reason = front_supported(self.engine.model_config) if policy in ("auto", "rows") else \
            f"--policy {policy} serves SHiRA fused only"
        if policy == "rows" and self.rows_reason:
            self.engine.shutdown()
            raise ValueError(f"--policy rows: per-row SHiRA cannot run here: {self.rows_reason}")
        self.kinds: dict[str, str] = {}  # loaded adapter -> SPARSE | NATIVE | DENSE
        self.lora_requests: dict[str, object] = {}
        self.values: dict[str, int] = {}  # fused adapter -> bytes it keeps on the first worker
        self._lora_ids = itertools.count(1)
        self._ids = itertools.count()
        self._load_lock: asyncio.Lock | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # the HTTP server's, once a request came
        self.stats, self.cache_stats = Counters("engine"), Counters("cache")
        self._scratch = tempfile.TemporaryDirectory(prefix="shirakit-vllm-")  # dense deltas for the workers
        self._hf = None

    def _hf_model(self):
        """A CPU fp32 copy of the Hugging Face model (dense deltas of VeRA, MiSS), loaded on first need."""
        if self._hf is None:
            import torch
            from transformers import AutoModelForCausalLM

            self._hf = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32).eval()
        return self._hf

    def _eos_ids(self) -> set[int]:
        from transformers import GenerationConfig

        try:
            eos = GenerationConfig.from_pretrained(self.model_dir).eos_token_id
        except OSError:
            eos = None
        eos = self.tokenizer.eos_token_id if eos is None else eos
        return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None}

    # ---- the backend interface (serve/backend.py) ------------------------------------------------
    def models(self) -> list[str]:
        return [self.base_name, *sorted(self.paths)]

    def knows(self, name: str) -> bool:
        return name == self.base_name or name in self.paths

    async def generate(self, model: str, prompt: list[int], params: SamplingParams, n: int) -> AsyncIterator[Output]:
        if not self.knows(model):
            raise UnknownModel(model)
        self.loop = asyncio.get_running_loop()  # for callers on other threads (tests)
        adapter = None if model == self.base_name else model
        await self._ensure_loaded(adapter)
        kind = self.kinds.get(adapter)
        group = adapter if adapter is not None and kind != NATIVE else None
        per_row = kind in (SPARSE, DENSE) and self.rows_reason is None  # it may run per row on the base weights
        if per_row and self.scheduler.policy == "rows":
            group = None
        lora = self.lora_requests.get(adapter) if adapter is not None else None
        request_id = f"shirakit-{next(self._ids)}"
        finished = False
        try:
            async with self.scheduler.turn(group, flexible=per_row) as under:
                self.stats.prompt_tokens += len(prompt) * n
                if adapter is not None and adapter not in self.kinds:
                    raise UnknownModel(adapter)  # unloaded while it waited (an unload waits for running ones)
                rows = adapter if per_row and under is None else None  # on the base weights: its delta per row
                streams = [self._choice(f"{request_id}-{i}", i, adapter, prompt, params, lora, rows)
                           for i in range(n)]
                async for event in _merge(streams):
                    if event.finish_reason is not None:
                        self.stats.generation_tokens += event.completion_tokens
                    yield event
                finished = True
                self.stats.requests_finished += 1
        except (asyncio.CancelledError, GeneratorExit):
            self.stats.requests_cancelled += 1
            raise
        except Exception:
            if not finished:
                self.stats.requests_failed += 1
            raise

    async def _choice(self, request_id: str, index: int, adapter: str | None, prompt: list[int],
                      params: SamplingParams, lora, rows: str | None = None) -> AsyncIterator[Output]:
        from vllm import SamplingParams as VllmParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        from shirakit.vllm import ROWS_KEY

        seed = None if params.seed is None else params.seed + index
        vparams = VllmParams(max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                             top_k=params.top_k,
                             seed=seed, stop_token_ids=[] if params.ignore_eos else sorted(self.eos_ids),
                             ignore_eos=params.ignore_eos, detokenize=False,
                             output_kind=RequestOutputKind.DELTA,
                             extra_args=None if rows is None else {ROWS_KEY: rows})
        seq = Sequence(request_id, index, adapter or "", prompt, params)
        stream = self.engine.generate(TokensPrompt(prompt_token_ids=prompt), vparams, request_id, lora_request=lora)
        try:
            async for out in stream:
                for token in out.outputs[0].token_ids:
                    seq.add(int(token), self.tokenizer, self.eos_ids)
                    if seq.finish_reason is not None:
                        break
                if seq.finish_reason is None and out.finished:  # vLLM stopped first (its length count)
                    seq.finish_reason = out.outputs[0].finish_reason or "length"
                yield Output(index, seq.settled_delta(), seq.finish_reason, len(seq.tokens))
                if seq.finish_reason is not None:
                    return
        finally:
            await stream.aclose()  # vLLM aborts a request whose stream is closed early (a stop string)

    async def load_adapter(self, name: str, path: str) -> None:
        if name == self.base_name:
            raise ValueError(f"{name!r} is the served model's name")
        if name in self.paths:
            raise ValueError(f"an adapter named {name!r} is already registered; unload it first")
        folder = Path(path)
        await self._load(name, folder)
        self.paths[name] = folder

    async def unload_adapter(self, name: str) -> None:
        if name not in self.paths:
            raise UnknownModel(name)
        del self.paths[name]  # new requests get 404 at once
        kind = self.kinds.pop(name, None)
        if kind in (SPARSE, DENSE):
            async with self.scheduler.exclusive():
                await self.engine.collective_rpc("shira_unload", args=(name,))
                if self.scheduler.active == name:
                    await self.scheduler.forget()
        elif kind == NATIVE:
            await self.engine.remove_lora(self.lora_requests.pop(name).lora_int_id)
        self.values.pop(name, None)

    async def snapshots(self) -> list[tuple[dict[str, str], dict[str, float]]]:
        self.stats.waiting = self.scheduler.waiting
        self.stats.running = self.scheduler.inflight
        self.stats.switches = self.scheduler.switches
        numbers = {**self.stats.numbers(), **self.cache_stats.numbers(), "adapter_read_seconds": 0.0,
                   "adapters_loaded": len(self.kinds),
                   "adapters_loaded_bytes": sum(self.values.values())}
        return [({}, numbers)]

    # ---- adapters ----------------------------------------------------------------------------------
    async def _ensure_loaded(self, name: str | None) -> None:
        if name is None:
            return
        if self._load_lock is None:
            self._load_lock = asyncio.Lock()
        async with self._load_lock:
            if name in self.kinds:
                self.cache_stats.cache_hits += 1
                return
            await self._load(name, self.paths[name])

    async def _load(self, name: str, folder: Path) -> None:
        from vllm.lora.request import LoRARequest

        start = time.perf_counter()
        try:
            kind, r = adapter_method(folder)
            if kind == SPARSE:  # read and mapped on every worker; the weights are not touched
                results = await self.engine.collective_rpc("shira_load", args=(name, str(folder)))
                self.values[name] = int(results[0]["bytes"])
            elif kind == NATIVE:
                if not self.max_lora_rank:
                    raise ValueError(f"{folder}: a LoRA adapter, but vLLM was started without LoRA "
                                     "(start with --max-lora-rank R, or put a LoRA folder under --adapters)")
                if r > self.max_lora_rank:
                    raise ValueError(f"{folder}: LoRA r={r} exceeds --max-lora-rank {self.max_lora_rank}")
                request = LoRARequest(name, next(self._lora_ids), str(folder))
                await self.engine.add_lora(request)
                self.lora_requests[name] = request
            else:  # VeRA, MiSS, ...: their dense deltas
                from shirakit.vllm import write_dense_deltas

                file = Path(self._scratch.name) / f"{len(self.kinds)}-{name}.safetensors"
                await asyncio.to_thread(write_dense_deltas, self._hf_model(), folder, file)
                results = await self.engine.collective_rpc("shira_load_dense", args=(name, str(file)))
                self.values[name] = int(results[0]["bytes"])
            if kind in (SPARSE, DENSE):
                refused = next((r["rows"] for r in results if r["rows"]), None)
                if refused and self.rows_reason is None:  # a worker cannot add deltas per row: fused from now on
                    if self.scheduler.policy == "rows":
                        raise ValueError(f"--policy rows: a vLLM worker cannot serve adapters per row: {refused}")
                    self.rows_reason = refused
                    print(f"shirakit: adapters served fused only from now on: {refused}")
        except Exception as exc:
            self.cache_stats.adapter_load_failures += 1
            raise ValueError(str(exc)) from exc
        self.kinds[name] = kind
        self.cache_stats.cache_misses += 1
        self.cache_stats.adapter_load_seconds += time.perf_counter() - start

    async def base_is_exact(self) -> list[dict[str, bool]]:
        """Switch to the base (nothing in flight) and compare every written weight with the checkpoint,
        bit for bit, on every worker (tests)."""
        async with self.scheduler.exclusive():
            await self.engine.collective_rpc("shira_activate", args=(None,))
            await self.scheduler.forget()
            return await self.engine.collective_rpc("shira_base_is_exact")

    async def _switch(self, group: str | None) -> None:
        await self.engine.collective_rpc("shira_activate", args=(group,))

    def stop(self, timeout: float | None = None) -> None:
        self.engine.shutdown()
        self._scratch.cleanup()


async def _merge(streams: list) -> AsyncIterator[Output]:
    """Events of several async iterators as they come; closing this closes them all."""
    if len(streams) == 1:
        async for event in streams[0]:
            yield event
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(stream):
        try:
            async for event in stream:
                await queue.put(event)
        except Exception as exc:  # handed to the consumer
            await queue.put(exc)
        finally:
            await queue.put(done)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    open_streams = len(tasks)
    try:
        while open_streams:
            item = await queue.get()
            if item is done:
                open_streams -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# ---- running it ----------------------------------------------------------------------------------
@dataclass
class RunningVllmServer:
    url: str
    backend: VllmBackend
    server: object
    thread: object

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.backend.stop()


def start_vllm_server(backend: VllmBackend, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0):
    """uvicorn on a thread over ``backend`` (tests, benchmarks); ``.stop()`` stops both."""
    from .app import create_app
    from .threaded import serve_on_thread

    url, server, thread = serve_on_thread(create_app(backend), host, port, timeout, backend.stop)
    return RunningVllmServer(url, backend, server, thread)


def build_vllm_backend(args) -> VllmBackend:
    from .build import default_model_dir

    return VllmBackend(args.model or default_model_dir(), args.adapters, args.served_model_name,
                       dtype=args.dtype, max_lora_rank=args.max_lora_rank, policy=args.policy,
                       slice_s=args.slice_s, tensor_parallel_size=args.tensor_parallel_size,
                       access=Policy.from_args(args.api_key, args.allow_runtime_adapters, args.adapter_root,
                                               args.max_request_mb))


def run_vllm(args) -> int:
    import uvicorn

    from .app import create_app

    backend = build_vllm_backend(args)
    shira = sum(adapter_method(p)[0] == SPARSE for p in backend.paths.values())
    how = "fused while one adapter runs, per row in mixed batches" if backend.rows_reason is None else \
        f"fused, one adapter's requests at a time (not per row: {backend.rows_reason})"
    print(f"engine: vllm (--engine vllm): SHiRA {how} ({shira} folder(s)), LoRA through vLLM's "
          f"own LoRA (max rank {backend.max_lora_rank or 'off'}), scheduler policy {args.policy}")
    print(f"serving {backend.base_name} and {len(backend.paths)} adapter(s) on http://{args.host}:{args.port}")
    try:
        uvicorn.run(create_app(backend), host=args.host, port=args.port, log_level="info")
    finally:
        backend.stop()
    return 0
