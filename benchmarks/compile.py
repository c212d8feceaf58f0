"""torch.compile (inductor, CPU) vs eager: forward and train step per method, and swap time.

    python benchmarks/compile.py                 # 3 x Linear 1024x1024 + ReLU, 512 tokens, 7 reps
    python benchmarks/compile.py --quick         # 256-wide layers, 3 reps: a smoke test
    python benchmarks/compile.py --write-docs docs/benchmarks.md

One model per method (fp32, random base weights, every layer adapted, adapters randomized).
Rows, each the median of ``--reps`` rounds (one warm-up round first), eager and compiled side by
side in the same round so load drift hits both:
- forward: ``model(x)`` under ``torch.no_grad()``; compiled = ``torch.compile(model)`` (inductor).
  "prepared" adds :func:`shirakit.prepare_for_hotswap` (the slot path: padded unit-scale copies).
- train step: forward, MSE loss, backward, AdamW step; compiled = the same on the compiled model.
- swap: two adapters A, B of the method on one model (wider layers: ``--swap-hidden``, one token),
  under ``torch.no_grad()``. Eager anchor: ``switch_adapter`` (SHiRA: the two-scatter fused switch)
  on an uncompiled model. Under compile (prepared model, inductor): ``switch_adapter`` (fused) and
  ``set_adapter`` (unmerged: slots refreshed / SHiRA values written in), each timed as the swap
  plus what the compiled call after it spends more than a second call without a swap (the eager
  bookkeeping at the model's entry). Dynamo's frame counter is read before and after the swap
  rounds: the table states how many recompiles they caused.
Compile time (first call) is reported once per model, not in the medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import shirakit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import cores, cpu_model, replace_section, software, table, today  # noqa: E402

BEGIN, END = "<!-- compile:begin -->", "<!-- compile:end -->"
# A swap is ~1 ms: many rounds, and the minimum beside the median (on a shared machine a round
# that loses the CPU costs a scheduler slice, tens of ms, whatever it measured).
SWAP_ROUNDS = 41
PRESETS = {"full": dict(hidden=1024, tokens=512, reps=7),
           "quick": dict(hidden=256, tokens=64, reps=3, swap_hidden=512, swap_rounds=5)}


class Stack(nn.Module):
    def __init__(self, hidden: int, layers: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def configs(r: int) -> dict[str, callable]:
    return {
        "lora": lambda i: shirakit.LoraConfig(r=r, target_modules=["0", "1", "2"], init_lora_weights=False),
        "vera": lambda i: shirakit.VeraConfig(r=8 * r, target_modules=["0", "1", "2"], init_weights=False,
                                              projection_prng_key=i),
        "shira": lambda i: shirakit.ShiraConfig(r=r, target_modules=["0", "1", "2"], init_weights=False,
                                                random_seed=i),
        "miss": lambda i: shirakit.MissConfig(r=r, target_modules=["0", "1", "2"], init_random=True),
        "miss-bat": lambda i: shirakit.MissConfig(r=r, init_weights="bat", target_modules=["0", "1", "2"],
                                                  init_random=True),
    }


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def model_for(method: str, hidden: int, r: int, names=("a",)) -> nn.Module:
    torch.manual_seed(0)
    model = Stack(hidden)
    for i, name in enumerate(names):
        shirakit.inject(model, configs(r)[method](i + 1), name)
    return model


def bench_forward(method, args) -> list[str]:
    x = torch.randn(args.tokens, args.hidden)
    eager = model_for(method, args.hidden, args.r).eval()
    plain = torch.compile(model_for(method, args.hidden, args.r).eval())
    prep_model = model_for(method, args.hidden, args.r).eval()
    shirakit.prepare_for_hotswap(prep_model)
    prepared = torch.compile(prep_model)
    with torch.no_grad():
        first = [timed(lambda m=m: m(x)) for m in (plain, prepared)]
        for m in (plain, prepared):
            torch.testing.assert_close(m(x), eager(x), atol=1e-4, rtol=1e-4)
        rounds = [[timed(lambda m=m: m(x)) for m in (eager, plain, prepared)] for _ in range(args.reps + 1)][1:]
    e, c, p = (statistics.median(col) for col in zip(*rounds))
    return [method, f"{e:.2f}", f"{c:.2f}", f"{c / e:.2f}x", f"{p:.2f}", f"{p / e:.2f}x",
            f"{first[0] / 1e3:.1f}"]


def bench_train(method, args) -> list[str]:
    x = torch.randn(args.tokens, args.hidden)
    target = torch.randn(args.tokens, args.hidden)
    models = [model_for(method, args.hidden, args.r).train() for _ in range(2)]
    runs = [models[0], torch.compile(models[1])]
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3) for m in models]

    def step(i):
        loss = (runs[i](x) - target).pow(2).mean()
        loss.backward()
        opts[i].step()
        opts[i].zero_grad()

    first = timed(lambda: step(1))
    step(0)
    rounds = [[timed(lambda i=i: step(i)) for i in (0, 1)] for _ in range(args.reps + 1)][1:]
    e, c = (statistics.median(col) for col in zip(*rounds))
    return [method, f"{e:.2f}", f"{c:.2f}", f"{c / e:.2f}x", f"{first / 1e3:.1f}"]


def bench_swap(method, args) -> list[str]:
    """Swap A <-> B; see the module doc. Each round times a swap, the compiled call after it and a
    second compiled call (no swap): what a swap costs under compile is the swap itself plus what the
    call after it spends more than a call without one (the eager bookkeeping at the model's entry
    writing the swap through: SHiRA's scatters for set_adapter, slot copies for the others)."""
    x = torch.randn(1, args.swap_hidden)  # one token: the calls stay cheap beside the swaps
    eager = model_for(method, args.swap_hidden, args.r, ("A", "B")).eval()
    model = model_for(method, args.swap_hidden, args.r, ("A", "B")).eval()
    shirakit.prepare_for_hotswap(model)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter)
    names = ["A", "B"]

    def rounds(swap) -> list[float]:
        costs = []
        for i in range(args.swap_rounds + 2):
            t_swap = timed(lambda n=names[i % 2]: swap(model, n))
            t_after = timed(lambda: compiled(x))
            t_plain = timed(lambda: compiled(x))
            costs.append(t_swap + t_after - t_plain)
        return costs[2:]

    with torch.no_grad():
        for name in names:  # warm-up: every state seen, compiled once
            for swap in (shirakit.switch_adapter, shirakit.set_adapter):
                swap(model, name)
                compiled(x)
        shirakit.switch_adapter(model, None)
        frames = counter.frame_count
        shirakit.switch_adapter(eager, "A")
        anchor = [timed(lambda n=names[i % 2]: shirakit.switch_adapter(eager, n))
                  for i in range(args.swap_rounds + 2)][2:]
        fused = rounds(shirakit.switch_adapter)
        shirakit.switch_adapter(model, None)
        unmerged = rounds(shirakit.set_adapter)
        recompiles = counter.frame_count - frames
    # compiled costs are differences of timings: their minimum means nothing (it can be negative)
    e, c, u = (statistics.median(col) for col in (anchor, fused, unmerged))
    return [method, f"{e:.3f} ({min(anchor):.3f})", f"{c:.3f}", f"{c / e:.2f}x", f"{u:.3f}", f"{u / e:.2f}x",
            str(recompiles)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--methods", nargs="+", default=list(configs(1)))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--swap-hidden", type=int, default=4096, help="layer width of the swap rows")
    p.add_argument("--swap-rounds", type=int, default=SWAP_ROUNDS)
    p.add_argument("--write-docs", type=Path, default=None, metavar="FILE")
    args = p.parse_args()
    for key, value in PRESETS["quick" if args.quick else "full"].items():
        setattr(args, key, value)
    torch.set_num_threads(args.threads)
    torch._dynamo.config.cache_size_limit = 64  # a benchmark, not a recompile test: never fall back
    load_before = os.getloadavg()[0]
    swap = [bench_swap(m, args) for m in args.methods]
    fwd = [bench_forward(m, args) for m in args.methods]
    train = [bench_train(m, args) for m in args.methods]
    shape = f"3 x Linear({args.hidden}, {args.hidden}) + ReLU, {args.tokens} tokens, r={args.r} (VeRA {8 * args.r})"
    out = "\n\n".join([
        f"Setup: {shape}, fp32, {args.threads} thread(s), median of {args.reps} rounds. Load average "
        f"{load_before:.1f} before the run, {os.getloadavg()[0]:.1f} after it (2 cores; this run is 1 busy thread).",
        "Forward under torch.no_grad() (ms)\n\n" + table(
            ["method", "eager", "compiled", "compiled/eager", "compiled, prepared", "prepared/eager",
             "first call s"], fwd),
        "Train step: forward + MSE + backward + AdamW (ms)\n\n" + table(
            ["method", "eager", "compiled", "compiled/eager", "first call s"], train),
        f"Swap A <-> B, 3 x Linear({args.swap_hidden}, {args.swap_hidden}), r={args.r}, under torch.no_grad() "
        f"(ms, median of {args.swap_rounds} swaps; eager: (minimum)). Eager: `switch_adapter` on an uncompiled model "
        "(SHiRA: the two-scatter switch). Compiled (inductor, prepared model): the swap plus what the next "
        "compiled call spends more than a call without a swap (the eager bookkeeping at the model's entry)"
        "\n\n" + table(
            ["method", "eager switch_adapter", "compiled switch_adapter", "ratio", "compiled set_adapter",
             "ratio", "recompiles in swap rounds"], swap),
    ])
    print(out)
    if args.write_docs:
        section = "\n\n".join([
            "## torch.compile (benchmarks/compile.py)",
            f"Run `{' '.join(['python', 'benchmarks/compile.py'] + sys.argv[1:])}` on {today()}: "
            f"{cpu_model()}, {cores()}; {software()}. Compare ratios within a table, not absolute times "
            "across runs (see the load average). Written by the script "
            "(`--write-docs`).",
            out,
        ])
        replace_section(args.write_docs, BEGIN, END, section)


if __name__ == "__main__":
    main()
