"""SHiRA's value gradient on a conv: the conv's own kernel gradient read at K positions vs unfold + SDDMM.

    python benchmarks/conv_value_grad.py [--threads 1 2] [--reps 7]

One SD-1.5-shaped 3x3 conv (320 -> 320 channels, a 64x64 latent, batch 1, fp32), K = r (out + in*9)
with r = ``--r`` (16) random positions. Rows (median over the rounds, both in each round):
- kernel-grad: ``aten.convolution_backward`` weight gradient (dense, kernel-sized, transient), gathered;
- unfold-SDDMM: ``F.unfold`` of the input (9x its size) and the sampled dots at the K positions
  (shirakit's ``sampled_value_grad``), never a dense kernel gradient.
Both are checked equal (1e-3 relative) before timing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from shirakit.methods.shira.sparse import sampled_value_grad


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--r", type=int, default=16)
    args = p.parse_args()
    torch.manual_seed(0)
    c, hw, r = 320, 64, args.r
    x = torch.randn(1, c, hw, hw)
    w = torch.randn(c, c, 3, 3) * 0.02
    g = torch.randn(1, c, hw, hw)
    n_in = c * 9
    k = r * (c + n_in)
    flat = torch.randperm(c * n_in)[:k].sort().values
    rows, cols = (flat // n_in), (flat % n_in)
    crow = torch.zeros(c + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(rows, minlength=c).cumsum(0)

    def kernel_grad():
        _, gw, _ = torch.ops.aten.convolution_backward(g, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                                       [False, True, False])
        return gw.reshape(-1).index_select(0, flat)

    def unfold_sddmm():
        cols_x = F.unfold(x, 3, padding=1)[0].T.contiguous()  # (L, in*9)
        g2 = g[0].reshape(c, -1).T.contiguous()  # (L, out)
        return sampled_value_grad(g2, cols_x, rows, cols, crow)

    torch.testing.assert_close(kernel_grad(), unfold_sddmm(), rtol=1e-3, atol=1e-3)
    print(f"conv 320->320 3x3, 64x64, batch 1, fp32, K = {k} (r = {r})")
    print("| threads | kernel-grad + gather (ms) | unfold + SDDMM (ms) | ratio |")
    print("|---|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        times = {"k": [], "u": []}
        for _ in range(args.reps):
            for key, fn in (("k", kernel_grad), ("u", unfold_sddmm)):
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
        a, b = statistics.median(times["k"]), statistics.median(times["u"])
        print(f"| {threads} | {a * 1e3:.1f} | {b * 1e3:.1f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
