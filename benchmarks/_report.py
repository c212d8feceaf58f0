"""What every benchmark script shares: size presets on the command line, the worker protocol
(a measurement runs in a fresh process and prints one ``RESULT {json}`` line), markdown tables,
machine facts, and a section of docs/benchmarks.md replaced in place (between a script's own
markers, written atomically)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DOCS_HEADER = "# Benchmarks\n\nResults of the scripts in `benchmarks/`.\n"


def median_seconds(fn, repeats: int, warmups: int = 1) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls, after ``warmups`` untimed calls."""
    for _ in range(warmups):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def cpu_model() -> str:
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        return match.group(1).strip() if match else "unknown CPU"
    except OSError:
        return "unknown CPU"


def cores() -> str:
    return f"{os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable)"


def today() -> str:
    return time.strftime("%a %b %d %H:%M:%S %Z %Y")


def software() -> str:
    """Python, torch, transformers, peft and shirakit versions, and the commit measured."""
    versions = {}
    for name in ("transformers", "peft", "shirakit"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = "not installed"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=REPO, capture_output=True,
                               text=True).stdout.strip()
        commit += " (with uncommitted changes under src/)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return (f"Python {platform.python_version()}, torch {torch.__version__}, transformers "
            f"{versions['transformers']}, peft {versions['peft']}, shirakit {versions['shirakit']} at commit {commit}")


def replace_section(path: Path, begin: str, end: str, body: str) -> None:
    """Put ``begin body end`` in ``path`` in place of the old one (or append it); atomic."""
    block = f"{begin}\n{body}\n{end}"
    text = path.read_text() if path.exists() else DOCS_HEADER
    if begin in text and end in text and text.index(begin) < text.index(end):
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ---- size presets: "full" and "quick" dicts of defaults, any flag given wins ---------------------
def add_preset_args(parser: argparse.ArgumentParser, presets: dict[str, dict]) -> None:
    """One ``--name`` flag per preset entry (type from the full preset's value), default None."""
    for name, value in presets["full"].items():
        kind = str if isinstance(value, str) else int
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None,
                            help=f"default {value} (--quick: {presets['quick'][name]})")


def apply_presets(args: argparse.Namespace, presets: dict[str, dict]) -> None:
    """Fill every preset flag left unset from the quick or the full preset."""
    for name, value in presets["quick" if args.quick else "full"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def flags(args: argparse.Namespace, names) -> list[str]:
    """The resolved settings as explicit flags, so a worker needs no preset logic."""
    return [item for name in names for item in (f"--{name.replace('_', '-')}", str(getattr(args, name)))]


# ---- the worker protocol -------------------------------------------------------------------
RESULT_PREFIX = "RESULT "


def emit(result: dict) -> None:
    """A worker's answer: one line the parent finds among anything else it prints."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_worker_process(script: str | Path, argv: list[str], env: dict[str, str] | None = None) -> dict:
    """Run ``script argv`` in a fresh Python process and return the dict it emitted."""
    cmd = [sys.executable, str(Path(script).resolve()), *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, **(env or {})})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"worker failed (exit code {proc.returncode}): {shlex.join(cmd)}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


# ---- the report --------------------------------------------------------------------------------
def machine_facts(how_run: str) -> dict[str, str]:
    """Date, CPU, cores, how the workers ran (``how_run``) and the load average now, software."""
    return {
        "date": today(),
        "machine": f"{cpu_model()}, {cores()}, {how_run}; load average at start {os.getloadavg()[0]:.2f}",
        "software": software(),
    }


def command_line(script: str, argv: list[str] | None) -> str:
    """The command as the user typed it (for the report)."""
    return shlex.join(["python", script, *(sys.argv[1:] if argv is None else argv)])


def publish(section: str, write_docs: Path | None, begin: str, end: str) -> None:
    """Print the section; with ``--write-docs FILE`` also put it in FILE between the markers."""
    print(section)
    if write_docs:
        replace_section(Path(write_docs), begin, end, section)
        print(f"\n(wrote the section into {write_docs})", file=sys.stderr)
