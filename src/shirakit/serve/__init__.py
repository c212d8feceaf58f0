"""``shirakit serve``: many adapters on one base model behind an OpenAI-compatible HTTP API.

    engine.py    the engine thread: continuous batching, fused vs routed steps
    kv.py        the running batch's key/value cache: preallocated slots, per-row positions
    sequence.py  one generated sequence: sampling, text, stop strings
    cache.py     the adapter cache: LRU over the model, disk below, pins
    protocol.py  request bodies and OpenAI-style errors
    app.py       the FastAPI routes (vLLM's), over a backend
    backend.py   the in-process backend (the engine thread)
    vllm_backend.py  ``--engine vllm``: the same app over vLLM's engine (SHiRA fused, docs/vllm.md)
    metrics.py   Prometheus text
    build.py     model, tokenizer and adapter folders -> an engine
    server.py    uvicorn, ``shirakit serve``
    ray_app.py   the Ray Serve deployment (model multiplexing)

Needs the ``serve`` extra (``pip install shirakit[serve]``); Ray Serve the ``ray`` extra.
Design and measurements: docs/serving.md.
"""

from .build import build_engine
from .cache import AdapterCache, AdapterLoadError
from .engine import Engine, QueueFull, UnknownModel
from .sequence import SamplingParams
from .server import RunningServer, start_server

__all__ = ["AdapterCache", "AdapterLoadError", "Engine", "QueueFull", "RunningServer", "SamplingParams",
           "UnknownModel", "build_engine", "start_server"]
