"""What shirakit's layer wrappers cost in a whole decode step (issue 24's "SHiRA 1 / base >= 0.98").

    python benchmarks/wrapper_overhead.py [--threads 2] [--rows 16] [--repeats 15]

SmolLM2-135M (fp32), one decode token for each of ``--rows`` rows over a 64-token cache,
``logits_to_keep=1``. Two models side by side in one process, steps interleaved round by round:
a bare one, and one with 4 SHiRA adapters (r=8) on q_proj and v_proj. Rows, each the median step
and its ratio to the bare model's median:

- bare: the model as loaded;
- loaded, base: the adapters injected, none active (every wrapped layer takes the fast path of
  ``AdapterLinear._eager_forward``, then the base product);
- SHiRA fused: adapter 0 switched in (the same path; its values are in the weight);
- loaded, direct call: ``_eager_forward`` replaced by a plain ``base_layer(x)`` call (the A/B of the
  wrapper's bookkeeping: locks, version checks, the route lookup);
- wrappers removed: the parents call the base layers themselves.

Each row's timed step follows an untimed one: the first forward after a switch (or any change of the
model) takes every wrapped layer's slow path once (its sync, ~170 us per layer here: ~10 ms a step).
A first version timed that step and read loaded / bare 1.04-1.07; steady state (2026-12-04, 2 threads,
16 rows, 15 rounds): loaded, base 1.005, SHiRA fused 1.036, direct call 1.019, wrappers removed 1.014 (the
spread of this machine is ~2%): the wrappers' fast path costs nothing measurable at the model level.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

ROWS = ["bare", "loaded, base", "SHiRA fused", "loaded, direct call", "wrappers removed"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    import shirakit
    from shirakit.core.layer import AdapterLinear
    from shirakit.data import smollm2_dir

    def load():
        return AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32).eval()

    bare, loaded = load(), load()
    for i in range(4):
        config = shirakit.ShiraConfig(r=8, target_modules=["q_proj", "v_proj"], init_weights=False, random_seed=i)
        shirakit.inject(loaded, config, f"shira-{i}")
    shirakit.switch_adapter(loaded, None)
    wrapped = [(attn, name, getattr(attn, name)) for attn in (layer.self_attn for layer in loaded.model.layers)
               for name in ("q_proj", "v_proj")]
    eager = AdapterLinear._eager_forward

    def direct(self, x, *rest, **kwargs):
        return self.__dict__["_modules"]["base_layer"](x, *rest, **kwargs)

    def step(model, cache, token):
        start = time.perf_counter()
        model(token, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache.crop(-1)  # back to the 64-token cache
        return time.perf_counter() - start

    ids = torch.randint(0, bare.config.vocab_size, (args.rows, 64))
    token = torch.randint(0, bare.config.vocab_size, (args.rows, 1))
    times = {row: [] for row in ROWS}
    with torch.inference_mode():
        caches = {row: (bare if row == "bare" else loaded)(ids, use_cache=True).past_key_values for row in ROWS}
        for _ in range(args.repeats + 1):  # the first round warms up
            for row in ROWS:
                model = bare if row == "bare" else loaded
                if row == "SHiRA fused":
                    shirakit.switch_adapter(loaded, "shira-0")
                if row == "loaded, direct call":
                    AdapterLinear._eager_forward = direct
                if row == "wrappers removed":
                    for attn, name, layer in wrapped:
                        setattr(attn, name, layer.base_layer)
                try:
                    step(model, caches[row], token)  # after a switch every wrapped layer syncs once: not timed
                    times[row].append(step(model, caches[row], token))
                finally:
                    AdapterLinear._eager_forward = eager
                    for attn, name, layer in wrapped:
                        setattr(attn, name, layer)
                    shirakit.switch_adapter(loaded, None)
    bare_median = statistics.median(times["bare"][1:])
    print(f"SmolLM2-135M fp32, {args.rows} rows, one decode step, {args.threads} thread(s), "
          f"{args.repeats} rounds, load average {os.getloadavg()[0]:.2f}")
    print("| model | step ms (median) | / bare |")
    print("|---|---|---|")
    for row in ROWS:
        median = statistics.median(times[row][1:])
        print(f"| {row} | {median * 1e3:.1f} | {median / bare_median:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
