"""`shirakit serve` under real HTTP load: throughput, latency and failures per adapter mix.

    python benchmarks/serve.py                  # SmolLM2-135M, 100 SHiRA adapters (~10 min on 2 busy cores)
    python benchmarks/serve.py --quick          # tiny random Llama: a < 1 min smoke test
    python benchmarks/serve.py --write-docs docs/benchmarks.md

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
import subprocess
import sys
import tempfile
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


def start(command: list[str], port: int, log: Path, timeout: float = 300) -> subprocess.Popen:
    import httpx

    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
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
    parser.add_argument("--baseline-server", nargs=3, metavar=("MODEL", "ADAPTERS", "PORT"), default=None)
    args = parser.parse_args(argv)
    if args.baseline_server:
        import torch

        torch.set_num_threads(args.threads)
        baseline_server(args.baseline_server[0], args.baseline_server[1], int(args.baseline_server[2]))
        return 0
    if args.quick:
        args.adapters, args.requests, args.tokens, args.repeats, args.clients = 20, 24, 8, 1, 8
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="shirakit-serve-bench-") as tmp:
        results, described = measure(args, Path(tmp))
    body = report(results, described, args, (load_before, os.getloadavg()[0]))
    print()
    print(body)
    if args.write_docs:
        _report.replace_section(args.write_docs, "<!-- serve:begin -->", "<!-- serve:end -->",
                                "## Serving under HTTP load (benchmarks/serve.py)\n\n"
                                "Command: `python benchmarks/serve.py --write-docs docs/benchmarks.md`\n\n" + body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
