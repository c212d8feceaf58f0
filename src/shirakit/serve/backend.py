"""What the HTTP layer talks to: an engine in this process (here) or Ray Serve replicas (``ray_app``).

A backend turns one validated request into an async stream of :class:`~.engine.Output` events,
and manages adapters. The HTTP app never sees the model, only a backend.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import AsyncIterator

from .engine import Engine, Output
from .policy import Policy
from .sequence import SamplingParams


class LocalBackend:
    """The engine thread of this process."""

    supports_top_k = True  # SamplingParams.top_k (a backend without this flag refuses it with 400)

    def __init__(self, engine: Engine, policy: Policy | None = None) -> None:
        self.engine, self.policy = engine, policy or Policy()
        self.tokenizer = engine.tokenizer
        self.base_name = engine.base_name
        self.max_context = engine.max_context

    def models(self) -> list[str]:
        return self.engine.models()

    def knows(self, name: str) -> bool:
        return self.engine.knows(name)

    async def generate(self, model: str, prompt: list[int], params: SamplingParams, n: int) -> AsyncIterator[Output]:
        """Events until all ``n`` choices finished; leaving early (disconnect) cancels the request."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        sink = lambda event: loop.call_soon_threadsafe(events.put_nowait, event)
        request_id = self.engine.submit(model, prompt, params, n, sink)
        open_choices = n
        try:
            while open_choices:
                event = await events.get()
                if isinstance(event, Exception):
                    raise event
                if event.finish_reason is not None:
                    open_choices -= 1
                yield event
        finally:
            if open_choices:
                self.engine.cancel(request_id)

    async def load_adapter(self, name: str, path: str) -> None:
        """The folder is read on a reader thread; the engine thread only puts it into the model."""
        if self.engine.knows(name):
            raise ValueError(f"an adapter or model named {name!r} is already being served")
        files = self.engine.prefetch.read(Path(path))
        await asyncio.wait([asyncio.wrap_future(files)])  # its error, if any, is the load's (engine thread)
        await asyncio.wrap_future(self.engine.call(lambda: self.engine.load_adapter(name, Path(path), files)))

    async def unload_adapter(self, name: str) -> None:
        await asyncio.wrap_future(self.engine.call(lambda: self.engine.unload_adapter(name)))

    async def snapshots(self) -> list[tuple[dict[str, str], dict[str, float]]]:
        """[(labels, engine numbers)]: one engine here, one per replica under Ray."""
        return [({}, self.engine.snapshot())]
