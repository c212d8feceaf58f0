"""SHiRA's value gradient (an SDDMM): the candidate kernels side by side, per layer shape and thread count.

    python benchmarks/value_grad.py                      # ~2 minutes on 2 cores
    python benchmarks/value_grad.py --quick              # a smoke test
    python benchmarks/value_grad.py --write-docs docs/benchmarks.md

For one layer's backward, ``dL/dv_k = sum_t g[t, i_k] x[t, j_k]`` at K = r * (m + n) random
positions (sorted row-major, as SHiRA keeps them), g (T, m) and x (T, n) fp32. Candidates:

- ``sampled_addmm``: ``torch.sparse.sampled_addmm`` on the CSR pattern (int64 indices), what
  shirakit used before and still uses on CUDA, for fp64 and without numba;
- ``shirakit``: :func:`shirakit.methods.shira.cpu_sddmm.value_grad` (C kernels: transposes + 8-run dots in
  one OpenMP region on torch's workers; numba and a thread pool without a compiler),
  with x transposed afresh, and ``shirakit, x shared`` with x's transpose kept from the call before
  (what k and v get after q, and up after gate);
- ``gather-bmm``: a torch-ops reformulation, the rows of g^T and x^T gathered for 4096 positions at a
  time and multiplied by a batched ``bmm`` of (1 x T) by (T x 1).

Each candidate's result is checked against ``sampled_addmm`` first. Timing: in one process, for
every thread count (``torch.set_num_threads``; the kernel's pool follows it), ``--repeats`` rounds
that each call every candidate once (interleaved, so a load change on the shared machine hits all
alike); the table gives median wall and CPU (process time, all threads) per call and the ratio to
``sampled_addmm`` on the same shape and thread count, and the dense product g^T x for scale.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from _report import cores, cpu_model, replace_section, software, table, today  # noqa: I001

from shirakit.methods.shira import cpu_sddmm
from shirakit.methods.shira.sparse import SparsePattern

BEGIN, END = "<!-- value_grad:begin -->", "<!-- value_grad:end -->"
# (out, in) of the distinct projection shapes of the two benchmark models (train_step.py's sizes)
SHAPES = {
    "1024 x 2816 model": [(1024, 1024), (2816, 1024), (1024, 2816)],
    "576 x 1536 model (SmolLM2)": [(576, 576), (192, 576), (1536, 576), (576, 1536)],
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    p.add_argument("--tokens", type=int, default=512, help="T = batch x sequence (default 512 = 2 x 256)")
    p.add_argument("--r", type=int, default=16, help="K = r * (m + n) (default 16)")
    p.add_argument("--threads", type=int, nargs="+", default=None, help="default: 1, 2 and all usable cores")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 25; --quick 3)")
    p.add_argument("--write-docs", type=Path, default=None, metavar="FILE")
    args = p.parse_args(argv)
    usable = len(os.sched_getaffinity(0))
    args.threads = args.threads or sorted({1, 2, usable})
    args.repeats = args.repeats or (3 if args.quick else 25)
    return args


def gather_bmm(g: torch.Tensor, x: torch.Tensor, pattern: SparsePattern, chunk: int = 4096) -> torch.Tensor:
    g_rows, x_rows = g.T.contiguous(), x.T.contiguous()
    out = torch.empty(pattern.rows.numel())
    for start in range(0, out.numel(), chunk):
        a = g_rows.index_select(0, pattern.rows[start:start + chunk]).unsqueeze(1)
        b = x_rows.index_select(0, pattern.cols[start:start + chunk]).unsqueeze(2)
        out[start:start + chunk] = torch.bmm(a, b).flatten()
    return out


def candidates(g: torch.Tensor, x: torch.Tensor, pattern: SparsePattern) -> dict:
    csr = pattern.csr()
    out = {
        "sampled_addmm": lambda: torch.sparse.sampled_addmm(csr, g.T, x, beta=0.0).values(),
        "shirakit": lambda: (cpu_sddmm.forget_inputs(), cpu_sddmm.value_grad(g, x, pattern.rows, pattern.cols))[1],
        # as for k and v after q (or up after gate): x's transpose is the one kept from the last call
        "shirakit, x shared": lambda: cpu_sddmm.value_grad(g, x, pattern.rows, pattern.cols),
        "gather-bmm": lambda: gather_bmm(g, x, pattern),
        "dense g^T x (scale)": lambda: g.T @ x,
    }
    if not cpu_sddmm.AVAILABLE:
        del out["shirakit"], out["shirakit, x shared"]
    return out


def measure(fns: dict, repeats: int) -> dict[str, tuple[float, float]]:
    for fn in fns.values():  # warm-up (and numba's compile)
        fn()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in fns}


def run(args: argparse.Namespace) -> str:
    warnings.filterwarnings("ignore", category=UserWarning)
    shapes = {"quick": [(192, 64), (64, 192)]} if args.quick else SHAPES
    tokens = 64 if args.quick else args.tokens
    rows = []
    for model, layer_shapes in shapes.items():
        for m, n in layer_shapes:
            k = args.r * (m + n)
            gen = torch.Generator().manual_seed(m * 7 + n)
            flat = torch.randperm(m * n, generator=gen)[:k].sort().values
            pattern = SparsePattern(flat // n, flat % n, m, n)
            g, x = torch.randn(tokens, m, generator=gen), torch.randn(tokens, n, generator=gen)
            fns = candidates(g, x, pattern)
            expected = fns["sampled_addmm"]()
            for name in ("shirakit", "shirakit, x shared", "gather-bmm"):
                if name in fns:
                    torch.testing.assert_close(fns[name](), expected, atol=1e-3, rtol=1e-4)
            for threads in args.threads:
                torch.set_num_threads(threads)
                res = measure(fns, args.repeats)
                base_wall, base_cpu = res["sampled_addmm"]
                for name, (wall, cpu) in res.items():
                    rows.append([model, f"{m} x {n}", f"{k:,}", str(threads), name, f"{wall * 1e3:.2f}",
                                 f"{cpu * 1e3:.2f}", f"{wall / base_wall:.2f}", f"{cpu / base_cpu:.2f}"])
                print(f"  {m}x{n} threads={threads} done (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
    return table(["model", "layer (out x in)", "K", "threads", "kernel", "wall ms", "CPU ms",
                  "wall / sampled_addmm", "CPU / sampled_addmm"], rows)


def main(argv=None) -> None:
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/value_grad.py", *(sys.argv[1:] if argv is None else argv)])
    load_start = os.getloadavg()[0]
    body = run(args)
    section = "\n\n".join([
        "## SHiRA value gradient kernels (`benchmarks/value_grad.py`)",
        "Written by the script (`--write-docs`). What is measured: the script's docstring. Medians of "
        f"{args.repeats} interleaved calls; T = {64 if args.quick else args.tokens} tokens, K = {args.r} * (m + n).",
        "\n".join([f"- Date: {today()}", f"- Machine: {cpu_model()}, {cores()}; load average {load_start:.1f} at "
                   f"start, {os.getloadavg()[0]:.1f} at the end", f"- Software: {software()}",
                   f"- Command: `{command}`"]),
        body,
    ])
    print(section)
    if args.write_docs:
        replace_section(args.write_docs, BEGIN, END, section)


if __name__ == "__main__":
    main()
