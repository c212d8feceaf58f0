"""vLLM's async engine with SHiRA adapters fused in its weights, behind a front scheduler.

A fused adapter is in the weights for every row of vLLM's batch, so the rows running together must
all want the same weights. :class:`GroupScheduler` sees to it: every request names a *group* (a
SHiRA adapter, or ``None``: the base weights, which the base model's requests and vLLM-native LoRA
requests share, LoRA adding its own deltas per row), and only one group's requests run at a time.
To change groups it stops admitting the active group, waits until that group's last request has
finished, switches the weights (``collective_rpc`` -> :class:`~.worker.ShiraWorkerExtension`, two
scatters per weight) and admits the next group: the one whose oldest request has waited longest.

When the active group stops being admitted, the next group is the one with the most waiting requests
(the largest batch for vLLM; ties: the oldest request first), unless a request has waited more than
``max_wait_s``: then its group goes next, so a rare adapter is not starved by a popular one. The group
then admits every request of it that has arrived by the switch (it runs as one batch). Measured here:
taking only the queue's head (the order before) switched 24 times for 32 requests over 4 uniform adapters
(a batch of 1.3 requests per switch, 12.6 tokens/s against 30-58 for the base).

Two policies decide when the active group stops being admitted once another group waits:

- ``drain``: the active group keeps being admitted for the requests that arrived before it became
  active or before the first waiting request of another group (a group is drained as it stood; later
  arrivals wait their turn);
- ``slice``: the active group is admitted for ``slice_s`` seconds after it became active, then
  stops (time slices).

Two more serve SHiRA per row inside vLLM's batches where the workers can (``rows.py``: CPU, fp32):

- ``rows``: every SHiRA request runs on the base weights with its own delta added per row, in one batch
  with every other base-weight request (the base model's, vLLM-LoRA's, other SHiRA adapters');
- ``auto``: a SHiRA request is *flexible*: it runs fused when its adapter is in the weights, or per row
  on the base weights. The engine starts on the base weights (per row). When the last ``fuse_after``
  (8) requests admitted all wanted one SHiRA adapter and every request running and waiting wants it too,
  it stops admitting, lets the batch finish and switches that adapter in (fused: vLLM's own forward, no
  per-row cost, what one adapter's traffic wants); once a request of another adapter (or the base)
  waits, the fused group drains as it stood and the engine goes back to the base weights, where every
  SHiRA adapter runs per row in one batch. Ties between the base and a fused group go to the base, so
  mixed traffic does not hop from one fused adapter to the next.

Requests of one group still share vLLM's continuous batches; what the scheduler costs is the time a
group waits for the others, measured by ``benchmarks/serve_engines.py`` (docs/vllm.md).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from contextlib import asynccontextmanager
from typing import Awaitable, Callable

POLICIES = ("drain", "slice", "auto", "rows")


class GroupScheduler:
    """Admit requests of one group at a time; ``switch(group)`` changes the weights between groups."""

    def __init__(self, switch: Callable[[str | None], Awaitable[None]], policy: str = "drain",
                 slice_s: float = 0.5, max_wait_s: float = 10.0, fuse_after: int = 8) -> None:
        if policy not in POLICIES:
            raise ValueError(f"scheduler policy must be one of {POLICIES}, found {policy!r}")
        if not slice_s > 0:
            raise ValueError(f"slice_s must be positive, found {slice_s}")
        if not max_wait_s > 0:
            raise ValueError(f"max_wait_s must be positive, found {max_wait_s}")
        if fuse_after < 1:
            raise ValueError(f"fuse_after must be at least 1, found {fuse_after}")
        self._switch, self.policy, self.slice_s, self.max_wait_s = switch, policy, slice_s, max_wait_s
        self.active: str | None = None
        self.inflight = 0
        self.switches = 0
        self._waiting: deque[tuple[int, str | None, float, bool]] = deque()  # (ticket, group, arrived, flexible)
        self._next_ticket = 0
        self._cutoff = 0  # the active group's requests with a smaller ticket had arrived when it became active
        self._since = time.monotonic()
        self._cond = asyncio.Condition()
        self._switching = False
        self.fuse_after = fuse_after
        self._recent: deque[str | None] = deque(maxlen=fuse_after)  # the groups of the last admitted requests
        self._running: dict[tuple[str | None, bool], int] = {}  # (group, flexible) -> requests in flight

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _runs_now(self, group: str | None, flexible: bool) -> bool:
        """Would a request of ``group`` run under the weights in now? (a flexible one also on the base's)"""
        return group == self.active or (flexible and self.active is None)

    def _admits(self, ticket: int, group: str | None, flexible: bool = False) -> bool:
        if self._switching or not self._runs_now(group, flexible):
            return False
        other = next((t for t, g, _, f in self._waiting if not self._runs_now(g, f)), None)
        if other is None:
            return group == self.active or not self._wants_fused(group)  # nobody else waits: run on
        if self.policy == "slice":
            return time.monotonic() - self._since < self.slice_s
        return ticket < max(other, self._cutoff)

    def _wants_fused(self, group: str | None) -> bool:
        """``auto``, on the base weights: have the last ``fuse_after`` requests, and all running and
        waiting ones, wanted SHiRA adapter ``group``? (then it is switched in once the batch ends)"""
        return (len(self._recent) == self.fuse_after and all(g == group for g in self._recent)
                and all(key == (group, True) for key, n in self._running.items() if n)
                and all(g == group and f for _, g, _, f in self._waiting))

    def _next_group(self) -> str | None:
        """The group to switch to (another group waits): the one with the most waiting requests that
        could run under it (a flexible request counts for its adapter and for the base), ties by a fused
        group over the base and then the oldest request, except that a request waiting over
        ``max_wait_s`` takes its group first (the base, if it is flexible)."""
        counts: dict[str | None, int] = {}
        first: dict[str | None, tuple[int, float]] = {}  # group -> its oldest (ticket, arrived)
        for ticket, group, arrived, flexible in self._waiting:
            for candidate in {group, None} if flexible else {group}:
                if candidate != self.active:
                    counts[candidate] = counts.get(candidate, 0) + 1
                    first.setdefault(candidate, (ticket, arrived))
        oldest = min(first, key=lambda g: first[g][0])
        if time.monotonic() - first[oldest][1] > self.max_wait_s:
            return None if None in first and first[None][0] == first[oldest][0] else oldest
        base_first = self.policy == "auto"  # a tie between the base (per row) and one fused adapter: the base
        return max(counts, key=lambda g: (counts[g], base_first and g is None, -first[g][0]))

    async def _maybe_switch(self) -> None:
        """With nothing in flight and the head of the queue wanting other weights, switch to them."""
        if self.inflight or self._switching or not self._waiting:
            return
        if any(self._admits(t, g, f) for t, g, _, f in self._waiting):
            return  # the active group has admitted requests not yet woken: they run first
        group = self._next_group()  # only other groups' requests (or the active one's late ones) wait
        self._switching = True
        try:
            await self._switch(group)  # the lock is held: nobody is admitted meanwhile
            self.active, self._since, self._cutoff = group, time.monotonic(), self._next_ticket
            self.switches += 1
        finally:
            self._switching = False
            self._cond.notify_all()

    @asynccontextmanager
    async def turn(self, group: str | None, flexible: bool = False):
        """Wait until ``group``'s weights are in (or, ``flexible``, the base's) and it is admitted; hold a
        place until the block ends. Yields the group whose weights it runs under."""
        async with self._cond:
            ticket, self._next_ticket = self._next_ticket, self._next_ticket + 1
            entry = (ticket, group, time.monotonic(), flexible)
            self._waiting.append(entry)
            try:
                while not self._admits(ticket, group, flexible):
                    await self._maybe_switch()
                    if self._admits(ticket, group, flexible):
                        break
                    try:  # slices expire by time, not only by events
                        await asyncio.wait_for(self._cond.wait(), timeout=self.slice_s)
                    except asyncio.TimeoutError:
                        pass
            except BaseException:
                self._waiting.remove(entry)
                self._cond.notify_all()
                raise
            self._waiting.remove(entry)
            self.inflight += 1
            self._recent.append(group)
            self._running[group, flexible] = self._running.get((group, flexible), 0) + 1
            under = self.active
        try:
            yield under
        finally:
            async with self._cond:
                self.inflight -= 1
                self._running[group, flexible] -= 1
                await self._maybe_switch()
                self._cond.notify_all()

    @asynccontextmanager
    async def exclusive(self):
        """Nothing in flight for the block (unloading the active adapter, say)."""
        async with self._cond:
            while self.inflight or self._switching:
                await self._cond.wait()
            self._switching = True
        try:
            yield
        finally:
            async with self._cond:
                self._switching = False
                self._cond.notify_all()

    async def forget(self) -> None:
        """The weights were reset to the base outside :meth:`turn` (an unload)."""
        self.active = None
        self._since = time.monotonic()


def engine_args(model: str, *, dtype: str = "auto", max_model_len: int | None = None, lora_rank: int = 0,
                max_loras: int = 4, memory_fraction: float = 0.25, tensor_parallel_size: int = 1, seed: int = 0):
    """vLLM's AsyncEngineArgs for fused SHiRA: the worker extension, eager mode (on CPU the touched
    layers are packed again after every switch, and a traced graph would keep the old packed handles;
    see :mod:`.worker`) and no
    prefix caching (a cached key/value block computed under one adapter is wrong under another)."""
    from ...core.extras import require
    from . import WORKER_EXTENSION

    AsyncEngineArgs = require("vllm", "shirakit.vllm").AsyncEngineArgs

    kwargs = dict(model=model, dtype=dtype, max_model_len=max_model_len, worker_extension_cls=WORKER_EXTENSION,
                  enforce_eager=True, enable_prefix_caching=False, gpu_memory_utilization=memory_fraction,
                  tensor_parallel_size=tensor_parallel_size, seed=seed)
    if lora_rank:
        kwargs.update(enable_lora=True, max_lora_rank=lora_rank, max_loras=max_loras)
    return AsyncEngineArgs(**kwargs)
