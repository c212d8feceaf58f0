"""``bench`` (the benchmark scripts of a source checkout) and ``demo``."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from .common import UsageError, check_out_dir, positive_int

BENCHMARKS = Path(__file__).resolve().parents[3] / "benchmarks"


def benchmark_scripts() -> dict[str, str]:
    """name -> first docstring line of every ``benchmarks/*.py`` (not the ``_`` helpers)."""
    scripts = {}
    for path in sorted(BENCHMARKS.glob("*.py")) if BENCHMARKS.is_dir() else []:
        if path.name.startswith("_"):
            continue
        text = path.read_text(encoding="utf-8", errors="replace").lstrip()
        first = text.split('"""')[1].strip().splitlines()[0] if text.startswith('"""') else ""
        scripts[path.stem] = first
    return scripts


def register(sub) -> None:
    listing = "; ".join(benchmark_scripts()) or "none (benchmarks run from a source checkout)"
    p = sub.add_parser("bench", help=f"run a benchmark script ({listing}); no name: list them",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run benchmarks/NAME.py of a source checkout; arguments after NAME go to the "
                                   "script (NAME --help shows them).\n\n" +
                                   "\n".join(f"  {n:<16} {d}" for n, d in benchmark_scripts().items()))
    p.add_argument("name", nargs="?", help="benchmark to run; leave out to list them")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark (see NAME --help)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="SHiRA vs LoRA on two packaged tasks: accuracy, switching, fusion, orthogonality")
    p.add_argument("--out", default="demo_out", help="folder for figures and adapters")
    p.add_argument("--steps", type=positive_int, default=80, help="training steps per adapter")
    p.add_argument("--r", type=positive_int, default=8)
    p.add_argument("--seq-len", type=positive_int, default=64)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--test-size", type=positive_int, default=300, help="test examples per task")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)


def cmd_bench(args) -> None:
    scripts = benchmark_scripts()
    if args.name is None:
        if not scripts:
            raise UsageError(f"no benchmarks here ({BENCHMARKS} is missing): they run from a source checkout")
        print("benchmarks (shirakit bench NAME [--help | its arguments]):")
        for name, description in scripts.items():
            print(f"  {name:<16} {description}")
        return
    if args.name not in scripts:
        raise UsageError(f"bench {args.name!r}: expected one of {', '.join(scripts) or 'none (no source checkout)'}")
    sys.exit(subprocess.call([sys.executable, str(BENCHMARKS / f"{args.name}.py"), *args.rest]))


def cmd_demo(args) -> None:
    check_out_dir(args.out, overwrite=True)  # the demo rewrites its own folder
    from ..app import demo

    demo.run(args.out, steps=args.steps, r=args.r, seq_len=args.seq_len, batch_size=args.batch_size,
             test_size=args.test_size, seed=args.seed)
