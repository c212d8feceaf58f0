"""One async client against each serving engine in turn, or against two at once with runs alternating.

    # in vLLM's virtualenv (docs/vllm.md); each engine is its own run (each fits the heavy lock's 10 min)
    python benchmarks/serve_engines.py --engine builtin        --out /tmp/se
    python benchmarks/serve_engines.py --engine shirakit-vllm  --out /tmp/se [--policy auto|rows|drain|slice]
    python benchmarks/serve_engines.py --engine vllm-lora      --out /tmp/se
    python benchmarks/serve_engines.py --engine vllm --settings base --out /tmp/se  # no LoRA: the base only
    python benchmarks/serve_engines.py --table /tmp/se [--write-docs docs/benchmarks.md]
    # the two servers up together, runs alternating between them (ratios of runs seconds apart)
    python benchmarks/serve_engines.py --engine builtin --alternate vllm-lora --out /tmp/se_pairs

Engines: ``builtin`` is ``shirakit serve`` (SHiRA adapters, per request, fused when a batch wants one);
``shirakit-vllm`` is ``shirakit serve --engine vllm`` (SHiRA fused in vLLM's weights or per row in
vLLM's mixed batches, as the front scheduler's ``--policy`` says);
``vllm-lora`` is vLLM's own OpenAI server with LoRA adapters of equal
trainable parameters (LoRA r=8 on q_proj, v_proj = SHiRA r=8 there: K = r(in+out) per layer);
``vllm`` is the same server without ``--enable-lora`` (base setting only): on CPU vLLM compiles its
model only then (vllm/platforms/cpu.py sets ``CompilationMode.NONE`` when LoRA is enabled). Each
server is its own process (``python -m ...``) on 127.0.0.1 and a free port; this process is the load:
``--clients`` concurrent clients (asyncio + httpx, closed loop, streaming) send ``--requests``
completions per setting (greedy, ``--tokens`` new tokens with ``ignore_eos``, so every engine generates the
same count: the table's "tokens / request" shows it; ~30-token prompts), each naming the base or an
adapter drawn from the setting's mix: base; 1 adapter; 4 or 16 adapters uniform; 4 or 16 zipf
(adapter k with probability ~ 1/(k+1)^1.1). Output per setting: generated tokens per wall second (the
median of ``--repeats`` runs, after a 4-token warm-up run that loads the adapters), time to first
token and inter-token gap p50/p95 (over all streamed chunks of that run), and the server's resident
memory (its whole process tree) at
the end. Model: SmolLM2-135M-Instruct from ``shirakit.data.smollm2_dir()`` (fp32). vLLM runs on both
cores (``VLLM_CPU_OMP_THREADS_BIND=0-1``), the built-in engine with 2 torch threads.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402
from serve import free_port  # noqa: E402  (benchmarks/serve.py)

REPO = Path(__file__).resolve().parent.parent
ENGINES = ("builtin", "shirakit-vllm", "vllm-lora", "vllm")
SETTINGS = [("base", 0, "one"), ("1 adapter", 1, "one"), ("4 uniform", 4, "uniform"), ("4 zipf", 4, "zipf"),
            ("16 uniform", 16, "uniform"), ("16 zipf", 16, "zipf")]
VLLM_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": "2"}
BEGIN, END = "<!-- serve_engines:begin -->", "<!-- serve_engines:end -->"


def make_adapters(model_dir: Path, out: Path, method: str, count: int) -> list[str]:
    """``count`` random adapters (SHiRA or LoRA, r=8 on q_proj and v_proj) in PEFT's layout."""
    import torch
    from transformers import AutoModelForCausalLM

    import shirakit

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    names = []
    for i in range(count):
        name = f"{method}-{i:02d}"
        torch.manual_seed(i)
        if method == "shira":
            config = shirakit.ShiraConfig(r=8, target_modules=["q_proj", "v_proj"], init_weights=False, random_seed=i)
        else:
            config = shirakit.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                         init_lora_weights=False)
        shirakit.inject(model, config, name)
        shirakit.save_adapter(model, out / name, name)
        shirakit.delete_adapter(model, name)
        names.append(name)
    return names


def requests_for(setting: tuple[str, int, str], names: list[str], count: int, seed: int = 1) -> list[str]:
    _, adapters, kind = setting
    if adapters == 0:
        return ["base"] * count
    pool = names[:adapters]
    rng = random.Random(seed)
    if kind == "one":
        return [pool[0]] * count
    if kind == "uniform":
        return [rng.choice(pool) for _ in range(count)]
    return rng.choices(pool, [1 / (k + 1) ** 1.1 for k in range(len(pool))], k=count)


def server_command(engine: str, model_dir: Path, adapters: Path, names: list[str], port: int, policy: str):
    if engine == "builtin":
        return [sys.executable, "-m", "shirakit.cli", "serve", "--model", str(model_dir), "--adapters", str(adapters),
                "--served-model-name", "base", "--port", str(port), "--max-loaded", "16", "--threads", "2"]
    if engine == "shirakit-vllm":
        return [sys.executable, "-m", "shirakit.cli", "serve", "--engine", "vllm", "--model", str(model_dir),
                "--adapters", str(adapters), "--served-model-name", "base", "--port", str(port), "--policy", policy]
    plain = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
             "--served-model-name", "base", "--port", str(port), "--host", "127.0.0.1", "--dtype", "float32",
             "--gpu-memory-utilization", "0.25"]
    if engine == "vllm":
        return plain
    modules = [f"{n}={adapters / n}" for n in names]
    return [*plain, "--enable-lora", "--max-lora-rank", "8", "--max-loras", "16", "--lora-modules", *modules]


def start(command: list[str], port: int, log: Path, env: dict, timeout: float = 420) -> subprocess.Popen:
    import httpx

    env = dict(os.environ, **env, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # its own process group: vLLM's engine and worker processes are stopped with it (stop)
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                               start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    stop(process)
    raise RuntimeError(f"server did not start in {timeout} s: {log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's whole process group, SIGKILL after 30 s."""
    import signal

    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
            time.sleep(1)  # the group's other members go with the leader's signal; give them a moment
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(process.pid, signal.SIGKILL)  # stragglers of the group (vLLM's workers)
    except ProcessLookupError:
        pass


def tree_rss_mb(pid: int) -> float:
    import psutil

    root = psutil.Process(pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


async def load(url: str, models: list[str], clients: int, tokens: int) -> dict:
    """Closed-loop streaming clients -> tokens/s, TTFT and inter-token gaps."""
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for i, model in enumerate(models):
        queue.put_nowait((i, model))
    ttfts, gaps, generated, failed, answered = [], [], 0, 0, 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal generated, failed, answered
        while not queue.empty():
            i, model = queue.get_nowait()
            body = {"model": model, "max_tokens": tokens, "temperature": 0, "stream": True, "ignore_eos": True,
                    "stream_options": {"include_usage": True},
                    "prompt": f"Request {i}: please tell me, in a few plain sentences, what adapter {model} does."}
            start, last, usage = time.perf_counter(), None, 0
            try:
                async with http.stream("POST", url + "/v1/completions", json=body) as response:
                    if response.status_code != 200:
                        failed += 1
                        continue
                    async for line in response.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        chunk = json.loads(line[6:])
                        now = time.perf_counter()
                        if chunk.get("usage"):
                            usage = chunk["usage"]["completion_tokens"]
                        if chunk.get("choices") and chunk["choices"][0].get("text"):
                            if last is None:
                                ttfts.append(now - start)
                            else:
                                gaps.append(now - last)
                            last = now
            except httpx.HTTPError:
                failed += 1
                continue
            generated += usage
            answered += 1

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    wall = time.perf_counter() - start

    def pct(values, q):
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else float("nan")

    return {"tokens_s": generated / wall, "ttft_p50": pct(ttfts, 0.5), "ttft_p95": pct(ttfts, 0.95),
            "itl_p50": pct(gaps, 0.5), "itl_p95": pct(gaps, 0.95), "failed": failed,
            "tokens_per_request": generated / max(answered, 1)}


def launch(engine: str, args, model_dir: Path, root: Path) -> tuple[subprocess.Popen, str, list[str], dict]:
    """Start ``engine``'s server on its own adapters -> (process, url, adapter names, results so far)."""
    method = "lora" if engine == "vllm-lora" else "shira"
    folder = root / f"adapters-{method}"
    names = [] if engine == "vllm" else make_adapters(model_dir, folder, method, 16)
    port = free_port()
    label = engine + (f" ({args.policy})" if engine == "shirakit-vllm" else "")
    began = time.perf_counter()
    server = start(server_command(engine, model_dir, folder, names, port, args.policy), port,
                   root / f"server-{engine}.log", dict(kv.split("=", 1) for kv in args.builtin_env)
                   if engine == "builtin" else VLLM_ENV)
    return server, f"http://127.0.0.1:{port}", names, {"engine": label, "start_s": time.perf_counter() - began,
                                                      "settings": {}}


def summarize(runs: list[dict], server: subprocess.Popen) -> dict:
    """The median run by tokens/s, with every run's tokens/s, the failures and the server's RSS."""
    median = dict(sorted(runs, key=lambda r: r["tokens_s"])[len(runs) // 2])
    median.update(runs=[round(r["tokens_s"], 1) for r in runs], failed=sum(r["failed"] for r in runs),
                  rss_mb=tree_rss_mb(server.pid))
    return median


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its children (vLLM's engine and workers)."""
    import psutil

    total = 0.0
    root = psutil.Process(pid)
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def run_engine(args) -> dict:
    import tempfile

    from shirakit.data import smollm2_dir

    model_dir = smollm2_dir()
    server, url, names, results = launch(args.engine, args, model_dir, Path(tempfile.mkdtemp(prefix="serve_engines-")))
    try:
        for setting in [s for s in SETTINGS if args.settings is None or s[0] in args.settings]:
            models = requests_for(setting, names, args.requests)
            asyncio.run(load(url, models[: args.clients], args.clients, 4))  # warm-up: loads the adapters
            runs = [asyncio.run(load(url, models, args.clients, args.tokens)) for _ in range(args.repeats)]
            results["settings"][setting[0]] = summarize(runs, server)
            print(results["engine"], setting[0], json.dumps(results["settings"][setting[0]]), flush=True)
            save(args, results)  # a run cut short (the lock's time limit) keeps its finished settings
    finally:
        stop(server)
    return results


def run_alternating(args) -> None:
    """Both engines' servers up at once, idle but for the run at hand: per setting, runs alternate
    between them (A B, B A, ...), so each ratio compares runs seconds apart. Why: on a shared
    machine the speed swings by a third within minutes, more than the targets' margins, and one
    engine's pass after the other's read 0.73-0.95x for the same code. The servers' CPU seconds
    while both sit idle are printed first: an idle server that spins would slow the other."""
    import tempfile

    from shirakit.data import smollm2_dir

    model_dir = smollm2_dir()
    root = Path(tempfile.mkdtemp(prefix="serve_engines-"))
    engines = [args.engine, args.alternate]
    launched = {}
    try:
        for engine in engines:
            launched[engine] = launch(engine, args, model_dir, root)
        before = {e: cpu_seconds(launched[e][0].pid) for e in engines}
        time.sleep(5)
        idle = {e: (cpu_seconds(launched[e][0].pid) - before[e]) / 5 for e in engines}
        print("idle CPU (cores) while both wait:", json.dumps({e: round(v, 3) for e, v in idle.items()}), flush=True)
        for setting in [s for s in SETTINGS if args.settings is None or s[0] in args.settings]:
            runs = {e: [] for e in engines}
            for engine in engines:  # warm-up: loads the adapters
                _, url, names, _ = launched[engine]
                asyncio.run(load(url, requests_for(setting, names, args.requests)[: args.clients], args.clients, 4))
            for repeat in range(args.repeats):
                for engine in engines if repeat % 2 == 0 else engines[::-1]:
                    _, url, names, _ = launched[engine]
                    runs[engine].append(asyncio.run(load(url, requests_for(setting, names, args.requests),
                                                         args.clients, args.tokens)))
            pairs = [a["tokens_s"] / b["tokens_s"] for a, b in zip(runs[engines[0]], runs[engines[1]])]
            for engine in engines:
                server, _, _, results = launched[engine]
                results["settings"][setting[0]] = summarize(runs[engine], server)
                results["settings"][setting[0]]["pair_ratios"] = [round(r, 3) for r in pairs]
                print(results["engine"], setting[0], json.dumps(results["settings"][setting[0]]), flush=True)
            print(f"{setting[0]}: {engines[0]} / {engines[1]} per pair {[round(r, 2) for r in pairs]}, "
                  f"median {statistics.median(pairs):.2f}", flush=True)
            for engine in engines:
                save(argparse.Namespace(**{**vars(args), "engine": engine}), launched[engine][3])
    finally:
        for server, *_ in launched.values():
            stop(server)


def save(args, result: dict) -> None:
    result = dict(result, machine=_report.machine_facts("serve_engines"), clients=args.clients,
                  requests=args.requests, tokens=args.tokens, repeats=args.repeats, load=os.getloadavg(),
                  load_start=getattr(args, "load_start", None))
    args.out.mkdir(parents=True, exist_ok=True)
    name = args.engine + ("-" + args.policy if args.engine == "shirakit-vllm" else "")
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))


def table(folder: Path) -> str:
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    rows = []
    for run in runs:
        base = run["settings"].get("base", {}).get("tokens_s")
        for name, r in run["settings"].items():
            per_request = f"{r['tokens_per_request']:.1f}" if "tokens_per_request" in r else "-"  # older runs: -
            rows.append([run["engine"], name, f"{r['tokens_s']:.1f} ({', '.join(map(str, r['runs']))})",
                         f"{r['tokens_s'] / base:.2f}" if base else "-",
                         f"{r['ttft_p50']:.0f} / {r['ttft_p95']:.0f}", f"{r['itl_p50']:.0f} / {r['itl_p95']:.0f}",
                         per_request, f"{r['rss_mb']:.0f}", str(r["failed"])])
    header = ["engine", "setting", "tokens/s (runs)", "x its base", "TTFT p50/p95 ms", "inter-token p50/p95 ms",
              "tokens / request", "RSS MiB", "failed"]
    notes = [f"- {run['engine']}: {run['machine']['date']}, started in {run['start_s']:.0f} s, load average "
             + (f"{', '.join(f'{x:.1f}' for x in run['load_start'])} at the start, " if run.get("load_start") else "")
             + f"{', '.join(f'{x:.1f}' for x in run['load'])} at the end; {run['clients']} clients, "
             f"{run['requests']} requests x {run['tokens']} tokens, {run['repeats']} runs per setting"
             for run in runs]
    machine = runs[0]["machine"] if runs else {"machine": "", "software": ""}
    return "\n".join(["## Serving engines side by side (`benchmarks/serve_engines.py`)", "",
                      f"{machine['machine']}. {machine['software']}.", "", _report.table(header, rows), "",
                      *notes])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=ENGINES)
    parser.add_argument("--policy", default="auto", choices=["auto", "rows", "drain", "slice"],
                        help="shirakit-vllm's scheduler policy (docs/vllm.md)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/serve_engines"))
    parser.add_argument("--table", type=Path, default=None, help="print the table of the runs in this folder")
    parser.add_argument("--write-docs", type=Path, default=None)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--builtin-env", nargs="*", default=[], metavar="NAME=VALUE",
                        help="environment variables of the builtin engine's server (e.g. OMP_PROC_BIND=true)")
    parser.add_argument("--alternate", choices=ENGINES, default=None,
                        help="also start this engine's server and alternate runs between the two (run_alternating)")
    parser.add_argument("--settings", nargs="+", default=None, choices=[s[0] for s in SETTINGS], metavar="SETTING",
                        help=f"run only these settings (default: all of {[s[0] for s in SETTINGS]})")
    args = parser.parse_args(argv)
    import signal

    # `timeout` and the heavy lock end a run with SIGTERM, whose default action skips `finally`: make it an exit, so
    # the server this run started is always stopped (a left-over vLLM worker once spun on a core for 45 minutes)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.table:
        text = table(args.table)
        print(text)
        if args.write_docs:
            _report.replace_section(args.write_docs, BEGIN, END, text)
        return 0
    if not args.engine:
        parser.error("--engine or --table")
    if "vllm" in (args.engine, args.alternate) and args.settings != ["base"]:
        parser.error("the vllm engine serves no adapters: run it with --settings base")
    args.load_start = os.getloadavg()
    if args.alternate:
        run_alternating(args)
    else:
        save(args, run_engine(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
