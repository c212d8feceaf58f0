"""SHiRA's struct-mask value gradient in the training step: an A/B with every model in one process.

    python benchmarks/struct_step.py                    # both layer sizes, 1 and 2 threads (minutes)
    python benchmarks/struct_step.py --quick            # tiny model, few steps: a smoke test
    python benchmarks/struct_step.py --write-docs docs/benchmarks.md

Model and step as in ``benchmarks/train_step.py`` (whose ``build_model`` and ``add_adapter`` this
script uses): a Llama-shaped model with random weights, fp32, CPU, adapters on all seven
projections with r = 16, one step = zero_grad + forward with the LM loss + backward + AdamW step.

Unlike train_step.py (a fresh process per row), the rows here share one process per point of the
axes (layer size, threads) and take turns step by step, the order rotated every round, so drifting
load on a shared machine hits them alike:

- the frozen base (no adapter; only the input gradient flows back);
- LoRA;
- SHiRA with the random mask (its value gradient by the sampled kernel, ``cpu_sddmm``);
- SHiRA with the struct mask, value gradient by dense products (``methods/shira/struct_grad.py``);
- the same SHiRA struct model, value gradient by the sampled kernel (``SHIRAKIT_STRUCT_GRAD=0`` for
  that step): the A/B of the struct path alone, on the same model and memory;
- the SHiRA random-mask model with its value gradient on the calling thread only for that step (the
  A/B of spreading it over torch's threads; at 1 thread the same as the random-mask row);
- the SHiRA random-mask model with its value gradient replaced by zeros for that step. Not a
  training configuration: it is SHiRA's floor, the step with every cost but the value gradient
  (the scatter into the weight, the dense products, AdamW), so ``floor / LoRA`` is the lowest
  SHiRA / LoRA that any value-gradient kernel could reach on this machine.

Per row: the median and min step (wall clock) over ``--steps`` rounds after ``--warmup``. Ratios:
of the medians, and the median of the per-round ratios (paired steps: a round's steps are
seconds apart, so this is the least sensitive to drift).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import command_line, emit, machine_facts, publish, run_worker_process, table  # noqa: E402
from train_step import SIZES, add_adapter, build_model  # noqa: E402

BEGIN, END = "<!-- struct_step:begin -->", "<!-- struct_step:end -->"
ROWS = {  # row -> (method, mask, struct path on)
    "frozen": ("frozen", "random", True),
    "lora": ("lora", "random", True),
    "shira-random": ("shira", "random", True),
    "shira-struct": ("shira", "struct", True),
    "shira-struct-sampled": ("shira", "struct", False),
    "shira-floor": ("shira", "random", True),
    "shira-1thread": ("shira", "random", True),
}
SHARED = {"shira-struct-sampled": "shira-struct", "shira-floor": "shira-random",
          "shira-1thread": "shira-random"}  # row -> the model it reuses  # row -> the model it reuses
LABELS = {"frozen": "frozen base", "lora": "LoRA", "shira-random": "SHiRA random mask",
          "shira-struct": "SHiRA struct mask, dense products",
          "shira-struct-sampled": "SHiRA struct mask, sampled kernel",
          "shira-floor": "SHiRA random mask, value gradient skipped (floor)",
          "shira-1thread": "SHiRA random mask, value gradient on the calling thread only"}
PAIRS = [("shira-struct", "shira-struct-sampled"), ("shira-struct", "lora"), ("shira-struct", "frozen"),
         ("shira-random", "lora"), ("shira-random", "frozen"), ("lora", "frozen"),
         ("shira-floor", "lora"), ("shira-floor", "frozen"), ("shira-random", "shira-floor"),
         ("shira-1thread", "lora"), ("shira-random", "shira-1thread")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model (128 x 352), few steps")
    p.add_argument("--threads", type=int, nargs="+", default=None, help="default 1 2")
    p.add_argument("--sizes", nargs="+", choices=list(SIZES), default=None, help="default 1024x2816 576x1536")
    p.add_argument("--steps", type=int, default=None, help="timed rounds (default 9; --quick 3)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--vocab", type=int, default=None, help="default 8192 (--quick 512); issue 26's check: 1000")
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=None,
                   help="default all; e.g. frozen lora shira-random shira-floor (issue 26's targets)")
    p.add_argument("--write-docs", type=Path, default=None, metavar="FILE")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "size,threads": one point, here
    args = p.parse_args(argv)
    args.threads = args.threads or [1, 2]
    args.sizes = args.sizes or (["128x352"] if args.quick else ["1024x2816", "576x1536"])
    args.steps = args.steps or (3 if args.quick else 9)
    # the model settings train_step.py's helpers read (its "full" preset; --quick: smaller)
    vocab = args.vocab
    args.layers, args.vocab, args.batch, args.seq, args.r = (2, 512, 2, 64, 8) if args.quick else (2, 8192, 2, 256, 16)
    args.vocab = vocab or args.vocab
    args.rows = args.rows or list(ROWS)
    for row in list(args.rows):  # a row reusing another's model needs that model built
        if row in SHARED and SHARED[row] not in args.rows:
            args.rows.insert(0, SHARED[row])
    args.alpha, args.seed = 2.0 * args.r, 0
    return args


def worker(args: argparse.Namespace) -> None:
    size, threads = args.worker.split(",")
    args.hidden, args.intermediate, args.heads, args.kv_heads = SIZES[size]
    torch.set_num_threads(int(threads))
    gen = torch.Generator().manual_seed(args.seed)
    batch = torch.randint(args.vocab, (args.batch, args.seq), generator=gen)
    from shirakit.methods.shira import cpu_sddmm, sparse

    value_grad = sparse.value_grad
    per_thread = cpu_sddmm._MACS_PER_EXTRA_THREAD, cpu_sddmm._MACS_PER_EXTRA_OPENMP_THREAD

    def zero_value_grad(grad_out, x, pattern, structure=None):  # the floor row: every cost but this one
        return grad_out.new_zeros(pattern[0].numel(), dtype=torch.float32)

    models = {}
    for name, (method, mask, _) in ROWS.items():
        if name not in args.rows:
            continue
        if name in SHARED:
            models[name] = models[SHARED[name]]
            continue
        model = add_adapter(build_model(args), "shirakit", method, 0.0, args, mask).train()
        params = [p for p in model.parameters() if p.requires_grad]
        models[name] = (model, torch.optim.AdamW(params, lr=1e-4) if params else None)

    def step(name: str) -> float:
        model, optimizer = models[name]
        os.environ["SHIRAKIT_STRUCT_GRAD"] = "1" if ROWS[name][2] else "0"
        sparse.value_grad = zero_value_grad if name == "shira-floor" else value_grad
        one = name == "shira-1thread"  # every call below the threshold of a second thread
        thresholds = (2**62, 2**62) if one else per_thread
        cpu_sddmm._MACS_PER_EXTRA_THREAD, cpu_sddmm._MACS_PER_EXTRA_OPENMP_THREAD = thresholds
        start = time.perf_counter()
        if optimizer:
            optimizer.zero_grad(set_to_none=True)
        model(input_ids=batch, labels=batch).loss.backward()
        if optimizer:
            optimizer.step()
        return time.perf_counter() - start

    names = [n for n in ROWS if n in args.rows]
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(args.warmup + args.steps):
        gc.collect()
        order = names[i % len(names):] + names[: i % len(names)]
        took = {name: step(name) for name in order}
        if i >= args.warmup:
            for name in names:
                times[name].append(took[name])
    emit({"times": times, "loadavg": os.getloadavg()[0]})


def point_section(size: str, threads: int, result: dict) -> str:
    times = result["times"]
    rows = [[LABELS[n], f"{statistics.median(t) * 1e3:,.0f}", f"{min(t) * 1e3:,.0f}"] for n, t in times.items()]
    ratios = []
    for a, b in PAIRS:
        if a not in times or b not in times:
            continue
        paired = statistics.median(x / y for x, y in zip(times[a], times[b]))
        ratios.append([f"{LABELS[a]} / {LABELS[b]}", f"{statistics.median(times[a]) / statistics.median(times[b]):.3f}",
                       f"{paired:.3f}", f"{min(times[a]) / min(times[b]):.3f}"])
    return "\n\n".join([
        f"#### {size.replace('x', ' x ')}, {threads} thread(s) (load average after: {result['loadavg']:.1f})",
        table(["row", "step median (ms)", "step min (ms)"], rows),
        table(["ratio", "of medians", "median of per-round ratios", "of minima"], ratios),
    ])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    facts = machine_facts(f"one process per (size, threads), rows interleaved step by step; "
                          f"threads: {', '.join(map(str, args.threads))}")
    sections = []
    for size in args.sizes:
        for threads in args.threads:
            print(f"  {size}, {threads} thread(s); load {os.getloadavg()[0]:.1f} ...", file=sys.stderr, flush=True)
            flags = ["--worker", f"{size},{threads}", "--steps", str(args.steps), "--warmup", str(args.warmup),
                     "--vocab", str(args.vocab), "--rows", *args.rows]
            result = run_worker_process(__file__, flags + (["--quick"] if args.quick else []),
                                        {"TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"})
            sections.append(point_section(size, threads, result))
    head = [
        "## SHiRA struct mask in the training step (`benchmarks/struct_step.py`)",
        "Written by the script (`--write-docs`). Every row of a point in one process, taking turns step "
        "by step; what is measured: the script's docstring.",
        "\n".join([f"- Date: {facts['date']}", f"- Machine: {facts['machine']}", f"- Software: {facts['software']}",
                   f"- Command: `{command_line('benchmarks/struct_step.py', argv)}`",
                   f"- Llama, {args.layers} layers, vocab {args.vocab}, batch {args.batch} x {args.seq} tokens, "
                   f"r = {args.r}, fp32; {args.steps} timed rounds after {args.warmup} warm-up rounds."]),
    ]
    publish("\n\n".join(head + sections), args.write_docs, BEGIN, END)


if __name__ == "__main__":
    main()
