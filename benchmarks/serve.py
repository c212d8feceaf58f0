"""`shirakit serve` under real HTTP load: throughput, latency and failures per adapter mix.

    python benchmarks/serve.py                  # SmolLM2-135M, 100 SHiRA adapters (~10 min on 2 busy cores)
    python benchmarks/serve.py --quick          # tiny random Llama: a < 1 min smoke test
    python benchmarks/serve.py --write-docs docs/benchmarks.md
    python benchmarks/serve.py --engine-rows [--before-src DIR]   # issue 24: chunked prefill, KV slots

``--engine-rows`` measures the engine's memory half instead: ``--clients`` greedy streams decode
(32-token prompts, end of text biased away so they run on), then one ``--long-tokens`` prompt
arrives; the running rows' inter-token gaps (p50/p95/max, between stream events) from its arrival
to its first token, against the same window without it; the long prompt's time to first token;
the KV bytes the cache moved per decode step (/metrics). Servers: chunked prefill at
``--batched-tokens``, ``--no-chunked-prefill`` (the "before" of chunking), and with
``--before-src`` an earlier shirakit's ``src/`` (``git archive``), the dense left-padded cache.
Then throughput at ``--clients`` clients with prompts of ``--prompt-lengths`` tokens.

The server is the real command, ``python -m shirakit.cli serve``, in its own process on 127.0.0.1
and a free port; this process is the load: ``--clients`` concurrent clients (asyncio + httpx, each
one request at a time, closed loop) send ``--requests`` completions per row (``max_tokens``
``--tokens``, greedy, prompts of ~20 tokens), each naming an adapter drawn from the row's mix:

- 1 adapter: every request to adapter 0;
- 16 uniform: uniform over 16 adapters (all fit: ``--max-loaded 16``);
- 100 churn: uniform over 100 adapters with ``--max-loaded 16`` (most requests miss the cache and
  load their adapter from disk; the compact SHiRA layout);
- zipf: 100 adapters, adapter k drawn with probability ~ 1/(k+1)^1.1, ``--max-loaded 16``;
- PEFT-style baseline, 16 uniform: the same HTTP API (this file's ``--baseline-server``: FastAPI +
  uvicorn) over ``peft.PeftModel`` holding the same 16 adapters (PEFT's layout), one
  request at a time: ``set_adapter(name)`` then ``generate`` for that request alone. That is what one
  writes with PEFT today; PEFT has no scheduler that mixes adapters across requests.

Adapters: SHiRA r=8 on q_proj and v_proj, random values (``init_weights=False``), saved in the
compact layout for shirakit (a cache miss loads it) and, for the first 16, in PEFT's layout for the
baseline (which loads its 16 once, at start-up). Both servers run ``--threads`` torch threads (1:
on 2 shared cores a second OpenMP thread mostly waits for a descheduled sibling).
Per row: ``--repeats`` runs (after one warm-up run per server), the table gives the median run's
throughput (generated tokens / wall second), its p50/p99 request latency, and the failed requests
(any non-200 or a wrong body) summed over all runs. Ratios are taken between rows of this run.
The machine (2 shared cores) is busy with other work: compare ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


# ---- fixtures: a model folder and adapters ----------------------------------------------------
def model_folder(quick: bool, root: Path) -> tuple[Path, str]:
    if not quick:
        from shirakit.app.data import smollm2_dir

        return smollm2_dir(), "SmolLM2-135M-Instruct (packaged GGUF, dequantized to fp32)"
    sys.path.insert(0, str(REPO))
    from tests.serving import save_tiny_lm

    return save_tiny_lm(root / "tiny-llama"), "tiny random Llama (hidden 64, 2 layers)"


def make_adapters(model_dir: Path, out: Path, count: int, quick: bool, standard: Path,
                  standard_count: int) -> list[str]:
    """``count`` adapters in the compact layout under ``out`` (what shirakit serves), the first
    ``standard_count`` also in PEFT's layout under ``standard`` (what the PEFT baseline loads)."""
    import torch
    from transformers import AutoModelForCausalLM

    import shirakit

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    targets = "all-linear" if quick else ["q_proj", "v_proj"]
    names = []
    for i in range(count):
        name = f"shira-{i:03d}"
        config = shirakit.ShiraConfig(r=8, target_modules=targets, init_weights=False, random_seed=i)
        torch.manual_seed(i)
        shirakit.inject(model, config, name)
        shirakit.save_adapter(model, out / name, name, compact=True)
        if i < standard_count:
            shirakit.save_adapter(model, standard / name, name)
        shirakit.delete_adapter(model, name)
        names.append(name)
    return names


# ---- servers ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(command: list[str], port: int, log: Path, timeout: float = 300, src: Path = REPO / "src") -> subprocess.Popen:
    import httpx

    env = dict(os.environ, PYTHONPATH=str(src) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    stop(process)
    raise RuntimeError(f"server did not start in {timeout} s")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def baseline_server(model_dir: str, adapters_dir: str, port: int) -> None:
    """PEFT, one request at a time: set_adapter, then generate alone (see the module doc)."""
    import threading

    import torch
    import uvicorn
    from fastapi import FastAPI
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    names = sorted(p.name for p in Path(adapters_dir).iterdir() if p.is_dir())
    model = PeftModel.from_pretrained(base, Path(adapters_dir) / names[0], adapter_name=names[0]).eval()
    for name in names[1:]:
        model.load_adapter(Path(adapters_dir) / name, adapter_name=name)
    lock = threading.Lock()
    app = FastAPI()

    @app.get("/health")
    def health():
        return {}

    @app.post("/v1/completions")
    def completions(body: dict):
        ids = tokenizer(body["prompt"], return_tensors="pt")
        with lock, torch.inference_mode():
            model.set_adapter(body["model"])
            out = model.generate(**ids, max_new_tokens=body["max_tokens"], do_sample=False)
        new = out[0, ids.input_ids.shape[1]:]
        return {"choices": [{"index": 0, "text": tokenizer.decode(new, skip_special_tokens=True),
                             "finish_reason": "length"}], "usage": {"completion_tokens": int(new.numel())}}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# ---- load ---------------------------------------------------------------------------------
def mix(kind: str, names: list[str], count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    if kind == "one":
        return [names[0]] * count
    if kind == "uniform16":
        return [rng.choice(names[:16]) for _ in range(count)]
    if kind == "uniform":
        return [rng.choice(names) for _ in range(count)]
    weights = [1 / (k + 1) ** 1.1 for k in range(len(names))]
    return rng.choices(names, weights, k=count)


async def load(url: str, models: list[str], clients: int, tokens: int) -> dict:
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for i, model in enumerate(models):
        queue.put_nowait((i, model))
    latencies, generated, failed = [], 0, 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal generated, failed
        while not queue.empty():
            i, model = queue.get_nowait()
            body = {"model": model, "prompt": f"Request {i}: tell me about adapter {model}.", "max_tokens": tokens,
                    "temperature": 0}
            start = time.perf_counter()
            try:
                response = await http.post(url + "/v1/completions", json=body)
                ok = response.status_code == 200 and response.json()["choices"][0]["text"] is not None
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - start)
            if ok:
                generated += response.json()["usage"]["completion_tokens"]
            else:
                failed += 1

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    wall = time.perf_counter() - start
    latencies.sort()
    return {"throughput": generated / wall, "p50": latencies[len(latencies) // 2],
            "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], "failed": failed}


def run_row(url: str, models: list[str], args) -> dict:
    runs = [asyncio.run(load(url, models, args.clients, args.tokens)) for _ in range(args.repeats)]
    print("  runs, tokens/s:", ", ".join(f"{r['throughput']:.1f}" for r in runs), flush=True)
    median = sorted(runs, key=lambda r: r["throughput"])[len(runs) // 2]
    return dict(median, failed=sum(r["failed"] for r in runs))


def measure(args, root: Path) -> tuple[list[list[str]], dict, str]:
    model_dir, described = model_folder(args.quick, root)
    adapters_dir = root / "adapters"
    baseline_dir = root / "adapters16"
    names = make_adapters(model_dir, adapters_dir, args.adapters, args.quick, baseline_dir, 16)
    requests = {kind: mix(kind, names, args.requests, seed=1) for kind in ("one", "uniform16", "uniform", "zipf")}
    results = {}
    port = free_port()
    server = start([sys.executable, "-m", "shirakit.cli", "serve", "--model", str(model_dir), "--adapters",
                    str(adapters_dir), "--port", str(port), "--max-loaded", "16", "--max-batch", str(args.clients),
                    "--threads", str(args.threads)],
                   port, root / "serve.log")
    try:
        url = f"http://127.0.0.1:{port}"
        asyncio.run(load(url, requests["uniform16"][: args.clients], args.clients, args.tokens))  # warm-up
        many = len(names)
        for kind, label in (("one", "1 adapter"), ("uniform16", "16 adapters, uniform"),
                            ("uniform", f"{many} adapters, max-loaded 16"), ("zipf", f"{many} adapters, zipf 1.1")):
            results[label] = run_row(url, requests[kind], args)
            print(label, results[label], flush=True)
    finally:
        stop(server)
    port = free_port()
    server = start([sys.executable, __file__, "--baseline-server", str(model_dir), str(baseline_dir), str(port),
                    "--threads", str(args.threads)],
                   port, root / "baseline.log")
    try:
        url = f"http://127.0.0.1:{port}"
        asyncio.run(load(url, requests["uniform16"][: args.clients], args.clients, args.tokens))
        label = "PEFT-style baseline, 16 adapters, uniform"
        results[label] = run_row(url, requests["uniform16"], args)
        print(label, results[label], flush=True)
    finally:
        stop(server)
    return results, described


def report(results: dict, described: str, args, load: tuple[float, float]) -> str:
    one = results["1 adapter"]["throughput"]
    rows = [[label, f"{r['throughput']:.1f}", f"{r['throughput'] / one:.2f}", f"{r['p50']:.2f}", f"{r['p99']:.2f}",
             str(r["failed"])] for label, r in results.items()]
    header = ["row", "generated tokens/s", "vs 1 adapter", "p50 latency s", "p99 latency s", "failed"]
    baseline = results["PEFT-style baseline, 16 adapters, uniform"]["throughput"]
    ratio = results["16 adapters, uniform"]["throughput"] / baseline
    return (f"{described}; {args.adapters} SHiRA r=8 adapters (q_proj, v_proj, compact files); {args.clients} "
            f"concurrent clients, {args.requests} requests per run, {args.tokens} new tokens each, greedy; median "
            f"of {args.repeats} runs; server and clients on loopback; {_report.cpu_model()}, {_report.cores()}, "
            f"shared with other jobs (load average {load[0]:.1f} at the start, {load[1]:.1f} at the end); "
            f"{_report.software()}; {_report.today()}\n\n"
            + _report.table(header, rows)
            + f"\n\nshirakit serve, 16 adapters / PEFT-style baseline, 16 adapters: {ratio:.1f}x throughput")


# ---- the engine's memory half (issue 24): a long prompt among decoding rows, long prompts' throughput ----
def token_prompt(seed: int, length: int, vocab: int) -> list[int]:
    rng = random.Random(seed)
    low = 100 if vocab > 1000 else 3  # past the special tokens
    return [rng.randrange(low, vocab) for _ in range(length)]


async def _stream(http, url: str, body: dict, times: list, stop: asyncio.Event | None) -> None:
    async with http.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                times.append(time.perf_counter())
            if stop is not None and stop.is_set():
                break  # closing the stream cancels the row on the server


async def _wait_for(condition, timeout: float, what: str, tasks=()) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        for task in tasks:
            if task.done():
                task.result()  # its error, if any
                raise RuntimeError(f"a stream ended while waiting for {what}")
        await asyncio.sleep(0.01)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def long_prompt_scenario(url: str, model: str, vocab: int, eos: dict, rows: int, long_tokens: int,
                               window_steps: int, with_long: bool, seed: int, stream_tokens: int = 400) -> dict:
    """``rows`` greedy streams decode; once each has 8 tokens, either a ``long_tokens`` prompt
    arrives (``with_long``) or nothing does. Inter-token gaps of the running rows are taken over
    the window from then until the long prompt's first token (or ``window_steps`` more tokens per
    row without it); TTFT is the long prompt's first token after its arrival."""
    import httpx

    stop = asyncio.Event()
    times = [[] for _ in range(rows)]
    async with httpx.AsyncClient(timeout=900) as http:
        tasks = [asyncio.create_task(_stream(http, url, {"model": model, "prompt": [token_prompt(seed + i, 32, vocab)],
                                                         "max_tokens": stream_tokens, "temperature": 0,
                                                         "stream": True, "logit_bias": eos},
                                             times[i], stop)) for i in range(rows)]
        try:
            await _wait_for(lambda: all(len(t) >= 8 for t in times), 600, "the rows to decode", tasks)
            start = time.perf_counter()
            ttft = None
            if with_long:
                first: list[float] = []
                body = {"model": model, "prompt": [token_prompt(seed + 999, long_tokens, vocab)], "max_tokens": 2,
                        "temperature": 0, "stream": True}
                await _stream(http, url, body, first, None)
                end = first[0]
                ttft = end - start
            else:
                counts = [len(t) for t in times]
                await _wait_for(lambda: all(len(t) >= c + window_steps for t, c in zip(times, counts)), 600,
                                "the window", tasks)
                end = time.perf_counter()
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 120)
    # every gap that overlaps the window: a row stalled by the whole prefill gets its next token only
    # after the long prompt's first one, so its gap ends after the window
    gaps = [b - a for t in times for a, b in zip(t, t[1:]) if b > start and a < end]
    return {"p50": _percentile(gaps, 0.5), "p95": _percentile(gaps, 0.95), "max": max(gaps), "gaps": len(gaps),
            "ttft": ttft}


async def prompt_throughput(url: str, model: str, vocab: int, clients: int, requests: int, prompt_tokens: int,
                            tokens: int, seed: int) -> dict:
    import httpx

    queue = list(range(requests))
    generated, latencies = 0, []

    async def client(http) -> None:
        nonlocal generated
        while queue:
            i = queue.pop()
            body = {"model": model, "prompt": [token_prompt(seed + i, prompt_tokens, vocab)], "max_tokens": tokens,
                    "temperature": 0}
            begin = time.perf_counter()
            response = await http.post(url + "/v1/completions", json=body)
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
            latencies.append(time.perf_counter() - begin)
            generated += response.json()["usage"]["completion_tokens"]

    begin = time.perf_counter()
    async with httpx.AsyncClient(timeout=900) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    wall = time.perf_counter() - begin
    return {"throughput": generated / wall, "prompt_throughput": requests * prompt_tokens / wall,
            "p50": _percentile(latencies, 0.5)}


async def health_under_big_bodies(url: str, model: str, vocab: int, eos: dict, rows: int, bodies: int,
                                  megabytes: float, seed: int, stream_tokens: int = 400) -> dict:
    """``rows`` streams decode while four clients send requests of ``megabytes`` MB each, one after
    another each (at least ``bodies`` in all, for at least 3 s; each should be refused: 413 over
    the body bound); meanwhile /health is asked every 20 ms. Its latency (p50/p95/max) and the big
    requests' status codes and times. The probes run on their own thread with their own client, so
    the uploads (this process's event loop) do not delay them here."""
    import httpx

    stop = asyncio.Event()
    times = [[] for _ in range(rows)]
    huge = ('{"model": "%s", "prompt": "' % model + "y" * int(megabytes * 2**20) + '"}').encode()
    health, statuses, refused_in = [], [], []
    async with httpx.AsyncClient(timeout=600) as http:
        tasks = [asyncio.create_task(_stream(http, url, {"model": model, "prompt": [token_prompt(seed + i, 32, vocab)],
                                                         "max_tokens": stream_tokens, "temperature": 0, "stream": True,
                                                         "logit_bias": eos}, times[i], stop)) for i in range(rows)]
        try:
            await _wait_for(lambda: all(len(t) >= 4 for t in times), 600, "the rows to decode", tasks)
            done = threading.Event()

            def poll() -> None:  # its own thread and client: the uploads below do not delay its probes
                with httpx.Client(timeout=30) as probe:
                    while not done.is_set():
                        begin = time.perf_counter()
                        response = probe.get(url + "/health")
                        health.append((time.perf_counter() - begin, response.status_code))
                        time.sleep(0.02)

            poller = threading.Thread(target=poll)
            poller.start()
            until = time.perf_counter() + 3.0  # at least 3 s of probes

            async def send() -> None:
                async with httpx.AsyncClient(timeout=120) as big:
                    while len(statuses) < bodies or time.perf_counter() < until:
                        begin = time.perf_counter()
                        response = await big.post(url + "/v1/completions", content=huge,
                                                  headers={"content-type": "application/json"})
                        refused_in.append(time.perf_counter() - begin)
                        statuses.append(response.status_code)

            if bodies:
                await asyncio.gather(*(send() for _ in range(4)))  # four senders at once
            else:  # the control: the same probes, no big bodies
                await asyncio.sleep(3.0)
            done.set()
            await asyncio.to_thread(poller.join)
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 120)
    latencies = [t for t, _ in health]
    return {"p50": _percentile(latencies, 0.5), "p95": _percentile(latencies, 0.95), "max": max(latencies),
            "probes": len(latencies), "health_not_200": sum(code != 200 for _, code in health),
            "statuses": sorted(set(statuses)), "refused_max": max(refused_in, default=0.0), "sent": len(statuses)}


def _metrics(url: str) -> dict[str, float]:
    import httpx

    numbers = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("shirakit_") and " " in line and "{" not in line:
            name, value = line.rsplit(" ", 1)
            numbers[name] = float(value)
    return numbers


def measure_engine(args, root: Path) -> tuple[str, dict]:
    """The engine rows; each server config is started once, its scenarios run ``--repeats`` times."""
    from transformers import AutoTokenizer

    model_dir, described = model_folder(args.quick, root)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = min(len(tokenizer), 30000)
    eos = {str(tokenizer.eos_token_id): -100} if tokenizer.eos_token_id is not None else {}  # streams run on
    name = model_dir.name
    slack = "" if args.chunk_slack is None else f", --chunk-slack {args.chunk_slack}"
    configs = [(f"chunked, --max-num-batched-tokens {args.batched_tokens}{slack}", False, REPO / "src")]
    if not args.skip_unchunked:
        configs.append(("unchunked (--no-chunked-prefill)", True, REPO / "src"))
    if args.before_src:
        configs.append(("before: dense left-padded KV (no long prompt: per-step time only)", None,
                        Path(args.before_src)))
    results: dict = {}
    for label, no_chunk, src in configs:
        port = free_port()
        command = [sys.executable, "-m", "shirakit.cli", "serve", "--model", str(model_dir), "--port", str(port),
                   "--max-batch", str(args.clients + 1), "--threads", str(args.threads)]
        if no_chunk is not None:  # the flags exist from this change on
            command += ["--max-num-batched-tokens", str(args.batched_tokens)]
            command += ["--no-chunked-prefill"] if no_chunk else []
        if no_chunk is False and args.chunk_slack is not None:
            command += ["--chunk-slack", args.chunk_slack]
        server = start(command, port, root / "engine.log", src=src)
        try:
            url = f"http://127.0.0.1:{port}"
            asyncio.run(long_prompt_scenario(url, name, vocab, eos, 4, min(64, args.long_tokens), 4, True, seed=7,
                                             stream_tokens=args.stream_tokens))  # warm-up
            runs = {"without": [], "with": []}
            before = _metrics(url)
            for repeat in range(args.repeats):
                for key, with_long in (("without", False), ("with", True))[: 1 if no_chunk is None else 2]:
                    runs[key].append(asyncio.run(long_prompt_scenario(
                        url, name, vocab, eos, args.clients, args.long_tokens, args.window, with_long,
                        seed=100 * repeat, stream_tokens=args.stream_tokens)))
                    print(label, key, runs[key][-1], flush=True)
            after = _metrics(url)
            entry = {key: {field: statistics.median(r[field] for r in rs) for field in ("p50", "p95", "max")}
                     for key, rs in runs.items() if rs}
            entry["ttft"] = statistics.median(r["ttft"] for r in runs["with"]) if runs["with"] else None
            entry["runs"] = runs
            steps = after.get("shirakit_decode_steps_total", 0) - before.get("shirakit_decode_steps_total", 0)
            copied = after.get("shirakit_kv_bytes_copied_total", after.get("shirakit_kv_bytes_copied"))
            if copied is not None and steps:
                entry["copied_per_step"] = (copied - before.get("shirakit_kv_bytes_copied_total",
                                                                before.get("shirakit_kv_bytes_copied", 0))) / steps
            if no_chunk is False and args.health_bodies:
                entry["health"] = asyncio.run(health_under_big_bodies(url, name, vocab, eos, args.clients,
                                                                      args.health_bodies, 10.0, seed=5000,
                                                                      stream_tokens=args.stream_tokens))
                print(label, "health", entry["health"], flush=True)
                entry["health_control"] = asyncio.run(health_under_big_bodies(
                    url, name, vocab, eos, args.clients, 0, 10.0, seed=6000, stream_tokens=args.stream_tokens))
                print(label, "health without big bodies", entry["health_control"], flush=True)
            if no_chunk is False:
                for prompt_tokens in args.prompt_lengths:
                    runs_tp = [asyncio.run(prompt_throughput(url, name, vocab, args.clients, args.clients,
                                                             prompt_tokens, args.tokens, seed=1000 * r))
                               for r in range(args.repeats)]
                    print(label, prompt_tokens, runs_tp, flush=True)
                    middle = sorted(runs_tp, key=lambda r: r["throughput"])[len(runs_tp) // 2]
                    entry[f"throughput{prompt_tokens}"] = middle
            results[label] = entry
        finally:
            stop(server)
    return described, results


def report_engine(described: str, results: dict, args, load: tuple[float, float]) -> str:
    header = ["server", "inter-token p50 ms (no long prompt)", "p95 ms (no long prompt)",
              f"p50 ms ({args.long_tokens}-token prompt arriving)", "p95 ms (arriving)", "p95 ratio", "max gap ms",
              "long prompt TTFT s", "KV bytes copied / decode step"]
    rows = []
    for label, r in results.items():
        if "without" not in r:  # --repeats 0: only the /health and throughput lines below
            continue
        copied = r.get("copied_per_step")
        if "with" in r:
            arriving = [f"{1e3 * r['with']['p50']:.0f}", f"{1e3 * r['with']['p95']:.0f}",
                        f"{r['with']['p95'] / r['without']['p95']:.2f}x", f"{1e3 * r['with']['max']:.0f}",
                        f"{r['ttft']:.1f}"]
        else:
            arriving = ["-"] * 5
        rows.append([label, f"{1e3 * r['without']['p50']:.0f}", f"{1e3 * r['without']['p95']:.0f}", *arriving,
                     "n/a (not counted)" if copied is None else f"{copied:,.0f}"])
    text = (f"{described}; base model only; {args.clients} greedy streams (32-token prompts) decoding, then one "
            f"{args.long_tokens}-token prompt arrives (or, for the 'no long prompt' columns, {args.window} more "
            f"tokens per stream); gaps between stream events of the running rows that overlap the time from its "
            f"arrival to its first token; "
            f"median of {args.repeats} runs per column; --threads {args.threads}; {_report.cpu_model()}, "
            f"{_report.cores()}, shared with other jobs (load average {load[0]:.1f} at the start, {load[1]:.1f} at "
            f"the end); {_report.software()}; {_report.today()}")
    if rows:
        text += "\n\n" + _report.table(header, rows)
    chunked = next(iter(results.values()))
    if "health" in chunked:
        h = chunked["health"]
        text += (f"\n\n/health while {args.clients} streams decode and four clients send requests of 10 MB "
                 f"({h['sent']} in all, >= 3 s; {next(iter(results))}): {h['probes']} probes every 20 ms, latency p50 "
                 f"{1e3 * h['p50']:.1f} ms, p95 {1e3 * h['p95']:.1f} ms, max {1e3 * h['max']:.1f} ms; "
                 f"{h['health_not_200']} not 200; the big requests got {h['statuses']}, the slowest answer in "
                 f"{1e3 * h['refused_max']:.0f} ms")
        c = chunked.get("health_control")
        if c:
            text += (f". The control, the same probes for 3 s with no big bodies: {c['probes']} probes, p50 "
                     f"{1e3 * c['p50']:.1f} ms, p95 {1e3 * c['p95']:.1f} ms, max {1e3 * c['max']:.1f} ms")
    tp_rows = [[f"{n} tokens", f"{chunked[f'throughput{n}']['throughput']:.1f}",
                f"{chunked[f'throughput{n}']['prompt_throughput']:.0f}", f"{chunked[f'throughput{n}']['p50']:.2f}"]
               for n in args.prompt_lengths if f"throughput{n}" in chunked]
    if tp_rows:
        text += (f"\n\nThroughput, {args.clients} clients (closed loop, {args.clients} requests per run, "
                 f"at most {args.tokens} new tokens each), {next(iter(results))}, median of {args.repeats} runs:\n\n"
                 + _report.table(["prompt", "generated tokens/s", "prompt tokens/s", "p50 latency s"], tp_rows))
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--adapters", type=int, default=100)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    parser.add_argument("--write-docs", type=Path, default=None)
    parser.add_argument("--engine-rows", action="store_true",
                        help="only the engine rows (issue 24): a long prompt among decoding rows, chunked vs not; "
                        "throughput with 32- and 512-token prompts")
    parser.add_argument("--long-tokens", type=int, default=2000)
    parser.add_argument("--stream-tokens", type=int, default=400, help="max_tokens of the decoding streams")
    parser.add_argument("--window", type=int, default=24, help="tokens per row in the no-long-prompt window")
    parser.add_argument("--batched-tokens", type=int, default=32, help="--max-num-batched-tokens of the chunked server")
    parser.add_argument("--prompt-lengths", type=int, nargs="*", default=[32, 512])
    parser.add_argument("--chunk-slack", default=None, help="--chunk-slack of the chunked server (default: its own)")
    parser.add_argument("--skip-unchunked", action="store_true", help="only the chunked server")
    parser.add_argument("--health-bodies", type=int, default=0,
                        help="also time /health while this many 10 MB bodies are refused (chunked server)")
    parser.add_argument("--before-src", default=None,
                        help="a src/ folder of an earlier shirakit to run as the 'before' server (git archive)")
    parser.add_argument("--baseline-server", nargs=3, metavar=("MODEL", "ADAPTERS", "PORT"), default=None)
    args = parser.parse_args(argv)
    if args.baseline_server:
        import torch

        torch.set_num_threads(args.threads)
        baseline_server(args.baseline_server[0], args.baseline_server[1], int(args.baseline_server[2]))
        return 0
    if args.quick:
        args.adapters, args.requests, args.tokens, args.repeats, args.clients = 20, 24, 8, 1, 8
    if args.engine_rows:
        if args.quick:
            args.long_tokens, args.prompt_lengths, args.tokens, args.repeats = 40, [8, 32], 8, 1
            args.stream_tokens, args.window = 40, 8
        load_before = os.getloadavg()[0]
        with tempfile.TemporaryDirectory(prefix="shirakit-serve-engine-") as tmp:
            described, results = measure_engine(args, Path(tmp))
        body = report_engine(described, results, args, (load_before, os.getloadavg()[0]))
        publish(args, body, "serve-engine",
                "The engine's memory half: a long prompt among decoding rows (benchmarks/serve.py --engine-rows)",
                "python benchmarks/serve.py --engine-rows --write-docs docs/benchmarks.md")
        return 0
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="shirakit-serve-bench-") as tmp:
        results, described = measure(args, Path(tmp))
    body = report(results, described, args, (load_before, os.getloadavg()[0]))
    publish(args, body, "serve", "Serving under HTTP load (benchmarks/serve.py)",
            "python benchmarks/serve.py --write-docs docs/benchmarks.md")
    return 0


def publish(args, body: str, marker: str, heading: str, command: str) -> None:
    """Print the table; with --write-docs, replace its section (between the marker comments) in the docs."""
    print()
    print(body)
    if args.write_docs:
        _report.replace_section(args.write_docs, f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->",
                                f"## {heading}\n\nCommand: `{command}`\n\n" + body)


if __name__ == "__main__":
    sys.exit(main())
