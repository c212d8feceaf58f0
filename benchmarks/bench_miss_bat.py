"""MiSS "bat" on one linear layer: the forms an exact forward can take, timed side by side.

    python benchmarks/bench_miss_bat.py [--out 1024 --in 1024 --tokens 512 --r 64 --threads 2]

bat's delta depends on the weight, delta_W_bc = W_bc M_b + M_b (r x r blocks), so some W-sized
work is unavoidable. Rows (all exact; checked against each other before timing):

- ``base layer alone``  the frozen layer without adapter, for scale (its backward is the input
  gradient, one product; the other rows' backward is the block gradient).
- ``shirakit``  what shirakit does: while the adapter is active the weight holds W0 + delta (W0
  kept aside, put back bit-exactly), so a forward is the base layer's own product; the block's
  gradient comes from a tap (G = g^T x, then two small batched products). The delta is re-written
  only when the block changes; the fwd+bwd column re-writes it on every step (as after each
  optimizer step), so it includes that cost.
- ``delta``     base_layer(x) + x delta_W^T, delta_W built per call from a view of W (no clone):
  shirakit's form where the weight cannot carry the delta (small groups of a mixed batch).
- ``clone``     F.linear(x, W.clone() + delta_W): PEFT's idea, written out.
- ``peft``      PEFT's MissLinear (clone W, add the delta, one product), when peft is installed.
- ``shards``    no dense delta at all: z = M_b x_c for every (b, c), then W_b z (two token x out
  x in products and a token x out x in / r temporary).

Rounds run the rows in turn (so drifting machine load hits all alike); the table gives the median
and the minimum over rounds, in ms, of a forward under no_grad and of forward + backward (block
gradient). On a shared machine the minimum is the steadier number.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from shirakit.core.adapter import LayerGeometry
from shirakit.core.layer import AdapterLinear
from shirakit.methods.miss import MissAdapter, MissConfig, bat_delta


def shards_form(x, w, block):
    """base + sum_c W_bc (M_b x_c) + M_b sum_c x_c, without forming delta_W."""
    nb, r = block.shape[0], block.shape[-1]
    xs = x.reshape(x.shape[0], w.shape[1] // r, r)  # [t, c, j]
    z = torch.einsum("tcj,bkj->tbck", xs, block)  # M_b x_c
    y1 = torch.einsum("bick,tbck->tbi", w.view(nb, r, w.shape[1] // r, r), z)
    y2 = torch.einsum("tj,bij->tbi", xs.sum(1), block)
    return F.linear(x, w) + (y1 + y2).reshape(x.shape[0], -1)


def build(args):
    torch.manual_seed(0)
    base = nn.Linear(args.in_, args.out).requires_grad_(False)
    config = MissConfig(r=args.r, init_weights="bat", init_random=True)
    adapter = MissAdapter.build(LayerGeometry(args.in_, args.out), config, base, torch.Generator().manual_seed(1))
    layer = AdapterLinear(base)
    layer.add_adapter("default", adapter)
    layer.set_active(["default"])
    return layer, adapter


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=int, default=1024)
    p.add_argument("--in", dest="in_", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--skip-shards", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    layer, adapter = build(args)
    base, block = layer.base_layer, adapter.miss_block
    x = torch.randn(args.tokens, args.in_)
    xg = x.clone().requires_grad_(True)
    w = base.weight  # the clean W0 whenever layer is not mid-forward (rows below withdraw it)

    def clean(fn):
        def run():
            layer.withdraw_live()  # the other rows need the clean base weight
            return fn()
        return run

    def live():
        with torch.no_grad():
            block.mul_(1.0)  # a new block version, as after an optimizer step: the delta is re-written
        return layer(x)

    rows = {
        "base layer alone": (lambda: base(xg),) * 2 + (xg,),  # fwd + bwd: the input gradient, one product
        "shirakit": (lambda: layer(x), live, block),
        "delta": (clean(lambda: base(x) + adapter(x, w)),) * 2 + (block,),
        "clone": (clean(lambda: F.linear(x, w.clone() + bat_delta(w, block), base.bias)),) * 2 + (block,),
    }
    if not args.skip_shards:
        rows["shards"] = (clean(lambda: shards_form(x, w, block) + base.bias),) * 2 + (block,)
    try:
        import peft
        from peft.tuners.miss.layer import MissLinear

        their_base = nn.Linear(args.in_, args.out).requires_grad_(False)
        their_base.load_state_dict(base.state_dict())
        theirs = MissLinear(their_base, "default", peft.MissConfig(r=args.r, init_weights="bat"), r=args.r)
        with torch.no_grad():
            theirs.miss_block["default"].copy_(block)
        rows["peft"] = (lambda: theirs(x),) * 2 + (theirs.miss_block["default"],)
    except ImportError:
        pass

    with torch.no_grad():
        reference = clean(lambda: base(x) + adapter(x, w))()
        for name, (fwd, _, _) in list(rows.items())[1:]:
            torch.testing.assert_close(fwd(), reference, atol=1e-3, rtol=1e-4, msg=name)

    def fwd_bwd(fn, param):
        param.grad = None
        fn().sum().backward()

    times = {name: ([], []) for name in rows}
    for _ in range(args.rounds + 2):  # two warm-up rounds
        for name, (fwd, step, param) in rows.items():
            with torch.no_grad():
                layer.sync_live() if name == "shirakit" else layer.withdraw_live()  # untimed: the row's state
            t0 = time.perf_counter()
            with torch.no_grad():
                fwd()
            t1 = time.perf_counter()
            fwd_bwd(step, param)
            t2 = time.perf_counter()
            times[name][0].append((t1 - t0) * 1e3)
            times[name][1].append((t2 - t1) * 1e3)

    print(f"MiSS bat, one {args.out}x{args.in_} layer, {args.tokens} tokens, r={args.r}, fp32, CPU, "
          f"{args.threads} threads; {args.rounds} rounds, ms")
    print("| form | forward (no_grad) median / min | forward + backward median / min |")
    print("|---|---:|---:|")
    for name, (f, fb) in times.items():
        f, fb = f[2:], fb[2:]
        print(f"| {name} | {statistics.median(f):.2f} / {min(f):.2f} | {statistics.median(fb):.2f} / {min(fb):.2f} |")


if __name__ == "__main__":
    main()
