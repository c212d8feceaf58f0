"""The engine: one thread that owns the model and generates for every request.

HTTP handlers only call :meth:`Engine.submit` / :meth:`Engine.cancel` / :meth:`Engine.call`;
everything that touches the model (forward passes, adapter loads, evictions, fused switches)
happens on the engine thread, so adapter state can never interleave between requests.

Scheduling (continuous batching, as in Orca, Yu et al. OSDI 2022): between two decode steps the
engine retires finished rows and admits waiting requests; the newcomers' prompts are prefilled in
one left-padded forward and their keys/values joined to the running batch (see ``kv.py``). Each
step then decodes one token for every running row. Which adapter a row uses:

- every row wants one adapter (or the base) -> *fused*: ``switch_adapter`` merges it (SHiRA: two
  scatters per layer) and the forward is the bare base product;
- rows want different adapters -> *mixed*: nothing merged, ``shirakit.route`` gives each row its
  adapter's delta.

Adapter cache misses (``cache.py``) are split in two: a worker thread reads the adapter's folder
as soon as a request for it is queued (``prefetch.py``), and the engine thread only puts the read
tensors into the model; until its files are read, a request waits without holding up the others.

Fusing costs a switch in and out and saves the per-row delta on every step in between, so a
uniform batch is fused when its horizon (the most tokens a row may still generate) is at least
its method's crossover in steps (``Adapter.fuse_min_steps``, measured by benchmarks/fuse_crossover.py;
docs/serving.md): SHiRA's switch is two scatters, LoRA's and VeRA's a dense product per layer.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import queue
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import shirakit
from shirakit.core.adapter import Adapter
from shirakit.core.registry import METHODS
from shirakit.io.checkpoint import read_adapter_files
from shirakit.model.routing import BASE

from .cache import AdapterCache, AdapterLoadError
from .kv import BatchKV, cache_from
from .metrics import Counters
from .prefetch import Prefetcher
from .sequence import SamplingParams, Sequence, logprob_entries, sample

log = logging.getLogger("shirakit.serve")

# A uniform batch is fused when it may still run its method's Adapter.fuse_min_steps decode steps.

# what admitting a waiting request found (Engine._pin)
READY, FAILED, READING, NO_SLOT = "ready", "failed", "reading", "no slot"


class QueueFull(RuntimeError):
    """More requests are waiting than the engine accepts (HTTP 429)."""


class UnknownModel(KeyError):
    """The request names neither the base model nor a registered adapter (HTTP 404)."""


class RequestFailed(RuntimeError):
    """Generating for this request failed (its sampling, stop check or text); only it is failed (HTTP 500)."""


@dataclass
class Output:
    """What one choice produced since the last event (the engine sends these to the sink)."""

    index: int
    text: str
    finish_reason: str | None
    completion_tokens: int
    logprobs: list | None = None  # [(token text, logprob or None, {alternative: logprob} or None)]


@dataclass
class Request:
    request_id: str
    model: str  # adapter name or the base model's served name
    prompt: list[int]
    params: SamplingParams
    n: int
    sink: Callable[[Output | Exception], None]
    adapter: str = BASE
    open: int = 0  # choices not finished yet
    pinned: bool = False
    failed: bool = False  # told its error; its rows leave the batch before the next step


def adapter_bytes(model: torch.nn.Module, name: str) -> int:
    return sum(t.numel() * t.element_size() for t in shirakit.adapter_state_dict(model, name).values())


class Engine:
    """Continuous-batching generator over one base model and many adapters."""

    def __init__(self, model, tokenizer, base_name: str, adapters: dict[str, Path] | None = None,
                 max_loaded: int = 8, max_loaded_mb: float | None = None, max_batch: int = 32,
                 max_queue: int = 256, fuse_min_steps: int | None = None) -> None:
        self.model, self.tokenizer, self.base_name = model.eval(), tokenizer, base_name
        self.device = next(model.parameters()).device
        self.max_batch, self.max_queue, self.fuse_min_steps = max_batch, max_queue, fuse_min_steps
        max_bytes = None if max_loaded_mb is None else int(max_loaded_mb * 2**20)
        self.cache = AdapterCache(self._load_into_model, self._unload_from_model, max_loaded, max_bytes)
        for name, path in (adapters or {}).items():
            self.cache.register(name, path)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.max_context = _context_length(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._keep_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.stats = Counters("engine")
        self.prefetch = Prefetcher(max_ready=max_batch)
        self._lock = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._cancelled: set[str] = set()
        self._running: list[Sequence] = []
        self._requests: dict[str, Request] = {}
        self._batch = BatchKV()
        self._fused: str | None = None  # the adapter merged into the weights now
        self._methods: dict[str, str] = {}  # adapter -> peft_type, for its fusing threshold
        self._ids = itertools.count()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="shirakit-engine", daemon=True)

    # ---- the public, thread-safe side ---------------------------------------------------
    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.prefetch.close()

    def models(self) -> list[str]:
        """The served base name first, then every registered adapter."""
        with self._lock:
            return [self.base_name, *sorted(self.cache.paths)]

    def snapshot(self) -> dict[str, float]:
        """Counters and gauges for /metrics (plain numbers: they cross process boundaries under Ray)."""
        return {**self.stats.numbers(), **self.cache.stats.numbers(),
                "adapter_read_seconds": self.prefetch.read_seconds,
                "adapters_loaded": len(self.cache.loaded), "adapters_loaded_bytes": self.cache.loaded_bytes}

    def knows(self, name: str) -> bool:
        with self._lock:
            return name == self.base_name or self.cache.known(name)

    def submit(self, model: str, prompt: list[int], params: SamplingParams, n: int,
               sink: Callable[[Output | Exception], None]) -> str:
        """Queue a request; the sink receives :class:`Output` events (or one exception)."""
        if not self.knows(model):
            raise UnknownModel(model)
        request = Request(f"req-{next(self._ids)}", model, list(prompt), params, n, sink)
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (the limit is {self.max_queue})")
            self._waiting.append(request)
            self.stats.waiting = len(self._waiting)
            path = self.cache.paths.get(model)
            if path is not None and not self.cache.is_loaded(model):
                self.prefetch.want(model, path)  # read its folder now, while it waits
            self._lock.notify_all()
        return request.request_id

    def cancel(self, request_id: str) -> None:
        """Drop a request (its client went away); its rows leave the batch before the next step."""
        with self._lock:
            self._cancelled.add(request_id)
            self._lock.notify_all()

    def call(self, fn: Callable[[], object]) -> Future:
        """Run ``fn`` on the engine thread between steps (adapter loads, unloads); a Future of its result."""
        future: Future = Future()
        self._commands.put((fn, future))
        with self._lock:
            self._lock.notify_all()
        return future

    def load_adapter(self, name: str, path: str | Path, files: Future | None = None) -> None:
        """Register ``path`` as ``name`` and load it now (raises :class:`AdapterLoadError`).
        ``files``: the folder already read (``self.prefetch.read(path)``, off this thread)."""
        with self._lock:
            if name == self.base_name or self.cache.known(name):
                raise ValueError(f"an adapter or model named {name!r} is already being served")
            self.cache.register(name, path)
        try:
            if self.cache.acquire(name, files):
                self.cache.release(self.cache.key(name))
        except AdapterLoadError:
            with self._lock:
                self.cache.unregister(name)
            raise

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            if not self.cache.known(name):
                raise UnknownModel(name)
            self.cache.unregister(name)
            self.prefetch.forget(name)

    # ---- model-side callbacks of the cache (engine thread) ----------------------------------
    def _load_into_model(self, name: str, source: Path | Future) -> int:
        """``source``: the folder, or the Future of its files read ahead (raises what the read raised)."""
        files = source.result() if isinstance(source, Future) else read_adapter_files(source)
        self._switch(None)
        self._methods[name] = files.config.peft_type
        shirakit.load_adapter(self.model, files, name)
        shirakit.switch_adapter(self.model, None)  # loaded, but inactive: rows pick it per step
        return adapter_bytes(self.model, name)

    def _unload_from_model(self, name: str) -> None:
        self._switch(None)
        shirakit.delete_adapter(self.model, name)
        self._methods.pop(name, None)

    # ---- the engine thread -------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._stop or self._waiting or self._running or not self._commands.empty()):
                    self._lock.wait(0.5)
                if self._stop:
                    break
            self._run_commands()
            try:
                self._retire()
                self._admit()
                if self._running:
                    self._decode_step()
            except Exception as exc:  # keep serving: fail what was running, start from a clean batch
                log.exception("engine step failed")
                self._fail_running(exc)
        self._fail_running(RuntimeError("the server is shutting down"))

    def _run_commands(self) -> None:
        while not self._commands.empty():
            fn, future = self._commands.get()
            try:
                future.set_result(fn())
            except Exception as exc:
                future.set_exception(exc)

    def _admit(self) -> None:
        """Move waiting requests into the batch while rows and adapter slots allow.

        In arrival order, except that a request whose adapter folder is still being read (on the
        prefetch thread) is passed over, not waited for: the requests behind it go on. A request
        that needs an adapter slot while every loaded adapter is pinned stops the scan (slots go
        first come, first served).
        """
        self._read_ahead()
        admitted: list[Sequence] = []
        index = 0
        while True:
            with self._lock:
                if index >= len(self._waiting):
                    break
                request = self._waiting[index]
                if request.request_id in self._cancelled:
                    self._cancelled.discard(request.request_id)
                    self._remove_waiting(index)
                    self.stats.requests_cancelled += 1
                    continue
                full = len(self._running) + len(admitted) + request.n > self.max_batch
                if full and (self._running or admitted):
                    break
            verdict = self._pin(request)
            if verdict == NO_SLOT:
                break
            if verdict == READING:
                index += 1
                continue
            with self._lock:
                self._remove_waiting(index)
            if verdict == READY:
                try:
                    admitted.extend(self._sequences(request))
                except Exception as exc:  # this request's parameters: it fails, the others go on
                    self._fail_request(request, exc)
                    self._close_failed(request)
        if admitted:
            self._prefill(admitted)

    def _remove_waiting(self, index: int) -> None:  # with self._lock held
        del self._waiting[index]
        self.stats.waiting = len(self._waiting)

    def _read_ahead(self) -> None:
        """Have the folders of waiting requests' unloaded adapters read, in queue order, as many as
        the prefetcher holds; drop reads that no waiting request wants any more."""
        with self._lock:
            wanted = {r.model: self.cache.paths[r.model] for r in self._waiting
                      if r.model in self.cache.paths and not self.cache.is_loaded(r.model)}
        self.prefetch.keep_only(wanted)
        for name, path in wanted.items():
            if not self.prefetch.want(name, path):
                break

    def _pin(self, request: Request) -> str:
        """READY: pinned, can run; FAILED: the sink was told; READING: its adapter's folder is not
        read yet; NO_SLOT: no adapter slot free (every loaded adapter is pinned)."""
        if request.model == self.base_name:
            return READY
        with self._lock:
            path = self.cache.paths.get(request.model)
        if path is None:
            self._fail(request, UnknownModel(request.model))
            return FAILED
        source = None
        if not self.cache.is_loaded(request.model):
            if not self.cache.has_room():
                return NO_SLOT
            source = self.prefetch.take(request.model, path)
            if source is None:
                return READING
        try:
            if not self.cache.acquire(request.model, source):
                return NO_SLOT
        except AdapterLoadError as exc:
            self._fail(request, exc)
            return FAILED
        request.adapter, request.pinned = self.cache.key(request.model), True
        return READY

    def _sequences(self, request: Request) -> list[Sequence]:
        rows = [Sequence(request.request_id, i, request.adapter, request.prompt, request.params)
                for i in range(request.n)]
        request.open = request.n
        self._requests[request.request_id] = request
        self.stats.prompt_tokens += len(request.prompt)
        return rows

    # ---- forward passes ------------------------------------------------------------------
    def _prefill(self, sequences: list[Sequence]) -> None:
        """One left-padded forward over the newcomers' prompts; their first tokens; join the batch."""
        length = max(len(s.prompt) for s in sequences)
        ids = torch.full((len(sequences), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, length - len(seq.prompt):] = torch.tensor(seq.prompt)
            mask[row, length - len(seq.prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        echo = {id(s) for s in sequences if s.params.echo and s.params.logprobs is not None}
        out = self._forward(sequences, ids, mask, positions, None, every_position=bool(echo))
        for row, seq in enumerate(sequences):
            if id(seq) in echo:  # the prompt's own log-probabilities: position i predicts token i + 1
                try:
                    start = length - len(seq.prompt)
                    logprobs = torch.log_softmax(out.logits[row, start:length - 1].float(), dim=-1)
                    first = (self.tokenizer.decode([seq.prompt[0]]), None, None)
                    seq.logprobs = [first, *logprob_entries(logprobs, seq.prompt[1:], seq.params.logprobs,
                                                            self.tokenizer)]
                except Exception as exc:
                    self._fail_request(self._requests[seq.request_id], exc)
        joined = BatchKV()
        joined.set(out.past_key_values, mask)
        self._batch.extend(joined)
        self._running.extend(sequences)
        self.stats.prefill_batches += 1
        self._advance(sequences, out.logits[:, -1])

    def _decode_step(self) -> None:
        rows = self._running
        ids = torch.tensor([[s.tokens[-1]] for s in rows], device=self.device)
        mask = self._batch.step_mask()
        out = self._forward(rows, ids, mask, self._batch.positions(), self._batch.kv)
        self._batch.set(out.past_key_values, mask)
        self.stats.decode_steps += 1
        self._advance(rows, out.logits[:, -1])

    @torch.inference_mode()
    def _forward(self, rows: list[Sequence], ids, mask, positions, kv, every_position: bool = False):
        kwargs = {"logits_to_keep": 1} if self._keep_logits and not every_position else {}
        horizon = max(s.remaining for s in rows)
        with self._adapters_for([s.adapter for s in rows], horizon):
            return self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                              past_key_values=cache_from(kv), use_cache=True, **kwargs)

    def _adapters_for(self, names: list[str], horizon: int):
        """Fused when every row wants one adapter and fusing pays off; otherwise route per row."""
        wanted = set(names)
        if len(wanted) == 1:
            target = None if names[0] == BASE else names[0]
            if target in (self._fused, None) or horizon >= self._fuse_threshold(target):
                self._switch(target)
                self.stats.fused_steps += 1
                return contextlib.nullcontext()
        self._switch(None)
        self.stats.routed_steps += 1
        self.stats.mixed_steps += len(wanted) > 1
        return shirakit.route(self.model, names)

    def _fuse_threshold(self, name: str) -> int:
        if self.fuse_min_steps is not None:
            return self.fuse_min_steps
        return METHODS.get(self._methods.get(name, ""), Adapter).fuse_min_steps

    def _switch(self, target: str | None) -> None:
        if target == self._fused:
            return
        shirakit.switch_adapter(self.model, target)
        self._fused = target
        self.stats.switches += 1

    # ---- results ---------------------------------------------------------------------
    def _advance(self, rows: list[Sequence], logits: torch.Tensor) -> None:
        """Choose each row's next token, stream what settled, retire finished or cancelled rows.

        A row whose sampling, stop check, text or sink raises fails its own request only (its
        other choices too); the rest of the batch goes on as if it had never been there.
        """
        greedy = logits.argmax(dim=-1).tolist()
        for row, seq in enumerate(rows):
            request = self._requests[seq.request_id]
            if request.failed:
                continue
            try:
                if seq.params.adjusts:  # logit_bias, penalties: this row's own logits
                    adjusted = seq.adjusted(logits[row])
                    token = int(adjusted.argmax()) if seq.greedy else sample(adjusted, seq)
                else:
                    token = greedy[row] if seq.greedy else sample(logits[row], seq)
                if seq.params.logprobs is not None:  # of the model's distribution, before any adjustment
                    logprobs = torch.log_softmax(logits[row : row + 1].float(), dim=-1)
                    seq.logprobs += logprob_entries(logprobs, [token], seq.params.logprobs, self.tokenizer)
                seq.add(token, self.tokenizer, self.eos_ids)
                self.stats.generation_tokens += 1
                delta = seq.settled_delta()
                if delta or seq.finish_reason:
                    request.sink(Output(seq.index, delta, seq.finish_reason, len(seq.tokens), seq.take_logprobs()))
            except Exception as exc:
                self._fail_request(request, exc)
        self._retire()

    def _fail_request(self, request: Request, exc: Exception) -> None:
        """Tell one request that it failed; its rows leave at the next retire (``request.failed``)."""
        log.warning("request %s failed: %s: %s", request.request_id, type(exc).__name__, exc)
        request.failed = True
        error = exc if isinstance(exc, (AdapterLoadError, UnknownModel)) else \
            RequestFailed(f"generating this request failed: {type(exc).__name__}: {exc}")
        with contextlib.suppress(Exception):  # a sink that cannot take it: its client is gone
            self._fail(request, error)

    def _close_failed(self, request: Request) -> None:
        """A failed request that never joined the batch: unpin its adapter."""
        if request.pinned:
            request.pinned = False
            self.cache.release(request.adapter)

    def _retire(self) -> None:
        """Take finished and cancelled rows out of the batch; release their adapters."""
        with self._lock:
            cancelled = set(self._cancelled)
        done = [s.finish_reason is not None or s.request_id in cancelled or self._requests[s.request_id].failed
                for s in self._running]
        if any(done):
            for seq, gone in zip(self._running, done):
                if gone:
                    self._close(seq, cancelled=seq.finish_reason is None)
            keep = [i for i, gone in enumerate(done) if not gone]
            self._running = [self._running[i] for i in keep]
            self._batch.select(keep)
        self.stats.running = len(self._running)
        if cancelled:  # forget ids of requests that are gone (finished, or cancelled twice)
            with self._lock:
                waiting = {w.request_id for w in self._waiting}
                self._cancelled = {c for c in self._cancelled if c in self._requests or c in waiting}

    def _close(self, seq: Sequence, cancelled: bool) -> None:
        request = self._requests.get(seq.request_id)
        if request is None:
            return
        request.open -= 1
        if request.open:
            return
        del self._requests[seq.request_id]
        if request.pinned:
            self.cache.release(request.adapter)
        if request.failed:
            return  # counted by _fail
        if cancelled:
            self.stats.requests_cancelled += 1
        else:
            self.stats.requests_finished += 1

    def _fail(self, request: Request, exc: Exception) -> None:
        self.stats.requests_failed += 1
        request.sink(exc)

    def _fail_running(self, exc: Exception) -> None:
        for request in list(self._requests.values()):
            if request.pinned:
                self.cache.release(request.adapter)
            if not request.failed:
                with contextlib.suppress(Exception):
                    self._fail(request, exc)
        self._requests.clear()
        self._running = []
        self._batch = BatchKV()
        self.stats.running = 0
        with contextlib.suppress(Exception):
            self._switch(None)


def _eos_ids(model, tokenizer) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def _context_length(model, tokenizer) -> int:
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return int(min(getattr(tokenizer, "model_max_length", 2048), 1 << 20))
