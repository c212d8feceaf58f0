"""The engine: one thread that owns the model and generates for every request.

HTTP handlers only call :meth:`Engine.submit` / :meth:`Engine.cancel` / :meth:`Engine.call`;
everything that touches the model (forward passes, adapter loads, evictions, fused switches)
happens on the engine thread, so adapter state can never interleave between requests.

Scheduling (continuous batching, as in Orca, Yu et al. OSDI 2022): each iteration the engine
retires finished rows, admits waiting requests while rows and the KV budget allow, then runs ONE
forward over a token for every row whose prompt is in and a chunk of the newcomers' prompts
(ragged, ``kv.RaggedStep``; models off transformers' attention interface: a prefill forward, then
a decode step). Rows keep their keys/values in preallocated slots (``kv.py``).

- Admission counts tokens, not only rows: a row reserves ``prompt + max_tokens`` positions, and
  the slots the batch would take (rows x its longest reservation, rounded as ``SlotKV.fit``) must
  stay within the KV budget (``max_kv_tokens``; by default derived from memory). A request that
  could never fit alone is refused at :meth:`submit` (HTTP 400); others wait their turn.
- Chunked prefill (as in Sarathi, Agrawal et al. 2023, arXiv 2308.16369): one iteration feeds at
  most ``max_num_batched_tokens`` tokens, one per decoding row and the rest to prompts, so a long
  prompt is prefilled over several iterations while the running rows keep decoding. While rows
  decode, the chunk is also sized by measured time (``chunk_slack``): a long prompt's chunk may
  make an iteration cost at most ``1 + chunk_slack`` decode steps, while a short prompt (one that
  costs at most ``CHUNK_BURST`` decode steps) goes in whole, several within the token budget
  (:meth:`Engine._timed_budgets`). With
  ``chunked_prefill=False`` the newcomers' prompts go in whole (the decoding rows wait for it).

Which adapter a forward uses:

- every row wants one adapter (or the base) -> *fused*: ``switch_adapter`` merges it (SHiRA: two
  scatters per layer) and the forward is the bare base product;
- rows want different adapters -> *mixed*: nothing merged, ``shirakit.route`` gives each row its
  adapter's delta. The prefill chunk and the decode step of one iteration decide together, so
  they do not switch back and forth between them.

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
import os
import queue
import statistics
import threading
import time
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
from .fused_norms import use_fused_rms_norms
from .kv import RaggedStep, SlotKV, ragged_forward, supports_ragged
from .metrics import Counters
from .prefetch import Prefetcher
from .sequence import SamplingParams, Sequence, logprob_entries, sample, sampling_probs
from .skinny_linear import use_skinny_linears

log = logging.getLogger("shirakit.serve")

# A uniform batch is fused when it may still run its method's Adapter.fuse_min_steps decode steps.

DEFAULT_BATCHED_TOKENS = 256  # tokens one iteration feeds (decoding rows + prefill chunk), chunked prefill
MIN_PREFILL_CHUNK = 16  # a prompt always advances by at least this many tokens an iteration
KV_MEMORY_SHARE = 0.4  # the default KV budget: this share of the memory free at start
DEFAULT_CHUNK_SLACK = 0.5  # a prefill chunk may make an iteration this much longer than a decode step alone
CHUNK_BURST = 2.0  # a prompt that costs at most this many decode steps is short: it goes in whole
TIMING_SAMPLES = 8  # the recent iterations the chunk-sizing estimates take their medians over
REFRESH_DECODE_EVERY = 32  # one decode-only iteration after this many with a chunk (a fresh decode time)
ROUTED = object()  # _plan_adapters: rows routed per row, nothing merged

# what admitting a waiting request found (Engine._pin)
READY, FAILED, READING, NO_SLOT = "ready", "failed", "reading", "no slot"


class QueueFull(RuntimeError):
    """More requests are waiting than the engine accepts (HTTP 429)."""


class UnknownModel(KeyError):
    """The request names neither the base model nor a registered adapter (HTTP 404)."""


class RequestTooLarge(ValueError):
    """The request could never fit the KV budget, even alone (HTTP 400)."""


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
                 max_queue: int = 256, fuse_min_steps: int | None = None,
                 max_num_batched_tokens: int = DEFAULT_BATCHED_TOKENS, max_kv_tokens: int | None = None,
                 chunked_prefill: bool = True, chunk_slack: float | None = DEFAULT_CHUNK_SLACK,
                 skinny_linears: bool = True, packed_weights: bool = True) -> None:
        self.model, self.tokenizer, self.base_name = model.eval(), tokenizer, base_name
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        # decode steps multiply each weight by a few rows, prefills by many: on CPU, W x^T and oneDNN
        # are often the faster forms there (skinny_linear.py); measured on the model's own layers, per shape
        # packed_weights=False: no packed copies (they hold one more copy of the linear weights)
        self.skinny_shapes = (use_skinny_linears(model, packed_rows=None if packed_weights else 0)
                              if skinny_linears and self.device.type == "cpu" else {})
        if self.skinny_shapes:
            log.info("CPU linears per weight shape (out, in): oneDNN on a packed copy of the weight from `packed` "
                     "rows, W x^T up to `few` rows, oneDNN from `many` rows (0: never; else F.linear): %s",
                     ", ".join(f"{shape}: few {f.few}, many {f.many}, packed {f.packed}"
                               for shape, f in self.skinny_shapes.items()))
        # Llama-family RMS norms in one call each (fused_norms.py; same results, fewer ops per step); like the
        # linears' forms, an instance attribute that skinny_linears=False leaves out
        self.fused_norms = use_fused_rms_norms(model) if skinny_linears and self.device.type == "cpu" else 0
        self.max_batch, self.max_queue, self.fuse_min_steps = max_batch, max_queue, fuse_min_steps
        if max_num_batched_tokens < MIN_PREFILL_CHUNK:
            raise ValueError(
                f"max_num_batched_tokens must be at least {MIN_PREFILL_CHUNK}; got {max_num_batched_tokens}")
        self.max_num_batched_tokens, self.chunked_prefill = max_num_batched_tokens, chunked_prefill
        if chunk_slack is not None and not chunk_slack > 0:
            raise ValueError(f"chunk_slack must be a positive fraction (or None: size chunks by tokens only); "
                             f"got {chunk_slack}")
        self.chunk_slack = chunk_slack
        # one forward per iteration (decoding rows and the prefill chunk together) where the model allows
        self.ragged = supports_ragged(model)
        self._decode_times: deque[float] = deque(maxlen=TIMING_SAMPLES)  # seconds, decode-only iterations
        self._token_times: deque[float] = deque(maxlen=TIMING_SAMPLES)  # seconds per prompt token fed beside them
        self._since_decode_only = 0
        max_bytes = None if max_loaded_mb is None else int(max_loaded_mb * 2**20)
        self.cache = AdapterCache(self._load_into_model, self._unload_from_model, max_loaded, max_bytes)
        for name, path in (adapters or {}).items():
            self.cache.register(name, path)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.max_context = _context_length(model, tokenizer)
        self._kv = SlotKV(max_batch, self.max_context)
        self._decoding = 0  # rows [0, _decoding) decode; rows after it are still prefilling their prompts
        self._union: set[str] = set()  # the adapters of this iteration's forwards
        self.kv_bytes_per_token = kv_bytes_per_token(model)
        if max_kv_tokens is None:
            max_kv_tokens = derived_kv_tokens(self.kv_bytes_per_token, self.device,
                                              self._kv.footprint(max_batch, self.max_context))
        if max_kv_tokens < self._kv.footprint(1, 1):
            raise ValueError(f"max_kv_tokens must hold at least one row ({self._kv.footprint(1, 1)} tokens); "
                             f"got {max_kv_tokens}")
        self.max_kv_tokens = int(max_kv_tokens)
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
                "adapter_read_seconds": self.prefetch.read_seconds, "kv_bytes_copied": self._kv.bytes_copied,
                "kv_budget_tokens": self.max_kv_tokens,
                "kv_allocated_tokens": self._kv.shape[0] * self._kv.shape[1],
                "adapters_loaded": len(self.cache.loaded), "adapters_loaded_bytes": self.cache.loaded_bytes}

    def knows(self, name: str) -> bool:
        with self._lock:
            return name == self.base_name or self.cache.known(name)

    def submit(self, model: str, prompt: list[int], params: SamplingParams, n: int,
               sink: Callable[[Output | Exception], None]) -> str:
        """Queue a request; the sink receives :class:`Output` events (or one exception)."""
        if not self.knows(model):
            raise UnknownModel(model)
        need = self._kv.footprint(n, len(prompt) + params.max_tokens)
        if need > self.max_kv_tokens:
            raise RequestTooLarge(
                f"this request needs {need} KV token positions ({n} choice(s) x prompt {len(prompt)} + max_tokens "
                f"{params.max_tokens}, rounded to the cache's slots); the server's KV budget is {self.max_kv_tokens} "
                f"(--max-kv-tokens): ask for fewer tokens or choices")
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
                self._iterate()
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
                rows = len(self._running) + len(admitted) + request.n
                longest = max([reserved(s) for s in (*self._running, *admitted)] + [reserved_by(request)])
                full = rows > self.max_batch or self._kv.footprint(rows, longest) > self.max_kv_tokens
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
            self._running.extend(admitted)
            self._kv.add(len(admitted))
            self._plan()

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
    def _plan(self) -> None:
        self._kv.plan(len(self._running), max((reserved(s) for s in self._running), default=0))

    def _iterate(self) -> None:
        """One iteration: a token for every decoding row and a chunk of the waiting prompts.

        Ragged (models on transformers' attention interface): both in ONE forward (``_step``).
        Otherwise one prefill forward, then one decode step; both decide fused or routed over the
        adapters of the whole iteration."""
        group, fed = self._prefill_group()
        self._union = {s.adapter for s in self._running[: self._decoding]} | {s.adapter for s in group}
        if self.ragged:
            if group or self._decoding:
                self._step(group, fed)
            return
        if group:
            self._prefill(group, fed, self._union)
        if self._decoding:
            self._union |= {s.adapter for s in self._running[: self._decoding]}
            self._decode_step()

    def _prefill_group(self) -> tuple[list[Sequence], list[int]]:
        """The prefilling rows this iteration feeds, and how many prompt tokens each.

        Unchunked: every prefilling row's whole prompt. Chunked: at most
        ``max_num_batched_tokens - decoding rows`` tokens (at least ``MIN_PREFILL_CHUNK``) go to the
        first prefilling rows in order. Padded forwards (models off the ragged path) feed every row
        of the group the first row's chunk (padding counted). Ragged forwards pack the rows, each
        its own count; while rows decode, time bounds them too (:meth:`_timed_budgets`): short
        prompts go in whole, a long one takes a chunk of the ``partial`` budget."""
        rows = self._running[self._decoding:]
        if not rows:
            return [], []
        if not self.chunked_prefill:
            return rows, [s.prefill_left for s in rows]
        budget = max(self.max_num_batched_tokens - self._decoding, MIN_PREFILL_CHUNK)
        capacity = self._kv.shape[1]
        if not self.ragged:
            chunk = min(budget, rows[0].prefill_left)
            group = [rows[0]]
            for slot, seq in enumerate(rows[1:], start=self._decoding + 1):
                if (len(group) + 1) * chunk > budget or self._kv.lengths[slot] + chunk > capacity:
                    break
                group.append(seq)
            return group, [min(chunk, s.prefill_left) for s in group]
        whole, partial = budget, budget
        if self._decoding and self.chunk_slack is not None:
            whole, partial = self._timed_budgets()
            if not whole:
                return [], []  # a decode-only iteration: measure what a decode step costs now
            whole, partial = min(whole, budget), min(partial, budget)
        group, fed, used = [], [], 0
        for slot, seq in enumerate(rows, start=self._decoding):
            room = capacity - self._kv.lengths[slot]
            if not seq.cached and seq.prefill_left <= min(whole, budget - used, room):
                count = seq.prefill_left  # a short prompt: in whole
            else:  # a chunk of the partial budget, and only while a row gets MIN_PREFILL_CHUNK from it
                count = min(seq.prefill_left, room, partial - used)
                if group and count < MIN_PREFILL_CHUNK or count <= 0:
                    break
            group.append(seq)
            fed.append(count)
            used += count
            if count < seq.prefill_left:
                break  # the rows after a partial one wait: prompts go in in order
        return group, fed

    def _timed_budgets(self) -> tuple[int, int]:
        """Prompt tokens one iteration may feed beside the decoding rows: (whole, partial).

        A long prompt's chunk may make an iteration cost at most ``1 + chunk_slack`` decode steps:
        ``partial = chunk_slack * t_decode / t_token`` tokens, from the medians of recent iterations
        (a decode-only one: ``t_decode``; one with ``c`` prompt tokens: ``t_token = (t - t_decode) / c``).
        A prompt of at most ``whole = CHUNK_BURST * t_decode / t_token`` tokens is short and goes in
        whole: splitting it would cost the decoding rows the same time in total and delay its
        first token by an iteration per chunk (the batch decoding one row fewer meanwhile). The
        guard is for long prompts, whose prefill would stall the rows for many steps.
        (0, 0) asks for a decode-only iteration (none measured yet, or ``REFRESH_DECODE_EVERY``
        iterations since the last one); ``MIN_PREFILL_CHUNK`` until a token's cost is measured, and
        never less (a prompt always advances)."""
        if not self._decode_times or self._since_decode_only >= REFRESH_DECODE_EVERY:
            return 0, 0
        if not self._token_times:
            return MIN_PREFILL_CHUNK, MIN_PREFILL_CHUNK
        per_token = max(statistics.median(self._token_times), 1e-9)
        t_decode = statistics.median(self._decode_times)
        partial = max(MIN_PREFILL_CHUNK, int(self.chunk_slack * t_decode / per_token))
        return max(partial, int(CHUNK_BURST * t_decode / per_token)), partial

    def _timed(self, decoding: int, fed: int, seconds: float) -> None:
        """Record one iteration's wall time for :meth:`_timed_budgets`."""
        if not decoding:
            return
        if not fed:
            self._decode_times.append(seconds)
            self._since_decode_only = 0
        elif self._decode_times:
            self._token_times.append(max(seconds - statistics.median(self._decode_times), 0.0) / fed)
            self._since_decode_only += 1

    def _step(self, group: list[Sequence], fed: list[int]) -> None:
        """One ragged forward (``kv.RaggedStep``): the last token of every decoding row (slots
        ``[0, decoding)``) and ``fed[i]`` prompt tokens of row ``group[i]`` (slots after the
        decoding rows), no padding. Decoding rows get their next
        token; prefill rows whose prompt is then in get their first and join the decoding rows."""
        began = time.perf_counter()
        decoding = self._decoding
        rows = self._running[:decoding]
        segments = [(decoding + i, seq.cached, count) for i, (seq, count) in enumerate(zip(group, fed))]
        ids = [s.tokens[-1] for s in rows]
        names = [s.adapter for s in rows]
        for seq, count in zip(group, fed):
            ids += seq.prompt[seq.cached: seq.cached + count]
            names += [seq.adapter] * count
        finishing = [i for i, (seq, count) in enumerate(zip(group, fed)) if count == seq.prefill_left]
        echo = [i for i, seq in enumerate(group) if seq.params.echo and seq.params.logprobs is not None]
        # the token positions whose logits are read: every decoding row's, a finishing row's last
        # one, every one of an echo row's chunk
        starts = list(itertools.accumulate([decoding, *fed]))
        wanted = list(range(decoding)) + [starts[i] + fed[i] - 1 for i in finishing]
        for i in echo:
            wanted += range(starts[i], starts[i] + fed[i])
        wanted = sorted(set(wanted))
        horizon = max(s.remaining for s in (*rows, *group))
        target = self._plan_adapters(names, horizon, self._union)
        step = RaggedStep(self._kv, decoding, segments, self.device)
        kwargs = {}
        if self._keep_logits:  # the output layer on the wanted positions only
            kwargs["logits_to_keep"] = torch.tensor(wanted, device=self.device)
        # one packed row of every request's tokens; a mixed step routes adapters per token of it
        with torch.inference_mode(), self._apply_adapters(target, names, per_token=True), \
                ragged_forward(self.model, step):
            out = self.model(input_ids=torch.tensor(ids, device=self.device).view(1, -1),
                             position_ids=step.positions.view(1, -1), past_key_values=step, use_cache=True, **kwargs)
        logits = out.logits.reshape(-1, out.logits.shape[-1])
        at = {token: (i if self._keep_logits else token) for i, token in enumerate(wanted)}  # token -> its logits row
        self._kv.advance(0, [1] * decoding + fed)
        for seq, count in zip(group, fed):
            seq.cached += count
        for i in echo:
            self._prompt_logprobs(group[i], fed[i], lambda n, i=i: logits[[at[starts[i] + j] for j in range(n)]])
        if decoding:
            self.stats.decode_steps += 1
        if group:
            self.stats.prefill_batches += 1
        done = [group[i] for i in finishing]
        for seq in done:  # to the end of the decoding rows (no copy when it is there already)
            self._place_swap(self._running.index(seq), self._decoding)
            self._decoding += 1
        where = [at[t] for t in range(decoding)] + [at[starts[i] + fed[i] - 1] for i in finishing]
        if where:
            self._advance([*rows, *done], logits[where])
        self._timed(decoding, sum(fed), time.perf_counter() - began)

    def _prefill(self, group: list[Sequence], fed: list[int], union: set[str]) -> None:
        """Feed ``fed[i]`` prompt tokens to row ``group[i]`` (slots ``[decoding, decoding +
        len(group))``), right-padded to the longest; rows whose prompt is then in get their first
        token and join the decoding rows."""
        start = self._decoding
        chunk = max(fed)
        ids = torch.full((len(group), chunk), self.pad_id, dtype=torch.long)
        for row, (seq, count) in enumerate(zip(group, fed)):
            ids[row, :count] = torch.tensor(seq.prompt[seq.cached: seq.cached + count])
        finishing = [row for row, (seq, count) in enumerate(zip(group, fed)) if count == seq.prefill_left]
        echo = [row for row, seq in enumerate(group) if seq.params.echo and seq.params.logprobs is not None]
        if echo or not self._keep_logits:
            keep, where = 0, {row: fed[row] - 1 for row in finishing}  # every position
        else:  # only the positions some finishing row ends at
            last = sorted({fed[row] - 1 for row in finishing}) or [chunk - 1]
            keep = torch.tensor(last, device=self.device)
            where = {row: last.index(fed[row] - 1) for row in finishing}
        cache, mask, positions = self._kv.step(start, start + len(group), chunk, self.dtype, self.device)
        out = self._forward(group, ids.to(self.device), mask, positions, cache, union, keep)
        self._kv.advance(start, fed)
        for seq, count in zip(group, fed):
            seq.cached += count
        for row in echo:
            self._prompt_logprobs(group[row], fed[row], lambda n, row=row: out.logits[row, :n])
        self.stats.prefill_batches += 1
        if not finishing:
            return
        done = [group[row] for row in finishing]
        logits = torch.stack([out.logits[row, where[row]] for row in finishing])
        for seq in done:  # to the end of the decoding rows (no copy when it is there already)
            self._place_swap(self._running.index(seq), self._decoding)
            self._decoding += 1
        self._advance(done, logits)

    def _prompt_logprobs(self, seq: Sequence, fed: int, logits_of) -> None:
        """An echo row's prompt log-probabilities for the ``fed`` tokens it just took in (position j
        predicts token j + 1); ``logits_of(n)``: the logits of this chunk's first n positions. A
        failure fails this row's request only."""
        try:
            begin = seq.cached - fed
            if begin == 0:
                seq.logprobs.append((self.tokenizer.decode([seq.prompt[0]]), None, None))
            targets = seq.prompt[begin + 1: seq.cached + 1]
            if targets:
                logprobs = torch.log_softmax(logits_of(len(targets)).float(), dim=-1)
                seq.logprobs += logprob_entries(logprobs, targets, seq.params.logprobs, self.tokenizer)
        except Exception as exc:
            self._fail_request(self._requests[seq.request_id], exc)

    def _decode_step(self) -> None:
        rows = self._running[: self._decoding]
        ids = torch.tensor([[s.tokens[-1]] for s in rows], device=self.device)
        cache, mask, positions = self._kv.step(0, len(rows), 1, self.dtype, self.device)
        out = self._forward(rows, ids, mask, positions, cache, self._union, 1)
        self._kv.advance(0, [1] * len(rows))
        self.stats.decode_steps += 1
        self._advance(rows, out.logits[:, -1])

    @torch.inference_mode()
    def _forward(self, rows: list[Sequence], ids, mask, positions, cache, union: set[str], keep):
        """``keep``: logits_to_keep (0: every position; an int n: the last n; a tensor: those positions)."""
        kwargs = {"logits_to_keep": keep} if self._keep_logits else {}
        horizon = max(s.remaining for s in rows)
        with self._adapters_for([s.adapter for s in rows], horizon, union):
            return self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                              past_key_values=cache, use_cache=True, **kwargs)

    def _adapters_for(self, names: list[str], horizon: int, union: set[str]):
        """Fused when every row of this iteration wants one adapter and fusing pays off; otherwise
        route per row."""
        return self._apply_adapters(self._plan_adapters(names, horizon, union), names)

    def _plan_adapters(self, names: list[str], horizon: int, union: set[str]):
        """The adapter to fuse (None: the base), or ``ROUTED``."""
        wanted = set(names)
        if len(wanted) == 1 and union == wanted:
            target = None if names[0] == BASE else names[0]
            if target in (self._fused, None) or horizon >= self._fuse_threshold(target):
                return target
        return ROUTED

    def _apply_adapters(self, target, names: list[str], per_token: bool = False):
        """Fuse ``target`` (a no-op context), or route ``names`` (one per batch row; ``per_token``:
        one per token of a packed row)."""
        if target is not ROUTED:
            self._switch(target)
            self.stats.fused_steps += 1
            return contextlib.nullcontext()
        self._switch(None)
        self.stats.routed_steps += 1
        self.stats.mixed_steps += len(set(names)) > 1
        return shirakit.route(self.model, names, per_token=per_token)

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

        The math is batched: greedy rows take one argmax over the batch, sampled rows one batched
        softmax with their temperatures and nucleus cuts (``sampling_probs``), rows asking for
        log-probabilities one log-softmax; only each sampled row's draw (its own generator) and
        its text are per row.

        A row whose sampling, stop check, text or sink raises fails its own request only (its
        other choices too); the rest of the batch goes on as if it had never been there.
        """
        logits = logits.float()
        live = [not self._requests[s.request_id].failed for s in rows]
        adjusted = logits
        if any(s.params.adjusts for s in rows):  # logit_bias, penalties: sparse edits of those rows
            adjusted = logits.clone()
            for row, seq in enumerate(rows):
                if live[row] and seq.params.adjusts:
                    try:
                        adjusted[row] = seq.adjusted(logits[row])
                    except Exception as exc:
                        self._fail_request(self._requests[seq.request_id], exc)
                        live[row] = False
        greedy = adjusted.argmax(dim=-1).tolist()
        drawn = [row for row, seq in enumerate(rows) if live[row] and not seq.greedy]
        probs = sampling_probs(adjusted[drawn], [rows[r] for r in drawn]) if drawn else None
        where = {row: i for i, row in enumerate(drawn)}
        scored = [row for row, seq in enumerate(rows) if live[row] and seq.params.logprobs is not None]
        # of the model's distribution, before any adjustment
        logprobs = torch.log_softmax(logits[scored], dim=-1) if scored else None
        scored = {row: i for i, row in enumerate(scored)}
        for row, seq in enumerate(rows):
            request = self._requests[seq.request_id]
            if request.failed:
                continue
            try:
                token = greedy[row] if seq.greedy else sample(probs[where[row]], seq)
                if seq.params.logprobs is not None:
                    i = scored[row]
                    seq.logprobs += logprob_entries(logprobs[i: i + 1], [token], seq.params.logprobs, self.tokenizer)
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
            for slot in reversed([i for i, gone in enumerate(done) if gone]):
                self._drop(slot)
            self._plan()
        self.stats.running = len(self._running)
        if cancelled:  # forget ids of requests that are gone (finished, or cancelled twice)
            with self._lock:
                waiting = {w.request_id for w in self._waiting}
                self._cancelled = {c for c in self._cancelled if c in self._requests or c in waiting}

    def _place(self, src: int, dst: int) -> None:
        if src != dst:
            self._kv.move(src, dst)
            self._running[dst] = self._running[src]

    def _place_swap(self, a: int, b: int) -> None:
        if a != b:
            self._kv.swap(a, b)
            self._running[a], self._running[b] = self._running[b], self._running[a]

    def _drop(self, slot: int) -> None:
        """Take row ``slot`` out, keeping decoding rows first: the last decoding row fills the hole,
        the last row fills its place (one row moved each, at most two)."""
        last = len(self._running) - 1
        if slot < self._decoding:
            self._place(self._decoding - 1, slot)
            self._place(last, self._decoding - 1)
            self._decoding -= 1
        else:
            self._place(last, slot)
        self._running.pop()
        self._kv.pop()

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
        self._kv = SlotKV(self.max_batch, self.max_context)
        self._decoding = 0
        self.stats.running = 0
        with contextlib.suppress(Exception):
            self._switch(None)


def reserved(seq: Sequence) -> int:
    """KV positions a row may come to hold: its prompt and every token it may generate."""
    return len(seq.prompt) + seq.params.max_tokens


def reserved_by(request: Request) -> int:
    return len(request.prompt) + request.params.max_tokens


def kv_bytes_per_token(model) -> int | None:
    """Bytes one token's keys and values take over all layers (None when the config does not say)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if hidden and heads else None)
    if not (layers and kv_heads and head_dim):
        return None
    return 2 * layers * kv_heads * head_dim * next(model.parameters()).element_size()


def derived_kv_tokens(per_token: int | None, device: torch.device, most: int) -> int:
    """The default KV budget: ``KV_MEMORY_SHARE`` of the memory free now (the GPU's, or the
    machine's available RAM), in tokens; never more than ``most`` (every row at full context)."""
    if per_token is None:
        return most
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return most
    return max(1, min(most, int(free * KV_MEMORY_SHARE) // per_token))


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
