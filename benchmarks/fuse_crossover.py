"""When should the server fuse? A uniform batch decoded fused vs routed, and the switch it costs.

    python benchmarks/fuse_crossover.py            # SmolLM2-135M (packaged), ~3 min on 2 busy cores
    python benchmarks/fuse_crossover.py --quick    # tiny random Llama: a < 30 s smoke test
    python benchmarks/fuse_crossover.py --write-docs docs/benchmarks.md

The serving engine (src/shirakit/serve/engine.py) decodes a batch whose rows all want adapter A
either *fused* (``switch_adapter(model, A)``: A merged into the weights, the forward is the base
product) or *routed* (``shirakit.route(model, [A] * rows)``: nothing merged, A's delta added per
layer). Fusing costs a switch in and, when the batch turns mixed, a switch out; it saves
``routed step - fused step`` on every decode step in between. So fusing pays once the batch stays
uniform for at least

    crossover steps = (switch in + switch out) / (routed step - fused step)

decode steps. This script measures the three times per method and batch size, on a decode step over
a 64-token KV cache (the engine's own step: ``DynamicCache`` built from the batch's tensors), and
prints the crossover. The engine fuses a uniform batch when its horizon (the most tokens any row
may still generate) is at least its method's ``Adapter.fuse_min_steps``; docs/serving.md says how that default follows
from this table.

Adapters target all seven projections: SHiRA r=32, LoRA r=32, VeRA r=256, MiSS r=64 (balance),
randomized (``init_*=False``). fp32 on CPU, 1 torch thread (``--threads``), ``torch.inference_mode``.
Times are medians of ``--rounds`` rounds of process CPU time (the wall time on a shared machine
swings with other processes); the order of the fused and routed blocks alternates per round.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

import shirakit  # noqa: E402
from shirakit.serve.kv import cache_from, tensors_of  # noqa: E402

METHODS = {
    "shira r=32": lambda: shirakit.ShiraConfig(r=32, target_modules="all-linear", init_weights=False),
    "lora r=32": lambda: shirakit.LoraConfig(r=32, lora_alpha=64, target_modules="all-linear",
                                            init_lora_weights=False),
    "vera r=256": lambda: shirakit.VeraConfig(r=256, target_modules="all-linear", init_weights=False),
    "miss r=64": lambda: shirakit.MissConfig(r=64, target_modules="all-linear", init_weights=False),
}


def base_model(quick: bool):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if quick:
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)
        return LlamaForCausalLM(config).eval(), "tiny Llama (hidden 128, 2 layers), random weights"
    from shirakit.app.data import smollm2_dir

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32).eval()
    return model, "SmolLM2-135M-Instruct (packaged GGUF, dequantized to fp32)"


def cpu_ms(fn, repeat: int) -> float:
    start = time.process_time()
    for _ in range(repeat):
        fn()
    return (time.process_time() - start) / repeat * 1e3


def measure(model, method: str, rows: int, rounds: int, steps: int) -> dict:
    shirakit.inject(model, METHODS[method](), "a")  # outside inference mode: parameters, not inference tensors
    try:
        with torch.inference_mode():
            return _times(model, rows, rounds, steps)
    finally:
        shirakit.switch_adapter(model, None)
        shirakit.delete_adapter(model, "a")


def _times(model, rows: int, rounds: int, steps: int) -> dict:
    shirakit.switch_adapter(model, None)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, vocab, (rows, 64), generator=g)
    kv = tensors_of(model(prompt, use_cache=True).past_key_values)
    token = torch.randint(3, vocab, (rows, 1), generator=g)
    positions = torch.full((rows, 1), 64)

    def step():
        model(input_ids=token, position_ids=positions, past_key_values=cache_from(kv), use_cache=True,
              logits_to_keep=1)

    def routed():
        with shirakit.route(model, ["a"] * rows):
            step()

    def round_trip():
        shirakit.switch_adapter(model, "a")
        shirakit.switch_adapter(model, None)

    times = {"fused": [], "routed": [], "switch": []}
    for r in range(rounds):
        order = ["fused", "routed"] if r % 2 == 0 else ["routed", "fused"]
        for mode in order:
            shirakit.switch_adapter(model, "a" if mode == "fused" else None)
            fn = step if mode == "fused" else routed
            fn()  # warm
            times[mode].append(cpu_ms(fn, steps))
        shirakit.switch_adapter(model, None)
        times["switch"].append(cpu_ms(round_trip, 3))
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--write-docs", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.rows, args.rounds, args.steps = [1, 8], 2, 2
    model, described = base_model(args.quick)
    rows_out = []
    for method in args.methods:
        for rows in args.rows:
            t = measure(model, method, rows, args.rounds, args.steps)
            saving = t["routed"] - t["fused"]
            crossover = f"{t['switch'] / saving:.1f}" if saving > 0 else "never (routed is not slower)"
            rows_out.append([method, str(rows), f"{t['fused']:.1f}", f"{t['routed']:.1f}",
                             f"{t['routed'] / t['fused']:.2f}", f"{t['switch']:.1f}", crossover])
            print(" | ".join(rows_out[-1]), flush=True)
    header = ["method", "rows", "fused step ms", "routed step ms", "routed / fused", "switch in+out ms",
              "crossover steps"]
    body = (f"{described}; decode step over a 64-token KV cache; {args.threads} torch thread(s); "
            f"CPU-time medians of {args.rounds} rounds; {_report.cpu_model()}, {_report.cores()}; "
            f"{_report.software()}; {_report.today()}\n\n" + _report.table(header, rows_out))
    print()
    print(body)
    if args.write_docs:
        _report.replace_section(args.write_docs, "<!-- fuse_crossover:begin -->", "<!-- fuse_crossover:end -->",
                                "## Serving: when to fuse (benchmarks/fuse_crossover.py)\n\n"
                                "Command: `python benchmarks/fuse_crossover.py --write-docs docs/benchmarks.md`\n\n"
                                + body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
