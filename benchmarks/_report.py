"""What every benchmark report shares: markdown tables, machine facts, and a section of
docs/benchmarks.md replaced in place (between a script's own markers, written atomically)."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DOCS_HEADER = "# Benchmarks\n\nResults of the scripts in `benchmarks/`.\n"


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
