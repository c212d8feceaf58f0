"""Data-parallel training on 2 CPU processes (gloo): DDP under torchrun, accelerate launch, FSDP2.

Two launches for the whole module (see tests/dist_worker.py for the jobs and exact commands):
torchrun runs DDP and FSDP2 jobs, ``accelerate launch`` runs Accelerator().prepare jobs. Each job
trains a tiny Llama 3 steps on half of a fixed global batch per rank; here one process trains the
same steps on the whole global batch and the saved adapters must agree (atol 1e-5), the masks
(SHiRA) / initial values (LoRA) must be the same on both ranks, and so must the trained values.
Deselect with ``-k "not distributed"``; skipped where torch.distributed or gloo is missing.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import shirakit

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

from tests import dist_worker  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "dist_worker.py")
TORCHRUN_JOBS = ["ddp:shira", "ddp:lora", "fsdp:lora", "fsdp:shira", "fsdp:vera", "fsdp:miss", "fsdp:missbat",
                 "fsdp-ignored:shira", "fsdp-resume:shira", "fsdp-resume:lora"]
ACCELERATE_JOBS = ["accelerate:shira", "accelerate:lora"]
LAUNCH_TIMEOUT_S = 300  # generous: the machine is shared; a normal run takes ~15-30 s per launch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cmd: list[str], home: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HOME=str(home))  # HF_HOME: no user accelerate config is read
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {done.returncode}:\n{(done.stdout + done.stderr)[-6000:]}")


@pytest.fixture(scope="module")
def torchrun_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("torchrun")
    launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
            WORKER, "--out", str(out), *TORCHRUN_JOBS], out)
    return out


@pytest.fixture(scope="module")
def accelerate_out(tmp_path_factory) -> Path:
    pytest.importorskip("accelerate")
    out = tmp_path_factory.mktemp("accelerate")
    # --multi_gpu selects accelerate's torchrun-based launcher; with no GPU it runs MULTI_CPU on gloo
    # (--cpu with more than one process wants mpirun instead).
    launch([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), WORKER, "--out", str(out), *ACCELERATE_JOBS], out)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """method -> (adapter tensors, losses, init digest), trained in this process on the global batch."""
    cache = {}

    def get(method: str, resume: bool = False):
        if (method, resume) not in cache:
            initial = dist_worker.init_digest(dist_worker.build(method), method)
            folder = tmp_path_factory.mktemp("resume") if resume else None
            model, losses = dist_worker.train_single(method, folder)
            cache[method, resume] = (shirakit.adapter_state_dict(model), losses, initial)
        return cache[method, resume]

    return get


def records(out: Path, job: str) -> list[dict]:
    folder = out / job.replace(":", "-")
    found = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in found] == [2, 2] and [r["backend"] for r in found] == ["gloo", "gloo"]
    return found


def assert_matches_single_process(out: Path, job: str, reference) -> None:
    mode, method = job.split(":")
    expected, expected_losses, expected_init = reference(method, resume=mode == "fsdp-resume")
    ranks = records(out, job)
    for r in ranks:
        assert "error" not in r, f"rank {r['rank']}: {r['error']}\n{r.get('traceback', '')}"
    assert ranks[0]["init"] == ranks[1]["init"] == expected_init, "masks / initial values differ across ranks"
    assert ranks[0]["trained"] == ranks[1]["trained"], "ranks ended with different adapter values"
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(expected_losses), rtol=0, atol=1e-5)

    saved = load_file(str(out / job.replace(":", "-") / "adapter" / "adapter_model.safetensors"))
    assert saved.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(saved[key], value, rtol=0, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
    weights = [k for k in expected if expected[k].dtype.is_floating_point]
    assert max(expected[k].abs().max().item() for k in weights) > 1e-3  # it trained: the check has teeth


@pytest.mark.parametrize("method", ["shira", "lora"])
def test_ddp_torchrun_matches_single_process(method, torchrun_out, reference):
    assert_matches_single_process(torchrun_out, f"ddp:{method}", reference)


@pytest.mark.parametrize("method", ["shira", "lora"])
def test_accelerate_launch_matches_single_process(method, accelerate_out, reference):
    assert_matches_single_process(accelerate_out, f"accelerate:{method}", reference)
    assert records(accelerate_out, f"accelerate:{method}")[0]["wrapped"] == "DistributedDataParallel"


def test_fsdp2_lora_matches_single_process(torchrun_out, reference):
    assert_matches_single_process(torchrun_out, "fsdp:lora", reference)


def test_fsdp2_shira_on_sharded_base_weights(torchrun_out, reference):
    """The adapted base weights sharded too: SHiRA writes its values into each forward's gathered copy
    (and again before the backward), so training equals one process; save on every rank is complete."""
    assert_matches_single_process(torchrun_out, "fsdp:shira", reference)


def test_fsdp2_merging_lora_into_shards_is_refused_with_the_way_out(torchrun_out):
    for r in records(torchrun_out, "fsdp:lora"):
        assert "FSDP2-sharded weight" in r["merge_error"] and "Merge in one process" in r["merge_error"], r


@pytest.mark.parametrize("method", ["vera", "miss", "missbat"])
def test_fsdp2_other_methods_on_sharded_base_weights(method, torchrun_out, reference):
    """VeRA, MiSS balance and MiSS bat (which reads the gathered weight, additively) under FSDP2."""
    assert_matches_single_process(torchrun_out, f"fsdp:{method}", reference)


@pytest.mark.parametrize("method", ["shira", "lora"])
def test_fsdp2_resume_from_a_saved_adapter_continues_identically(method, torchrun_out, reference):
    """Save on every rank after 2 steps, load into a fresh model, shard it, train on: the same losses and
    adapter as that restart in one process (every rank's part was saved, none reverted)."""
    assert_matches_single_process(torchrun_out, f"fsdp-resume:{method}", reference)


def test_fsdp2_shira_merge_unmerge_exact_on_local_shards(torchrun_out):
    """merge scatters into each rank's own rows (global -> local positions); unmerge restores them bit-exactly."""
    for r in records(torchrun_out, "fsdp:shira"):
        assert r["shards_changed_by_merge"] > 0, r
        assert r["merge_diff"] < 1e-5 and r["after_unmerge_diff"] < 1e-5, r
        assert r["unmerge_exact"], r


def test_fsdp2_shira_with_adapted_base_weights_kept_whole(torchrun_out, reference):
    """The documented way: the adapted layers' base parameters stay unsharded (``ignored_params``)."""
    assert_matches_single_process(torchrun_out, "fsdp-ignored:shira", reference)
