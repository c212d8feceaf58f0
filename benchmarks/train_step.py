"""Training step and adapter load: shirakit vs Hugging Face PEFT, LoRA vs SHiRA, side by side.

    python benchmarks/train_step.py                      # the full benchmark (minutes on 2 cores)
    python benchmarks/train_step.py --quick              # tiny model, few steps: a smoke test
    python benchmarks/train_step.py --write-docs docs/benchmarks.md   # also update the docs section

Model: a Llama-shaped causal LM built from ``transformers.LlamaConfig`` with random weights, fp32,
on CPU (full size: hidden 1024, intermediate 2816, 4 layers, 16 heads, vocab 8192). Every adapter
targets all seven projections (q, k, v, o, gate, up, down) with r = 32; LoRA uses alpha = 2r.
SHiRA with rank r trains K = r * (in + out) values per layer: as many as rank-r LoRA.

Section 1, train step. One step is ``zero_grad`` + forward with the LM loss + backward + AdamW
``step``, timed with ``time.perf_counter`` (CPU work is synchronous, so the wall time is the cost)
and with ``time.process_time`` (CPU time of all the process's threads). After ``--warmup``
untimed steps come ``--steps`` timed ones; the table gives their median wall time, min and max,
and the median CPU time. Rows: shirakit LoRA, shirakit LoRA with lora_dropout=0.05 (a common real
config; dropout keeps an extra copy of each adapted layer's input for the backward), shirakit
SHiRA (random mask, PEFT's default), shirakit SHiRA with the paper's struct mask (its value
gradient by dense products, ``methods/shira/struct_grad.py``), and LoRA, LoRA with dropout and
SHiRA with PEFT (``peft.get_peft_model``). Every row runs in a fresh Python
process (``--worker ROW``, which prints one JSON line) so that no row sees another's memory, and
each worker imports only the library it measures. ``--rounds N`` runs every worker N times (the
order rotated each round) and pools the timed steps.

Noise on a shared machine: other processes only ever add time, so a step's min is the closest to
its intrinsic cost and its median is what a user waiting on it sees; both are reported, with the
1-minute load average each worker saw. With more torch threads than idle cores, OpenMP barriers
wait for descheduled threads and the slowdown grows with the number of parallel ops rather than
with their size, so on a busy machine ``--threads 1`` gives steadier ratios (and CPU time, which
with one thread does not count waiting, is then the most robust column).

Memory (Linux): RSS is read from ``/proc/self/status``. ``RSS before`` is VmRSS once the model,
adapter, optimizer and batch exist but before the first step. Right before the timed loop the
kernel's high-water mark is reset (``5`` written to ``/proc/self/clear_refs``), and after it VmHWM
is the ``peak RSS`` of the timed steps. ``overhead`` = peak - RSS before: what training adds to
the built model (AdamW state, gradients, saved activations, allocator slack). There is no exact
CPU counter like ``torch.cuda.max_memory_allocated``; RSS includes memory the allocator keeps
after a free, which is real memory the process holds, so it is reported as such.

Section 2, adapter load. One worker per library builds the same model, saves a LoRA adapter and a
SHiRA adapter (the same r, so equal trainable size; values randomized) with that library, then
times loading each into a fresh copy of the base model (``copy.deepcopy``, not timed):
``shirakit.load_adapter`` or ``peft.PeftModel.from_pretrained``. The first ``--load-warmup``
loads of each are untimed (the first is reported as "first"); then ``--load-repeats`` timed
loads per adapter, alternating LoRA and SHiRA (order flipped every round) so that drifting load
on a shared machine hits both alike; wall and CPU time are reported as in section 1. Work a
library defers past the load call (shirakit scatters SHiRA's values into the weight on the first
forward) is not part of the load time.

The printed tables are Markdown; ``--write-docs FILE`` also writes them, with the date, machine
and exact command, into FILE between ``<!-- train_step:begin -->`` and ``<!-- train_step:end -->``
(the rest of FILE is left alone; the section is appended if the markers are missing).
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BEGIN, END = "<!-- train_step:begin -->", "<!-- train_step:end -->"
from _report import (  # noqa: E402
    add_preset_args,
    apply_presets,
    command_line,
    emit,
    flags,
    machine_facts,
    publish,
    run_worker_process,
    table,
)

MIB = 1024 * 1024

# Counts per mode; any flag given on the command line wins over these.
PRESETS = {
    "full": dict(layers=2, vocab=8192, batch=2, seq=256, r=16, warmup=2, steps=7, load_warmup=1, load_repeats=7),
    "quick": dict(layers=2, vocab=512, batch=2, seq=64, r=8, warmup=1, steps=3, load_warmup=1, load_repeats=3),
}
# The layer-size axis: (hidden, intermediate, attention heads, key/value heads). 576 x 1536 is SmolLM2-135M's.
SIZES = {
    "1024x2816": (1024, 2816, 16, 16),
    "576x1536": (576, 1536, 9, 3),
    "128x352": (128, 352, 4, 4),  # --quick
}
DEFAULT_ROWS = ["frozen", "shirakit-lora", "shirakit-shira", "shirakit-shira-struct"]


@dataclass(frozen=True)
class Row:
    library: str  # "shirakit" or "peft"
    method: str  # "lora", "shira", "vera", "miss" (balance) or "miss-bat"
    with_dropout: bool = False  # LoRA with lora_dropout = --dropout (else 0)
    mask: str = "random"  # SHiRA's mask_type

    def label(self, args: argparse.Namespace) -> str:
        if self.method == "frozen":
            return "frozen base (no adapter)"
        names = {"lora": "LoRA", "shira": "SHiRA", "vera": f"VeRA r={VERA_R}", "miss": f"MiSS r={MISS_R}",
                 "miss-bat": f"MiSS-bat r={MISS_R}"}
        name = f"{self.library} {names[self.method]}" + (f" ({self.mask} mask)" if self.mask != "random" else "")
        return f"{name}, dropout {args.dropout:g}" if self.with_dropout else name


ROWS = {
    "frozen": Row("transformers", "frozen"),
    "shirakit-lora": Row("shirakit", "lora"),
    "shirakit-lora-dropout": Row("shirakit", "lora", with_dropout=True),
    "shirakit-shira": Row("shirakit", "shira"),
    "shirakit-shira-struct": Row("shirakit", "shira", mask="struct"),
    "peft-lora": Row("peft", "lora"),
    "peft-lora-dropout": Row("peft", "lora", with_dropout=True),
    "peft-shira": Row("peft", "shira"),
    "shirakit-vera": Row("shirakit", "vera"),
    "peft-vera": Row("peft", "vera"),
    "shirakit-miss": Row("shirakit", "miss"),
    "peft-miss": Row("peft", "miss"),
    "shirakit-miss-bat": Row("shirakit", "miss-bat"),
    "peft-miss-bat": Row("peft", "miss-bat"),
}
VERA_R, MISS_R = 256, 64  # issue 3's configs
LIBRARIES = ("shirakit", "peft")


# ---- arguments ------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model and few steps (smoke test)")
    p.add_argument("--threads", type=int, nargs="+", default=None,
                   help="the threads axis: torch.set_num_threads per worker, one run per value (default 1 2)")
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), default=None,
                   help="the layer-size axis, hidden x intermediate (default 1024x2816 576x1536; --quick 128x352)")
    p.add_argument("--jobs", type=int, default=None,
                   help="workers run at once (default 1; --quick: 2). Above 1 the timings are not\n"
                        "comparable: only for smoke tests")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every worker this many times (fresh processes, order rotated each round)\n"
                        "and pool their timings; helps on a machine whose load drifts")
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=DEFAULT_ROWS,
                   help=f"train-step rows to run (default {' '.join(DEFAULT_ROWS)}; all: {' '.join(ROWS)})")
    p.add_argument("--skip-train", action="store_true", help="skip section 1 (train step)")
    p.add_argument("--skip-load", action="store_true", help="skip section 2 (adapter load)")
    p.add_argument("--write-docs", type=Path, default=None, metavar="FILE",
                   help="write the results section into FILE between the train_step markers")
    p.add_argument("--seed", type=int, default=0)
    add_preset_args(p, PRESETS)
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 * r)")
    p.add_argument("--dropout", type=float, default=0.05, help="lora_dropout of the *-dropout rows")
    # internal: one point of the axes, set by the driver for its workers
    for name in ("hidden", "intermediate", "heads", "kv-heads"):
        p.add_argument(f"--{name}", type=int, default=None, help=argparse.SUPPRESS)
    # internal: run one measurement in this process and print it as JSON
    p.add_argument("--worker", choices=list(ROWS), help=argparse.SUPPRESS)
    p.add_argument("--load-worker", choices=LIBRARIES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    apply_presets(args, PRESETS)
    if args.alpha is None:
        args.alpha = 2.0 * args.r
    if args.jobs is None:
        args.jobs = 2 if args.quick else 1
    args.threads = args.threads or ([1] if args.quick else [1, 2])
    args.sizes = args.sizes or (["128x352"] if args.quick else ["1024x2816", "576x1536"])
    counts = (args.steps, args.load_repeats, args.jobs, min(args.threads), args.rounds)
    if min(counts) < 1 or min(args.warmup, args.load_warmup) < 0:
        p.error("--steps, --load-repeats, --jobs, --threads and --rounds must be >= 1, warm-up counts >= 0")
    return args


def worker_argv(args: argparse.Namespace, size: str, threads: int) -> list[str]:
    """The resolved settings and one point of the axes as explicit flags (a worker needs no presets)."""
    hidden, intermediate, heads, kv_heads = SIZES[size]
    point = ["--hidden", str(hidden), "--intermediate", str(intermediate), "--heads", str(heads),
             "--kv-heads", str(kv_heads), "--threads", str(threads)]
    return flags(args, [*PRESETS["full"], "alpha", "dropout", "seed"]) + point


# ---- measurement helpers ------------------------------------------------------------------
def proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> None:
    """Set the kernel's VmHWM back to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
        max_position_embeddings=max(args.seq, 128), tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config).to(torch.float32)


def add_adapter(model: torch.nn.Module, library: str, method: str, dropout: float, args,
                mask: str = "random") -> torch.nn.Module:
    """The adapter of ``method`` on TARGETS, by ``library`` (SHiRA with ``mask``); returns the model to train."""
    if method == "frozen":  # the floor: every weight frozen, only the input gradient flows back
        model.requires_grad_(False)
        model.enable_input_require_grads()
        return model
    if library == "shirakit":
        import shirakit

        lib = shirakit
    else:
        import peft as lib
    # issue 3's configs; smaller where the (--quick) layers cannot take them (bat needs r | in, out)
    vera_r = min(VERA_R, args.hidden)
    miss_r = MISS_R if args.hidden % MISS_R == 0 and args.intermediate % MISS_R == 0 else 8
    config = {
        "lora": lambda: lib.LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=dropout, target_modules=TARGETS),
        "shira": lambda: lib.ShiraConfig(r=args.r, target_modules=TARGETS, random_seed=args.seed,
                                         **({"mask_type": mask} if mask != "random" else {})),
        "vera": lambda: lib.VeraConfig(r=vera_r, target_modules=TARGETS),
        "miss": lambda: lib.MissConfig(r=miss_r, target_modules=TARGETS),
        "miss-bat": lambda: lib.MissConfig(r=miss_r, target_modules=TARGETS, init_weights="bat"),
    }[method]()
    return shirakit.inject(model, config) if library == "shirakit" else lib.get_peft_model(model, config)


def count_trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---- section 1: one train-step row (runs in its own process) ------------------------------
def clocks() -> tuple[float, float]:
    """(wall, CPU) seconds; CPU time counts every thread of this process."""
    return time.perf_counter(), time.process_time()


def train_worker(args: argparse.Namespace) -> None:
    row = ROWS[args.worker]
    torch.set_num_threads(args.threads[0])
    dropout = args.dropout if row.with_dropout else 0.0
    model = add_adapter(build_model(args), row.library, row.method, dropout, args, row.mask)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None  # the frozen base has nothing to step
    gen = torch.Generator().manual_seed(args.seed)
    batch = torch.randint(args.vocab, (args.batch, args.seq), generator=gen)

    def step() -> float:
        if optimizer:
            optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        if optimizer:
            optimizer.step()
        return loss.item()

    gc.collect()
    rss_before = proc_status_kib("VmRSS")
    losses = [step() for _ in range(args.warmup)]
    gc.collect()
    reset_peak_rss()
    wall, cpu = [], []
    for _ in range(args.steps):
        w0, c0 = clocks()
        losses.append(step())
        w1, c1 = clocks()
        wall.append(w1 - w0)
        cpu.append(c1 - c0)
    peak = proc_status_kib("VmHWM")
    emit({
        "row": args.worker, "trainable": count_trainable(model), "wall_s": wall, "cpu_s": cpu,
        "rss_before_kib": rss_before, "peak_rss_kib": peak, "losses": losses, "loadavg": os.getloadavg()[0],
    })


# ---- section 2: adapter load for one library (runs in its own process) -----------------------
def save_adapters(base: torch.nn.Module, library: str, args, directory: Path) -> dict[str, dict]:
    """Save a LoRA and a SHiRA adapter (random values) made by ``library`` (shirakit: SHiRA also in its
    compact layout); return their facts."""
    saved = {}
    for method in ("lora", "shira", "shira-compact") if library == "shirakit" else ("lora", "shira"):
        model = add_adapter(copy.deepcopy(base), library, method.removesuffix("-compact"), 0.0, args)
        gen = torch.Generator().manual_seed(args.seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.01)
        path = directory / f"{library}-{method}"
        if library == "shirakit":
            import shirakit

            shirakit.save_adapter(model, path, compact=method.endswith("-compact"))
        else:
            model.save_pretrained(str(path))
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        saved[method] = {"path": str(path), "trainable": count_trainable(model), "bytes": size}
        del model
    return saved


def load_once(base: torch.nn.Module, library: str, path: str) -> tuple[float, float]:
    """(wall, CPU) seconds to load the adapter at ``path`` into a fresh copy of ``base``."""
    model = copy.deepcopy(base)
    gc.collect()
    w0, c0 = clocks()
    if library == "shirakit":
        import shirakit

        shirakit.load_adapter(model, path)
    else:
        import peft

        model = peft.PeftModel.from_pretrained(model, path)
    w1, c1 = clocks()
    del model
    return w1 - w0, c1 - c0


def load_worker(args: argparse.Namespace) -> None:
    library = args.load_worker
    torch.set_num_threads(args.threads[0])
    base = build_model(args)
    with tempfile.TemporaryDirectory(prefix="shirakit-bench-") as tmp:
        saved = save_adapters(base, library, args, Path(tmp))
        first: dict[str, float] = {}
        for _ in range(args.load_warmup):
            for method, facts in saved.items():
                wall, _ = load_once(base, library, facts["path"])
                first.setdefault(method, wall)
        timed: dict[str, list[tuple[float, float]]] = {m: [] for m in saved}
        for i in range(args.load_repeats):
            for method in list(saved) if i % 2 == 0 else list(reversed(saved)):
                timed[method].append(load_once(base, library, saved[method]["path"]))
    emit({
        "library": library, "loadavg": os.getloadavg()[0],
        "methods": {
            m: {"trainable": saved[m]["trainable"], "bytes": saved[m]["bytes"], "first_s": first.get(m),
                "wall_s": [w for w, _ in timed[m]], "cpu_s": [c for _, c in timed[m]]}
            for m in saved
        },
    })


# ---- the driver -------------------------------------------------------------------------------
def run_worker(flag: str, value: str, args: argparse.Namespace, size: str, threads: int) -> dict:
    print(f"  running {flag} {value} ({size}, {threads} thread(s); load {os.getloadavg()[0]:.1f}) ...",
          file=sys.stderr, flush=True)
    env = {"TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
    return run_worker_process(__file__, [flag, value, *worker_argv(args, size, threads)], env)


Point = tuple[str, int]  # (layer size, threads): one point of the axes


def run_all(args: argparse.Namespace) -> dict[Point, tuple[dict[str, list[dict]], dict[str, list[dict]]]]:
    """For every (size, threads): every worker ``--rounds`` times, the order rotated each round (the
    load workers only at the first thread count); per point, results per row / library."""
    points = [(size, threads) for size in args.sizes for threads in args.threads]
    out = {}
    for size, threads in points:
        work = ([] if args.skip_train else [("--worker", key) for key in args.rows])
        if not args.skip_load and threads == args.threads[0]:
            work += [("--load-worker", lib) for lib in LIBRARIES]
        jobs = [job for r in range(args.rounds) for job in work[r % len(work):] + work[: r % len(work)]] if work else []
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # --jobs 1: strictly one after another
            results = list(pool.map(lambda job, s=size, t=threads: run_worker(*job, args, s, t), jobs))
        train: dict[str, list[dict]] = {key: [] for flag, key in work if flag == "--worker"}
        load: dict[str, list[dict]] = {lib: [] for flag, lib in work if flag == "--load-worker"}
        for (flag, key), res in zip(jobs, results):
            (train if flag == "--worker" else load)[key].append(res)
        out[size, threads] = (train, load)
    return out


def median(values) -> float:
    return statistics.median(values)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.0f}" if seconds >= 0.1 else f"{seconds * 1e3:,.1f}"


def mib(kib: float) -> str:
    return f"{kib / 1024:,.0f}"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "n/a"


def train_stats(runs: list[dict]) -> dict[str, float]:
    """Pool the rounds of one row: timings are pooled, memory is the median over rounds."""
    wall = [t for run in runs for t in run["wall_s"]]
    return {
        "trainable": runs[0]["trainable"], "wall": median(wall), "wall_min": min(wall), "wall_max": max(wall),
        "cpu": median([t for run in runs for t in run["cpu_s"]]),
        "peak": median([run["peak_rss_kib"] for run in runs]),
        "before": median([run["rss_before_kib"] for run in runs]),
        "overhead": median([run["peak_rss_kib"] - run["rss_before_kib"] for run in runs]),
        "loadavg": statistics.mean(run["loadavg"] for run in runs),
    }


def train_section(results: dict[str, list[dict]], args: argparse.Namespace) -> str:
    stats = {key: train_stats(runs) for key, runs in results.items()}
    rows = [[
        ROWS[key].label(args), f"{s['trainable']:,}", ms(s["wall"]), f"{ms(s['wall_min'])}-{ms(s['wall_max'])}",
        ms(s["cpu"]), mib(s["peak"]), mib(s["before"]), mib(s["overhead"]), f"{s['loadavg']:.1f}",
    ] for key, s in stats.items()]
    out = table(["row", "trainable", "step median (ms)", "min-max (ms)", "CPU/step median (ms)",
                 "peak RSS (MiB)", "RSS before (MiB)", "overhead (MiB)", "load avg"], rows)
    pairs = [
        ("shirakit-shira", "shirakit-lora"), ("shirakit-shira", "frozen"), ("shirakit-lora", "frozen"),
        ("shirakit-shira-struct", "shirakit-lora"), ("shirakit-shira-struct", "frozen"),
        ("shirakit-shira-struct", "shirakit-shira"), ("shirakit-shira", "shirakit-lora-dropout"),
        ("peft-shira", "peft-lora"), ("peft-shira", "peft-lora-dropout"),
        ("shirakit-lora", "peft-lora"), ("shirakit-lora-dropout", "peft-lora-dropout"),
        ("shirakit-shira", "peft-shira"),
        ("shirakit-vera", "peft-vera"), ("shirakit-miss", "peft-miss"), ("shirakit-miss-bat", "peft-miss-bat"),
    ]
    columns = ("wall", "wall_min", "cpu", "peak", "overhead")
    ratio_rows = [
        [f"{ROWS[a].label(args)} / {ROWS[b].label(args)}", *(ratio(stats[a][c], stats[b][c]) for c in columns)]
        for a, b in pairs if a in stats and b in stats
    ]
    if ratio_rows:
        out += "\n\nRatios (below 1: the first is faster / smaller):\n\n" + table(
            ["ratio", "step median", "step min", "CPU/step", "peak RSS", "overhead"], ratio_rows)
    return out


LOAD_NAMES = {"lora": "LoRA", "shira": "SHiRA", "shira-compact": "SHiRA compact layout"}


def load_section(results: dict[str, list[dict]]) -> str:
    stats: dict[tuple[str, str], dict[str, float]] = {}
    for library, runs in results.items():
        for method in runs[0]["methods"]:
            ms_ = [run["methods"][method] for run in runs]
            wall = [t for m in ms_ for t in m["wall_s"]]
            stats[library, method] = {
                "trainable": ms_[0]["trainable"], "bytes": ms_[0]["bytes"], "first": ms_[0]["first_s"],
                "wall": median(wall), "wall_min": min(wall), "wall_max": max(wall),
                "cpu": median([t for m in ms_ for t in m["cpu_s"]]),
                "loadavg": statistics.mean(run["loadavg"] for run in runs),
            }
    names = LOAD_NAMES
    rows = [[
        f"{library} {names[method]}", f"{s['trainable']:,}", f"{s['bytes'] / MIB:,.1f}", ms(s["wall"]),
        f"{ms(s['wall_min'])}-{ms(s['wall_max'])}", ms(s["cpu"]), ms(s["first"]) if s["first"] is not None else "-",
        f"{s['loadavg']:.1f}",
    ] for (library, method), s in stats.items()]
    out = table(["adapter", "trainable", "files (MiB)", "load median (ms)", "min-max (ms)", "CPU median (ms)",
                 "first load (ms)", "load avg"], rows)
    pairs = [((lib, m), (lib, "lora")) for lib in results for m in ("shira", "shira-compact") if (lib, m) in stats]
    pairs += [(("shirakit", m), ("peft", m)) for m in names if ("shirakit", m) in stats and ("peft", m) in stats]
    columns = ("wall", "wall_min", "cpu")
    ratio_rows = [[f"{a[0]} {names[a[1]]} / {b[0]} {names[b[1]]}", *(ratio(stats[a][c], stats[b][c]) for c in columns)]
                  for a, b in pairs]
    out += "\n\nRatios (below 1: the first loads faster):\n\n" + table(
        ["ratio", "load median", "load min", "CPU median"], ratio_rows)
    return out


def targets_section(results: dict) -> str:
    """Issue 13's ratios per point of the axes: median step (wall) and CPU per step."""
    rows = []
    for (size, threads), (train, _) in results.items():
        stats = {key: train_stats(runs) for key, runs in train.items()}
        cells = []
        for a, b in (("shirakit-shira", "shirakit-lora"), ("shirakit-shira", "frozen"), ("shirakit-shira-struct",
                     "shirakit-lora"), ("shirakit-shira-struct", "frozen"), ("shirakit-lora", "frozen")):
            ok = a in stats and b in stats
            cells.append(f"{ratio(stats[a]['wall'], stats[b]['wall'])} (CPU {ratio(stats[a]['cpu'], stats[b]['cpu'])})"
                         if ok else "n/a")
        load = statistics.mean(s["loadavg"] for s in stats.values()) if stats else float("nan")
        rows.append([size.replace("x", " x "), str(threads), *cells, f"{load:.1f}"])
    return table(["layers", "threads", "SHiRA / LoRA (target <= 0.95)", "SHiRA / frozen (target <= 1.08)",
                  "SHiRA struct / LoRA", "SHiRA struct / frozen", "LoRA / frozen", "load avg"], rows)


def report(args: argparse.Namespace, facts: dict[str, str], results: dict, command: str) -> str:
    a = args
    rounds = f" x {a.rounds} rounds (fresh processes, pooled)" if a.rounds > 1 else ""
    sizes = "; ".join(f"{s}: hidden {SIZES[s][0]}, intermediate {SIZES[s][1]}, {SIZES[s][2]} heads "
                      f"({SIZES[s][3]} key/value)" for s in a.sizes)
    parts = [
        "## Training step and adapter load (`benchmarks/train_step.py`)",
        "Written by the script (`--write-docs`); rerun it rather than editing this section by hand. "
        "What is measured and how: the script's docstring. The machine is shared and has few cores: single "
        "timings are noisy (see the load average columns), compare ratios, CPU time and the minima.",
        "\n".join([
            f"- Date: {facts['date']}",
            f"- Machine: {facts['machine']}",
            f"- Software: {facts['software']}",
            f"- Command: `{command}`",
            f"- Models: Llama (transformers `LlamaConfig`), {a.layers} layers, vocab {a.vocab}, fp32, random "
            f"weights; {sizes}. Adapters on {', '.join(TARGETS)}; r = {a.r}, LoRA alpha = {a.alpha:g}.",
        ]),
    ]
    if a.jobs > 1:
        parts.append(f"**{a.jobs} workers ran at once (`--jobs {a.jobs}`): the timings below are a smoke "
                     "test, not a measurement.**")
    if not a.skip_train:
        parts += ["### Targets (issue 13), per layer size and thread count",
                  "Median step time ratios, CPU-time ratios in brackets; every ratio from workers of the same run.",
                  targets_section(results)]
    for (size, threads), (train, load) in results.items():
        if train:
            parts += [
                f"### Train step, {size.replace('x', ' x ')}, {threads} thread(s)",
                f"Batch {a.batch} x {a.seq} tokens; step = zero_grad + forward with loss + backward + AdamW step "
                f"(the frozen base: forward + backward only); {a.steps} timed steps after {a.warmup} warm-up "
                f"steps{rounds}; every row in a fresh process. CPU/step: process CPU time (all threads). Peak "
                "RSS: VmHWM over the timed steps (reset through /proc/self/clear_refs before them); RSS before: "
                "VmRSS with model, adapter, optimizer and batch built, before the first step; overhead = peak - "
                "RSS before. Load avg: 1-minute load average after the timed steps.",
                train_section(train, a),
            ]
        if load:
            parts += [
                f"### Adapter load, {size.replace('x', ' x ')}, {threads} thread(s)",
                f"{a.load_repeats} timed loads per adapter{rounds} into a fresh copy of the base model, after "
                f"{a.load_warmup} untimed warm-up load(s) (the first is shown); the adapters alternate. "
                "shirakit: `shirakit.load_adapter`; peft: `peft.PeftModel.from_pretrained`. Each library loads "
                f"adapters it saved itself (PEFT file format, r = {a.r}: equal trainable size; shirakit SHiRA "
                "also in its compact layout); one process per library.",
                load_section(load),
            ]
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        return train_worker(args)
    if args.load_worker:
        return load_worker(args)
    command = command_line("benchmarks/train_step.py", argv)
    facts = machine_facts(f"torch threads per worker: {', '.join(map(str, args.threads))} (the threads axis), "
                          f"{args.jobs} worker(s) at a time")
    publish(report(args, facts, run_all(args), command), args.write_docs, BEGIN, END)


if __name__ == "__main__":
    main()
