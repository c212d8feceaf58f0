"""Which setting moves a mixed SHiRA batch's cost: 4 adapters / 1 under the settings two reports differed in.

    python benchmarks/mixed_settings.py [--threads 1 2] [--r 16 32] [--pairs 8]

Model: Llama-shaped, hidden 512, intermediate 1376, 2 layers, 8 heads of 64, vocab 1000, fp32,
random weights; SHiRA on all seven projections. Workload (issue 26's check): prefill of 16 rows x 64
tokens, ``logits_to_keep=1``, under ``torch.inference_mode()``; "1 adapter" = the 16 rows with
``a0`` active (written into the weight), "4 mixed" = row i on ``a{i % 4}`` via ``shirakit.route``.
Axes: torch threads; SHiRA r; whether the mixed batch runs on its own copy of the model (as
``benchmarks/mixed_batch.py`` does) or on the same model that just ran the single-adapter batch
with ``a0`` active (what a user alternating plain and routed calls gets: each routed call first
takes ``a0`` out of the weights, each plain call writes it back). Timing: wall clock
(``time.perf_counter``) and process CPU time, 1-adapter and mixed calls alternating (order flipped
each pair) after 2 warm-up pairs; medians and the median of per-pair ratios.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(r: int):
    import transformers

    import shirakit

    config = transformers.LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=8, vocab_size=1000,
                                      max_position_embeddings=512)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    for i in range(4):
        shirakit.inject(model, shirakit.ShiraConfig(r=r, target_modules=TARGETS, init_weights=False,
                                                    random_seed=i), f"a{i}")
    shirakit.set_adapter(model, "a0")
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--r", type=int, nargs="+", default=[16, 32])
    p.add_argument("--pairs", type=int, default=8)
    args = p.parse_args()
    import shirakit

    ids = torch.randint(1000, (16, 64), generator=torch.Generator().manual_seed(1))
    names = [f"a{i % 4}" for i in range(16)]
    print(f"load average at start {os.getloadavg()[0]:.2f}")
    print("| threads | r | mixed batch on | 1 adapter wall (ms) | 4 mixed wall (ms) "
          "| mixed / 1, wall (median of pairs) | mixed / 1, CPU time |")
    print("|---|---|---|---|---|---|---|")
    for r in args.r:
        model = build(r)
        twin = copy.deepcopy(model)
        for threads in args.threads:
            torch.set_num_threads(threads)
            for where, mixed_model in (("its own copy", twin), ("the same model", model)):
                def single(model=model):
                    return model(input_ids=ids, logits_to_keep=1)

                def mixed(mixed_model=mixed_model):
                    with shirakit.route(mixed_model, names):
                        return mixed_model(input_ids=ids, logits_to_keep=1)

                walls = {"single": [], "mixed": []}
                cpus = {"single": [], "mixed": []}
                with torch.inference_mode():
                    for i in range(args.pairs + 2):
                        order = ("single", "mixed") if i % 2 == 0 else ("mixed", "single")
                        for kind in order:
                            c0, w0 = time.process_time(), time.perf_counter()
                            (single if kind == "single" else mixed)()
                            w, c = time.perf_counter() - w0, time.process_time() - c0
                            if i >= 2:
                                walls[kind].append(w)
                                cpus[kind].append(c)
                wall_ratio = statistics.median(m / s for m, s in zip(walls["mixed"], walls["single"]))
                cpu_ratio = statistics.median(m / s for m, s in zip(cpus["mixed"], cpus["single"]))
                print(f"| {threads} | {r} | {where} | {statistics.median(walls['single']) * 1e3:.0f} | "
                      f"{statistics.median(walls['mixed']) * 1e3:.0f} | {wall_ratio:.2f} | {cpu_ratio:.2f} |",
                      flush=True)
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
