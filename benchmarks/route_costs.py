"""Fit SHiRA's mixed-batch cost model (``InWeightAdapter.prefers_weight``) to measured routes.

    python benchmarks/route_costs.py            # ~5-10 min on 2 busy cores
    python benchmarks/route_costs.py --quick    # two small shapes: a smoke test

What a routed layer does with a SHiRA group of T tokens (``AdapterLinear.routed_forward``):

- sparse route: the base product on all rows, then the grouped kernel adds the group's delta;
  its cost is ``additive_cost(T) = K (S_8 * blocks of 8 + S_4 * blocks of 4)`` (``grouped.blocks``);
- weight route: the K values scattered in, the base product on the group's rows alone, the
  originals scattered back; against the sparse route it costs ``WRITE_S_PER_VALUE * K +
  REREAD_S_PER_ENTRY * m * n`` more (the scatters, and one more pass over the weight).

For each layer shape, r and T, one layer with 4 SHiRA adapters runs ``routed_forward`` on 4 groups
of T tokens (4T rows, one token each, interleaved) with ``prefers_weight`` patched to answer False
(sparse4) and True (scatter4), beside the bare base product on the 4T rows (base4); CPU time,
1 torch thread, fp32, inference mode, medians of round-robin calls. The grouped kernel's cost
per group is ``additive(T) = (sparse4 - base4) / 4``. S_8 and S_4 are fitted to it and to the
smallest regret of the choice (see :func:`fit`; WRITE and REREAD, shared with other paths, are
kept). The report prints the fitted constants beside the current ones and, for both, the regret
of the model's choice on every measured point: chosen route / faster route (1.00 = always the
faster one), the worst and the median. ``--save`` keeps the points; ``--points`` refits them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mixed_batch import SCATTER, SPARSE, forced_route, measure  # noqa: E402  (its timing loop and forced routes)

SHAPES = [(512, 512), (512, 1376), (1376, 512), (1024, 1024), (1024, 2816), (2816, 1024)]
QUICK_SHAPES = [(256, 256), (256, 704)]
TOKENS = [1, 4, 8, 16, 32, 64, 128, 256]
RANKS = [8, 32]
GROUPS = 4


def one_layer(in_f: int, out_f: int, r: int):
    import shirakit

    holder = torch.nn.Sequential(torch.nn.Linear(in_f, out_f, bias=False)).eval()
    for j in range(GROUPS):
        torch.manual_seed(100 + j)
        shirakit.inject(holder, shirakit.ShiraConfig(r=r, target_modules=["0"], init_weights=False), f"a{j}")
    layer = holder[0]
    layer.withdraw_live()
    return layer


def measure_point(layer, tokens: int, min_reps: int, min_time: float) -> dict[str, float]:
    x = torch.randn(GROUPS * tokens, layer.base_layer.in_features)
    groups = [(f"a{j}", torch.arange(j, GROUPS * tokens, GROUPS)) for j in range(GROUPS)]
    with torch.inference_mode():
        return measure({"base4": lambda: layer.base_layer(x), "sparse4": forced_route(layer, x, groups, SPARSE),
                        "scatter4": forced_route(layer, x, groups, SCATTER)}, min_reps, min_time)


def fit(points: list[dict], current: dict[str, float]) -> dict[str, float]:
    """The grouped kernel's two constants; WRITE and REREAD stay as they are.

    Least squares on ``additive(T) = c0 + K (S_8 * blocks of 8 + S_4 * blocks of 4)`` (relative:
    each point weighted by 1 / its value; c0, the routed call's Python cost shared by its groups,
    is fitted so it does not leak into the per-value constants) gives S_8 and S_4 in isolation and
    their ratio. The route choice depends only on how the additive cost compares with the weight
    route's extra cost, whose constants (WRITE, REREAD) are shared with torch's CSR product (the
    path without numba, or with gradients) and MiSS: so they are kept, and S_8 (S_4 at the fitted
    ratio) is picked on a log grid to minimise the worst regret (then the mean) over the points.
    """
    from shirakit.methods.shira import grouped

    rows, y = [], []
    for p in points:
        eights, fours = grouped.blocks(p["tokens"])
        rows.append([1.0, p["k"] * eights, p["k"] * fours])
        y.append((p["sparse4"] - p["base4"]) / GROUPS)
    weight = 1 / np.maximum(np.abs(y), 1e-7)
    _, s8, s4 = np.linalg.lstsq(np.array(rows) * weight[:, None], np.array(y) * weight, rcond=None)[0]
    best = None
    for scale in np.geomspace(0.2e-9, 5e-9, 120):
        c = {**current, "GROUPED_S_PER_VALUE_8": scale, "GROUPED_S_PER_VALUE_4": scale * s4 / s8}
        r = regrets(points, c)
        key = (round(max(r), 3), statistics.mean(r))
        if best is None or key < best[0]:
            best = (key, c)
    print(f"least squares alone: S_8 {s8:.3g} s, S_4 {s4:.3g} s per value and block")
    return best[1]


def regrets(points: list[dict], c: dict[str, float]) -> list[float]:
    from shirakit.methods.shira import grouped

    out = []
    for p in points:
        eights, fours = grouped.blocks(p["tokens"])
        additive = p["k"] * (c["GROUPED_S_PER_VALUE_8"] * eights + c["GROUPED_S_PER_VALUE_4"] * fours)
        fixed = c["WRITE_S_PER_VALUE"] * p["k"] + c["REREAD_S_PER_ENTRY"] * p["m"] * p["n"]
        chosen = p["scatter4"] if fixed < additive else p["sparse4"]
        out.append(chosen / min(p["scatter4"], p["sparse4"]))
    return out


def current_constants() -> dict[str, float]:
    from shirakit.methods.shira.adapter import ShiraAdapter

    return {k: getattr(ShiraAdapter, k) for k in ("GROUPED_S_PER_VALUE_8", "GROUPED_S_PER_VALUE_4",
                                                  "WRITE_S_PER_VALUE", "REREAD_S_PER_ENTRY")}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="two small shapes, few repeats: a smoke test")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="tokens per group (comma list)")
    p.add_argument("--save", type=Path, help="write the measured points to this JSON file")
    p.add_argument("--points", type=Path, help="fit points saved by --save instead of measuring")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="Sparse invariant checks")
    shapes, (min_reps, min_time) = (QUICK_SHAPES, (3, 0.01)) if args.quick else (SHAPES, (7, 0.15))
    token_counts = [int(t) for t in args.tokens.split(",") if t.strip()]
    if args.points:
        points = json.loads(args.points.read_text())
    else:
        points = measure_all(shapes, token_counts, min_reps, min_time)
    if args.save:
        args.save.write_text(json.dumps(points))
    report(points)


def measure_all(shapes, token_counts, min_reps: int, min_time: float) -> list[dict]:
    points = []
    for in_f, out_f in shapes:
        for r in RANKS:
            layer = one_layer(in_f, out_f, r)
            k = layer.adapters["a0"].shira_weight.numel()
            for tokens in token_counts:
                m = measure_point(layer, tokens, min_reps, min_time)
                points.append({"n": in_f, "m": out_f, "r": r, "k": k, "tokens": tokens, **m})
                times = ", ".join(f"{a} {b * 1e3:.3f} ms" for a, b in m.items())
                print(f"  {in_f}->{out_f} r={r} T={tokens}: {times}", file=sys.stderr, flush=True)
    return points


def report(points: list[dict]) -> None:
    current = current_constants()
    fitted = fit(points, current)
    print("| constant | current | fitted |\n|---|---|---|")
    for key in fitted:
        print(f"| {key} | {current[key]:.3g} | {fitted[key]:.3g} |")
    for label, c in (("current", current), ("fitted", fitted)):
        r = regrets(points, c)
        print(f"\n{label} constants: chosen route / faster route over {len(r)} points: worst {max(r):.2f}x, "
              f"median {statistics.median(r):.2f}x")


if __name__ == "__main__":
    main()
