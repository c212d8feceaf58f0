"""Where a serving step's time goes: the engine alone (no HTTP), one base model, one batch mix at a time.

    python benchmarks/serve_engine_steps.py [--rounds 3] [--rows 16] [--tokens 64] [--threads 1] \
        [--mixes "SHiRA 1"] [--profile "SHiRA 1"]

SmolLM2-135M (fp32, ``--threads`` torch threads, default 1), adapters on q_proj and v_proj with equal trainable values
(SHiRA r=8 and LoRA r=8: 460,800 each). Rows: ``--rows`` greedy requests of ``--tokens`` tokens,
submitted together to one ``Engine``; throughput = generated tokens / wall second. Mixes, run
interleaved round by round (each round runs every mix once, so a load change hits all alike):

- base, bare: an engine with no adapter registered (the model's own forward);
- base, F.linear: the same without the engine's few-row linears (``skinny_linears=False``,
  serve/skinny_linear.py): the gain of ``W x^T`` over ``F.linear`` in the same run;
- base, SHiRA loaded: base requests while the SHiRA adapters sit in the model;
- SHiRA 1 / LoRA 1: every request on adapter 0 (fused);
- SHiRA 4 / LoRA 4: requests spread over 4 adapters (routed).

The table gives the median round per mix and its ratios to "base, bare" and to "base, SHiRA loaded"
(the server's own base: the same engine, adapters held) of the same round (medians of the per-round ratios).
``--mixes`` runs only some mixes (and the two anchors), so more rounds fit in the same time; the order flips
every round. ``--profile MIX`` prints cProfile's top functions of one run on the engine's thread.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import queue
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

MIXES = ["base, bare", "base, F.linear", "base, SHiRA loaded", "SHiRA 1", "LoRA 1", "SHiRA 4", "LoRA 4"]


def make_adapters(model_dir: Path, out: Path) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM

    import shirakit

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    folders = {}
    for method in ("shira", "lora"):
        for i in range(4):
            name = f"{method}-{i}"
            torch.manual_seed(i)
            if method == "shira":
                config = shirakit.ShiraConfig(r=8, target_modules=["q_proj", "v_proj"], init_weights=False,
                                              random_seed=i)
            else:
                config = shirakit.LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
            shirakit.inject(model, config, name)
            shirakit.save_adapter(model, out / name, name)
            shirakit.delete_adapter(model, name)
            folders[name] = out / name
    return folders


def run(engine, names: list[str], rows: int, tokens: int) -> float:
    from shirakit.serve import SamplingParams

    done: queue.SimpleQueue = queue.SimpleQueue()
    params = SamplingParams(max_tokens=tokens, temperature=0.0)
    ids = engine.tokenizer("Once upon a time in a small village by the sea,").input_ids
    start = time.perf_counter()
    count = 0
    for i in range(rows):
        engine.submit(names[i % len(names)], ids, params, 1,
                      lambda e: done.put(e) if isinstance(e, Exception) or e.finish_reason else None)
    for _ in range(rows):
        event = done.get(timeout=600)
        if isinstance(event, Exception):
            raise event
        count += event.completion_tokens
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3, help="0: only --profile")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--profile", default=None, choices=[None, *MIXES])
    parser.add_argument("--mixes", nargs="+", default=MIXES, choices=MIXES,
                        help="run only these (the two anchors always run): more rounds in the same time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shirakit.data import smollm2_dir
    from shirakit.serve import Engine

    model_dir = smollm2_dir()
    folders = make_adapters(model_dir, Path(tempfile.mkdtemp()))

    def engine(adapters, skinny=True):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        return Engine(model, AutoTokenizer.from_pretrained(model_dir), "base", adapters, max_loaded=8,
                      skinny_linears=skinny).start()

    bare = engine({})
    plain = engine({}, skinny=False)
    full = engine(folders)
    for name in folders:  # load every adapter once: the rounds measure steps, not loads
        run(full, [name], 1, 2)
    setups = {"base, bare": (bare, ["base"]), "base, F.linear": (plain, ["base"]),
              "base, SHiRA loaded": (full, ["base"]),
              "SHiRA 1": (full, ["shira-0"]), "LoRA 1": (full, ["lora-0"]),
              "SHiRA 4": (full, [f"shira-{i}" for i in range(4)]), "LoRA 4": (full, [f"lora-{i}" for i in range(4)])}
    if args.profile:
        eng, names = setups[args.profile]
        run(eng, names, args.rows, args.tokens)
        profile = cProfile.Profile()
        eng.call(profile.enable).result()  # on the engine's thread: cProfile sees only the thread that enabled it
        run(eng, names, args.rows, args.tokens)
        eng.call(profile.disable).result()
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
    if args.rounds < 1:  # --profile alone
        for eng in (bare, plain, full):
            eng.stop()
        return
    mixes = [mix for mix in MIXES if mix in {"base, bare", "base, SHiRA loaded", *args.mixes}]
    results = {mix: [] for mix in mixes}
    for i in range(args.rounds):
        for mix in mixes if i % 2 == 0 else mixes[::-1]:  # the order flips each round (drift)
            eng, names = setups[mix]
            results[mix].append(run(eng, names, args.rows, args.tokens))
    print(f"\nload average {os.getloadavg()}, {args.rounds} rounds, {args.rows} rows x {args.tokens} greedy tokens, "
          f"{args.threads} thread(s), SmolLM2-135M fp32")
    print("| mix | tok/s (median) | / base, bare | / base, same engine | runs |")
    print("|---|---|---|---|---|")
    for mix in mixes:
        ratios = [r / b for r, b in zip(results[mix], results["base, bare"])]
        # the server's own base: base requests to the engine that holds the adapters (issue 24's anchor)
        own = [r / b for r, b in zip(results[mix], results["base, SHiRA loaded"])]
        print(f"| {mix} | {statistics.median(results[mix]):.1f} | {statistics.median(ratios):.3f} | "
              f"{statistics.median(own):.3f} | {', '.join(f'{r:.0f}' for r in results[mix])} |")
    print("switches:", full.snapshot()["switches"], "fused steps:", full.snapshot()["fused_steps"],
          "routed steps:", full.snapshot()["routed_steps"])
    for eng in (bare, plain, full):
        eng.stop()


if __name__ == "__main__":
    sys.exit(main())
