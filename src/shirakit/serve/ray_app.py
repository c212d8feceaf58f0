"""Scale-out on Ray Serve: N engine replicas behind one OpenAI-compatible ingress.

    shirakit serve --ray --replicas 4 --model DIR --adapters DIR

or, from Python::

    from ray import serve
    from shirakit.serve.ray_app import build_app
    serve.run(build_app(model="DIR", adapters="DIR", replicas=4), route_prefix="/")

(``serve run shirakit.serve.ray_app:app_builder model=DIR adapters=DIR replicas=4`` also works.)

Two deployments. ``OpenAIIngress`` (one replica) serves the same FastAPI routes as the
single-process server (``app.create_app``), tokenizes, and keeps the adapter registry (name ->
folder). ``EngineReplica`` (N replicas) each own one model and one engine thread (``engine.py``).
The ingress calls the engines through a handle with ``multiplexed_model_id`` = the adapter's
name: Ray Serve's model multiplexing (``serve.multiplexed``) routes a request to a replica that
already holds that adapter when there is one, and each replica keeps at most ``max_loaded``
adapters (least recently used evicted, which unloads it from that replica's engine).
Requests for the base model carry no model id and go to any replica.
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import asdict
from pathlib import Path

from ray import serve

from .app import create_app
from .cache import hide_folder
from .engine import Output
from .policy import Policy
from .protocol import ApiError
from .sequence import SamplingParams


# ---- the engine replicas -------------------------------------------------------------------
class _Resident:
    """One adapter held by one replica; Ray Serve calls ``__del__`` when it evicts it."""

    def __init__(self, engine, name: str) -> None:
        self.engine, self.name, self.gone = engine, name, False

    def __del__(self) -> None:
        if not self.gone:
            self.gone = True
            # Evict from the model tier only: unregistering would make a request already submitted
            # to this replica for the same adapter fail with 404 (seen under load in the Ray test).
            engine, name = self.engine, self.name
            engine.call(lambda: engine.cache.evict(name))


def engine_deployment(max_loaded: int):
    """The engine deployment class, holding at most ``max_loaded`` adapters per replica."""

    @serve.deployment(name="EngineReplica")
    class EngineReplica:
        def __init__(self, options: dict) -> None:
            from .backend import LocalBackend
            from .build import build_engine
            from .heap import freeze_startup_heap

            # the engine's own LRU has one slot of slack over Ray's, which evicts first
            self.engine = build_engine(**options, adapters=None, max_loaded=max_loaded + 1).start()
            freeze_startup_heap()  # a replica is its own process (Ray's worker): as `shirakit serve` does
            self.backend = LocalBackend(self.engine)
            self.paths: dict[str, str] = {}

        @serve.multiplexed(max_num_models_per_replica=max_loaded)
        async def get_adapter(self, name: str) -> _Resident:
            engine, path = self.engine, self.paths[name]

            def load():
                if not engine.knows(name):
                    engine.load_adapter(name, Path(path))

            await asyncio.wrap_future(engine.call(load))
            return _Resident(engine, name)

        async def generate(self, model: str, path: str | None, prompt: list[int], params: dict, n: int):
            """Output events as dicts; an error is one ``{"error": status, "message": ...}`` event."""
            from .app import api_error_for

            try:
                if path is not None:
                    self.paths[model] = path
                    await self.get_adapter(model)
                async for event in self.backend.generate(model, prompt, SamplingParams(**params), n):
                    yield asdict(event)
            except Exception as exc:
                error = api_error_for(exc)
                yield {"error": error.status, "message": error.message, "param": error.param}

        def snapshot(self) -> tuple[str, dict]:
            return serve.get_replica_context().replica_tag, self.engine.snapshot()

        def check_adapter(self, path: str) -> None:
            """Read the folder's config and weights (raises what is wrong with them)."""
            from shirakit.io.checkpoint import read_weights
            from shirakit.io.config_file import read_config

            read_config(path)
            read_weights(path)

    return EngineReplica


# ---- the ingress ---------------------------------------------------------------------------
class RayBackend:
    """The HTTP app's backend under Ray: the engine replicas, through a deployment handle."""

    supports_top_k = True  # the replicas run the built-in engine

    def bind(self, engines, settings: dict) -> None:
        from transformers import AutoConfig, AutoTokenizer

        from .build import adapter_folders, default_model_dir
        from .engine import _context_length

        folder = Path(settings.get("model_dir") or default_model_dir())
        self.engines = engines
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.base_name = settings.get("served_model_name") or folder.name
        config = AutoConfig.from_pretrained(folder)
        self.max_context = _context_length(type("M", (), {"config": config})(), self.tokenizer)
        self.paths = {name: str(path) for name, path in adapter_folders(settings.get("adapters")).items()}
        self.replicas = settings.get("replicas", 1)
        self.policy = Policy.from_args(settings.get("api_key"), settings.get("allow_runtime_adapters", False),
                                       settings.get("adapter_roots", ()), settings.get("max_request_mb"))

    def models(self) -> list[str]:
        return [self.base_name, *sorted(self.paths)]

    def knows(self, name: str) -> bool:
        return name == self.base_name or name in self.paths

    async def generate(self, model: str, prompt: list[int], params: SamplingParams, n: int):
        from .engine import UnknownModel

        if not self.knows(model):
            raise UnknownModel(model)
        adapter = model != self.base_name
        handle = self.engines.options(stream=True, multiplexed_model_id=model if adapter else "")
        stream = handle.generate.remote(model, self.paths[model] if adapter else None, prompt, asdict(params), n)
        try:
            async for event in stream:
                if "error" in event:
                    raise ApiError(event["error"], event["message"], event["param"])
                yield Output(**event)
        finally:
            stream.cancel()  # a client that went away frees its replica's rows too

    async def load_adapter(self, name: str, path: str) -> None:
        if self.knows(name):
            raise ValueError(f"an adapter or model named {name!r} is already being served")
        try:
            await self.engines.check_adapter.remote(path)
        except Exception as exc:  # Ray wraps the replica's exception; report its message
            cause = getattr(exc, "cause", None) or exc
            raise ValueError(f"adapter {name!r} could not be loaded: {hide_folder(str(cause), Path(path))}") from exc
        self.paths[name] = path

    async def unload_adapter(self, name: str) -> None:
        from .engine import UnknownModel

        if name not in self.paths:
            raise UnknownModel(name)
        del self.paths[name]  # replicas drop it when their LRU evicts it

    async def snapshots(self) -> list[tuple[dict[str, str], dict[str, float]]]:
        """Each replica's numbers, as far as a few calls reach them (a handle picks replicas itself)."""
        seen: dict[str, dict] = {}
        for _ in range(4 * self.replicas):
            tag, numbers = await self.engines.snapshot.remote()
            seen[tag] = numbers
            if len(seen) == self.replicas:
                break
        return [({"replica": tag}, numbers) for tag, numbers in sorted(seen.items())]


# Ray Serve ships the ingress class, with the app and every global its methods name, to the replica
# by value. Module-level functions and classes of an importable module travel by reference, so
# these two reach the replica process's own ``_BACKEND``: the one the app serves from.
class _ThisProcessBackend:
    def __getattr__(self, name):
        return getattr(_BACKEND, name)


def _bind_backend(engines, settings: dict) -> None:
    _BACKEND.bind(engines, settings)


_BACKEND = RayBackend()
_APP = create_app(_ThisProcessBackend())


@serve.deployment(name="OpenAIIngress")
@serve.ingress(_APP)
class OpenAIIngress:
    def __init__(self, engines, settings: dict) -> None:
        _bind_backend(engines, settings)


def build_app(model: str | None = None, adapters: str | None = None, served_model_name: str | None = None,
              replicas: int = 2, max_loaded: int = 8, max_loaded_mb: float | None = None, max_batch: int = 32,
              max_queue: int = 256, device: str = "auto", dtype: str = "auto", num_cpus: float = 1.0,
              api_key: str | None = None, allow_runtime_adapters: bool = False, adapter_roots=(),
              max_request_mb: float | None = None):
    """The Ray Serve application: ``serve.run(build_app(...), route_prefix="/")``."""
    options = {"model_dir": model, "served_model_name": served_model_name, "device": device, "dtype": dtype,
               "max_loaded_mb": max_loaded_mb, "max_batch": max_batch, "max_queue": max_queue}
    engines = engine_deployment(max_loaded).options(num_replicas=replicas,
                                                    ray_actor_options={"num_cpus": num_cpus}).bind(options)
    settings = {"model_dir": model, "served_model_name": served_model_name, "adapters": adapters,
                "replicas": replicas, "api_key": api_key, "allow_runtime_adapters": allow_runtime_adapters,
                "adapter_roots": [str(r) for r in adapter_roots], "max_request_mb": max_request_mb}
    return OpenAIIngress.options(ray_actor_options={"num_cpus": 0}).bind(engines, settings)


def app_builder(args: dict):
    """For ``serve run shirakit.serve.ray_app:app_builder key=value ...``."""
    numbers = {"replicas": int, "max_loaded": int, "max_batch": int, "max_queue": int, "max_loaded_mb": float,
               "num_cpus": float}
    return build_app(**{k: numbers.get(k, str)(v) for k, v in args.items()})


LOOPBACK = ("127.0.0.1", "localhost", "::1")
WILDCARD = ("0.0.0.0", "::", "")


def ray_init_args(host: str) -> dict:
    """``ray.init`` arguments that bind the Ray this command starts to ``host``, as the HTTP proxy is.

    - the dashboard (it accepts job submissions: code execution) listens on ``host`` when that is a
      loopback address, else on 127.0.0.1: a public ``--host`` exposes the API, never the dashboard;
    - the node address (what Ray's processes listen on and advertise) is ``host`` when that names
      one interface. Ray itself replaces a loopback node address by the machine's own (its workers
      must reach each other), so with ``--host 127.0.0.1`` its internal ports still listen on the
      machine's address: docs/serving.md says which to firewall.

    Joining a running cluster (``RAY_ADDRESS``) starts no Ray process: nothing to bind."""
    import os

    if os.environ.get("RAY_ADDRESS"):
        return {"ignore_reinit_error": True}
    found = {"ignore_reinit_error": True, "dashboard_host": host if host in LOOPBACK else "127.0.0.1"}
    if host not in LOOPBACK + WILDCARD:
        found["_node_ip_address"] = host
    return found


def run_ray(args: argparse.Namespace) -> int:
    """``shirakit serve --ray``: start (or join, with RAY_ADDRESS) Ray, run the app, block until Ctrl-C."""
    import time

    import ray

    ray.init(**ray_init_args(args.host))
    serve.start(http_options={"host": args.host, "port": args.port})  # no gRPC proxy: it starts none
    serve.run(build_app(args.model, args.adapters, args.served_model_name, args.replicas, args.max_loaded,
                        args.max_loaded_mb, args.max_batch, args.max_queue, args.device, args.dtype,
                        api_key=args.api_key, allow_runtime_adapters=args.allow_runtime_adapters,
                        adapter_roots=args.adapter_root, max_request_mb=args.max_request_mb),
              name="shirakit", route_prefix="/")
    print(f"serving on http://{args.host}:{args.port} with {args.replicas} Ray Serve replica(s); Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0
