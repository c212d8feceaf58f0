"""Fused switching on a model of many small layers: a diffusion UNet (SHiRA batched vs per layer).

    python benchmarks/switch_many.py                    # SD-1.5 UNet shapes (random weights), 1 and 2 threads
    python benchmarks/switch_many.py --quick            # a small UNet config: a smoke test (< 1 min)
    python benchmarks/switch_many.py --targets attn     # attention projections only (the issue's first profile)

The model is diffusers' ``UNet2DConditionModel`` built from the SD-1.5 config (random fp32 weights;
the shapes are what matter for switching), SHiRA r = ``--r`` on the ``--targets`` layers (``all``:
attention projections, feed-forwards, resnet convs, time projections, proj_in / proj_out; about
250 layers; ``attn``: to_q / to_k / to_v / to_out.0, 128 layers), two adapters (seeds 1 and 2).

Rows, each the median over ``--reps`` rounds of one switch A -> B (alternating), warm (both adapters
seen before on this base), timed with ``time.perf_counter`` around the call:
- batched: ``shirakit.switch_adapter(model, B)`` (every plain layer in one C scatter per direction);
- per layer: the same switch done the way ``switch_adapter`` did before batching, each layer's
  ``AdapterLinear.switch`` (two ``index_copy_`` / numpy scatters and the layer's bookkeeping each).
The comparison with diffusers' own LoRA fuse / unfuse is ``benchmarks/diffusion_switch.py``'s.
Rounds alternate the rows, so load drift hits all alike. After every batched switch the weights
are checked: bit-identical to the base outside the adapter's positions and base + value on them;
after ``switch_adapter(model, None)`` every weight is bit-identical to the base.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

TARGETS = {
    "attn": ["to_q", "to_k", "to_v", "to_out.0"],
    "all": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
            "conv_shortcut", "time_emb_proj"],
}
SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SMALL = dict(SD15, block_out_channels=(32, 64, 64, 64), cross_attention_dim=32, attention_head_dim=4,
             norm_num_groups=8, sample_size=16)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small UNet config, few rounds (smoke test)")
    p.add_argument("--targets", choices=sorted(TARGETS), default="all")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--reps", type=int, default=15)
    args = p.parse_args(argv)
    if args.quick:
        args.reps = min(args.reps, 5)
    return args


def build_unet(config: dict):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(**config).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def per_layer_switch(model, name):
    """switch_adapter as it was before batching: each layer switches itself."""
    from shirakit.core.state import adapter_layers, hosts, state_of

    names = [] if name is None else [name]
    for _, layer in adapter_layers(model):
        layer.switch(names)
    for _, host in hosts(model):
        host.set_active(names)
    state_of(model).active = names


def main(argv=None) -> None:
    args = parse_args(argv)
    import shirakit
    from shirakit.core.state import adapter_layers

    model = build_unet(SMALL if args.quick else SD15)
    targets = TARGETS[args.targets]
    for seed, name in ((1, "a"), (2, "b")):
        shirakit.inject(model, shirakit.ShiraConfig(r=args.r, target_modules=targets, random_seed=seed,
                                                    init_weights=False), name)
    layers = [layer for _, layer in adapter_layers(model)]
    base = [layer.weight.detach().clone() for layer in layers]
    n_conv = sum(layer.geometry.kind == "conv" for layer in layers)
    values = sum(layer.adapters["a"].shira_weight.numel() for layer in layers)
    weights = sum(layer.weight.numel() for layer in layers)

    def check(name):
        for layer, b in zip(layers, base):
            w = layer.weight.detach().reshape(-1)
            if name is None:
                assert torch.equal(w, b.reshape(-1)), "base not restored bit-exactly"
                continue
            adapter = layer.adapters[name]
            idx = adapter.storage_index()
            expected = b.reshape(-1).clone()
            expected[idx] = (b.reshape(-1)[idx].float() + adapter.shira_weight.detach().float()).to(w.dtype)
            assert torch.equal(w, expected), "wrong merged weight"

    rows = {"batched": lambda n: shirakit.switch_adapter(model, n), "per layer": lambda n: per_layer_switch(model, n)}
    print(f"UNet2DConditionModel {'small config' if args.quick else 'SD-1.5 config'}: {len(layers)} adapted layers "
          f"({n_conv} convs), {weights / 1e6:.0f} M weights under them, SHiRA r = {args.r}, "
          f"{values / 1e6:.2f} M values per adapter; targets {targets}", flush=True)
    print(f"load average at start: {os.getloadavg()[0]:.2f}", flush=True)
    results = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        times = {k: [] for k in rows}
        for fn in rows.values():  # warm: both adapters seen on this base by both paths
            for n in ("a", "b", "a"):
                fn(n)
        current = "a"
        for rep in range(args.reps):
            for key, fn in rows.items():
                new = "b" if current == "a" else "a"
                t0 = time.perf_counter()
                fn(new)
                times[key].append(time.perf_counter() - t0)
                current = new
                if key == "batched" and rep < 3:
                    check(new)
        shirakit.switch_adapter(model, None)
        check(None)
        shirakit.switch_adapter(model, current)
        results[threads] = {k: statistics.median(v) for k, v in times.items()}
        print(f"  {threads} thread(s): " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in results[threads].items()),
              file=sys.stderr, flush=True)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    print()
    print("| threads | batched switch (ms) | per-layer switch (ms) | per layer / batched |")
    print("|---|---|---|---|")
    for threads, r in results.items():
        print(f"| {threads} | {r['batched'] * 1e3:.2f} | {r['per layer'] * 1e3:.2f} | "
              f"{r['per layer'] / r['batched']:.1f}x |")


if __name__ == "__main__":
    main()
