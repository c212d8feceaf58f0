"""benchmarks/gpu.py runs end to end: ``--device cpu --small`` on this machine (CI's proof that the
script works; on a GPU the same command without those flags is the measurement). Slow: about a
minute on a quiet 2-core machine, several on a busy one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_benchmark_runs_small_on_cpu(tmp_path):
    docs = tmp_path / "benchmarks.md"
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--device", "cpu", "--small",
                           "--write-docs", str(docs)], capture_output=True, text=True, cwd=REPO, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = docs.read_text()
    assert "<!-- gpu.py:begin -->" in text and "<!-- gpu.py:end -->" in text
    for row in ("train step, 1B", "train step, 3B", "PEFT LoRA", "shirakit SHiRA", "switch, 3B",
                "mixed batch, 1B, prefill", "mixed batch, 1B, decode", "serve, 1B"):
        assert row in text, f"row {row!r} missing from the table"
    for count in ("| 1 adapter |", "| 16 adapters |", "| 100 adapters |"):
        assert count in text


def test_gpu_benchmark_refuses_cuda_without_a_gpu_and_unknown_sections():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu
    finally:
        sys.path.pop(0)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="sees no CUDA device"):
            gpu.parse_args(["--device", "cuda"])
    args = gpu.parse_args(["--device", "cpu", "--small"])
    assert args.dtype == "fp32" and args.batch == 2 and args.seq == 32
    assert gpu.parse_args(["--device", "cpu"]).seq == 512
    with pytest.raises(SystemExit, match="unknown"):
        gpu.main(["--device", "cpu", "--small", "--sections", "train,bogus"])
