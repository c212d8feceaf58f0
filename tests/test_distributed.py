"""Data-parallel training on 2 CPU processes (gloo): DDP under torchrun, accelerate launch, FSDP2.

Two launches for the whole module (see tests/dist_worker.py for the jobs and exact commands):
torchrun runs DDP and FSDP2 jobs, ``accelerate launch`` runs Accelerator().prepare jobs. Each job
trains a tiny Llama 3 steps on half of a fixed global batch per rank; here one process trains the
same steps on the whole global batch and the saved adapters must agree (atol 1e-5), the masks
(SHiRA) / initial values (LoRA) must be the same on both ranks, and so must the trained values.
Deselect with ``-k "not distributed"``; skipped where torch.distributed or gloo is missing.
"""

from __future__ import annotations

import importlib.util
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

pytestmark = [
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="needs torch.distributed with gloo"),
    pytest.mark.slow,  # launches torchrun / accelerate processes
]

from tests import dist_trainer_worker, dist_worker  # noqa: E402
from tests.models import inputs, tiny_llama  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "dist_worker.py")
TORCHRUN_JOBS = ["ddp:shira", "ddp:lora", "fsdp:lora", "fsdp:shira", "fsdp:vera", "fsdp:miss", "fsdp:missbat",
                 "fsdp-ignored:shira", "fsdp-resume:shira", "fsdp-resume:lora",
                 "fsdp-meta:shira", "fsdp-meta:lora", "fsdp-meta:vera", "fsdp-meta:missbat",
                 "fsdp64:shira", "fsdp64:missbat", "fsdp32:missbat"]
# DeepSpeed ZeRO-3 on its CPU accelerator (gloo), last in the launch (deepspeed is a dev dependency)
ZERO3_MERGE_JOBS = ["zero3-merge:shira", "zero3-merge:lora", "zero3-merge:missbat"]
ZERO3_JOBS = ["zero3:shira", "zero3:lora", "zero3-release:shira", "zero3-release:missbat", *ZERO3_MERGE_JOBS] \
    if importlib.util.find_spec("deepspeed") else []
TORCHRUN_JOBS += ZERO3_JOBS
ACCELERATE_JOBS = ["accelerate:shira", "accelerate:lora"]
TRAINER_WORKER = str(ROOT / "tests" / "dist_trainer_worker.py")
TRAINER_JOBS = ["shira-sgd", "lora-sgd", "shira-adamw", "lora-adamw"]
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
def fsdp2_trainer_out(tmp_path_factory) -> Path:
    """One ``accelerate launch --config_file <FSDP2 config>`` running Trainer jobs (tests/dist_trainer_worker.py)."""
    pytest.importorskip("accelerate")
    out = tmp_path_factory.mktemp("fsdp2-trainer")
    config = dist_trainer_worker.write_fsdp2_config(out / "fsdp2.yaml")
    launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2",
            "--main_process_port", str(free_port()), TRAINER_WORKER, "--out", str(out), *TRAINER_JOBS], out)
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
    (and again before the backward), so training equals one process; save on every rank is complete.
    Nothing is written into the shards, and a rank's adapters hold nothing per value beyond their
    int32 indices (docs/distributed.md, memory)."""
    assert_matches_single_process(torchrun_out, "fsdp:shira", reference)
    for r in records(torchrun_out, "fsdp:shira"):
        assert r["shards_clean_after_training"] and r["shira_held_bytes_over_indices"] == 0, r


def test_fsdp2_merging_lora_into_shards_is_refused_with_the_way_out(torchrun_out):
    for r in records(torchrun_out, "fsdp:lora"):
        assert "FSDP2-sharded weight" in r["merge_error"] and "Merge in one process" in r["merge_error"], r


@pytest.mark.parametrize("method", ["vera", "miss", "missbat"])
def test_fsdp2_other_methods_on_sharded_base_weights(method, torchrun_out, reference):
    """VeRA, MiSS balance and MiSS bat (which reads the gathered weight, additively) under FSDP2."""
    assert_matches_single_process(torchrun_out, f"fsdp:{method}", reference)


def trained_logits(method: str, dtype: torch.dtype) -> torch.Tensor:
    """One process, the whole global batch: the trained model's logits (float64 for comparison)."""
    model, _ = dist_worker.train_single(method, None, dtype)
    with torch.no_grad():
        return model.eval()(input_ids=dist_worker.global_batch()).logits.double()


def fsdp_logits(out: Path, job: str) -> torch.Tensor:
    for r in records(out, job):
        assert "error" not in r, f"rank {r['rank']}: {r['error']}\n{r.get('traceback', '')}"
    return load_file(str(out / job.replace(":", "-") / "logits.safetensors"))["logits"].double()


@pytest.mark.parametrize("method", ["shira", "missbat"])
def test_fsdp2_float64_logits_equal_one_process(method, torchrun_out):
    """In float64, 3 SGD steps on 2 ranks give one process's logits: MiSS bat runs additively on FSDP2's
    gathered weight and in the weight in one process, and both now compute its delta and W0 + delta in
    float64 (it was fp32: 1.1e-5 apart here; measured 0.0 since). docs/distributed.md."""
    got, want = fsdp_logits(torchrun_out, f"fsdp64:{method}"), trained_logits(method, torch.float64)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_fsdp2_fp32_missbat_gap_is_fp32_rounding(torchrun_out):
    """In fp32 MiSS bat on 2 ranks is ~6e-5 from one process (scale 0.6): no missing term (float64 agrees,
    above) but fp32 rounding (the additive route vs W0 + delta rounded once, the gradients' reduction order)
    that bat's training amplifies: one process in fp32 is as far from itself in float64."""
    exact = trained_logits("missbat", torch.float64)
    own_error = (trained_logits("missbat", torch.float32) - exact).abs().max().item()
    gap = (fsdp_logits(torchrun_out, "fsdp32:missbat") - trained_logits("missbat", torch.float32)).abs().max().item()
    assert own_error > 1e-6  # fp32 alone moves bat's logits this much (measured 5.0e-5)
    assert gap < 2e-4 and gap < 4 * own_error, (gap, own_error)  # measured 6.5e-5


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


@pytest.mark.parametrize("method", ["shira", "lora", "vera", "missbat"])
def test_fsdp2_meta_device_model_with_reset_adapter_parameters(method, torchrun_out, reference):
    """Never whole on a rank: built and injected on the meta device, sharded, to_empty, base weights
    copied into the shards, reset_adapter_parameters: the same masks / initial values, losses and
    saved adapter as one process. Before the reset, a forward is refused (no uninitialized adapter runs)."""
    assert_matches_single_process(torchrun_out, f"fsdp-meta:{method}", reference)
    for r in records(torchrun_out, f"fsdp-meta:{method}"):
        assert r["base_sharded"], r
        assert "reset_adapter_parameters" in r["meta_before_reset"], r
        assert r["weights_marked_shared"] == 0, r  # in-weight adapters write the gathered copy, as when built whole
        if method == "shira":
            assert r["shards_clean_after_training"] and r["shira_held_bytes_over_indices"] == 0, r


@pytest.mark.parametrize("job", ["zero3:shira", "zero3:lora", "zero3-release:shira", "zero3-release:missbat"])
def test_deepspeed_zero3_matches_single_process(job, torchrun_out, reference):
    """ZeRO-3, every parameter partitioned (adapter ones too): SHiRA writes its values into the weight
    ZeRO gathers for each forward; same losses and adapter as one process; the adapter saved inside
    GatheredParameters is complete. ``zero3-release``: every weight released after its forward and
    gathered again, clean, for its backward (SHiRA writes its values in again there, as under FSDP2)."""
    if not ZERO3_JOBS:
        pytest.skip("deepspeed is not installed (it is in the dev extra)")
    assert_matches_single_process(torchrun_out, job, reference)
    for r in records(torchrun_out, job):
        assert r["partitioned"], r  # the base weight was really partitioned away outside forward


@pytest.mark.parametrize("job", ZERO3_MERGE_JOBS)
def test_deepspeed_zero3_merge_unmerge(job, torchrun_out, reference):
    """Merge under ZeRO-3, called on every rank outside any GatheredParameters (before the fix LoRA's
    merge went into the empty placeholder and its delta was silently lost; SHiRA's raised an
    IndexError): the logits equal the unmerged adapter's, the partitions really changed, unmerge
    brings them back (bit-exact for SHiRA and MiSS bat), merge_and_unload keeps the logits; a merge
    inside a user's GatheredParameters is refused, since without a modifier_rank it would be lost."""
    if not ZERO3_JOBS:
        pytest.skip("deepspeed is not installed (it is in the dev extra)")
    assert_matches_single_process(torchrun_out, job, reference)
    exact = not job.endswith(":lora")
    for r in records(torchrun_out, job):
        assert r["merged_diff"] < 1e-5 and r["unloaded_diff"] < 1e-5, r
        assert r["merged_base_changed"], r
        assert r["unmerged_diff"] == 0.0 if exact else r["unmerged_diff"] < 1e-5, r
        assert r["unmerged_base_exact"] or not exact, r
        refusal = r["unmerge_inside_gathered"]
        assert "GatheredParameters" in refusal and "modifier_rank" in refusal, r


# ---- accelerate launch + FSDP2 config file + transformers.Trainer --------------------------------
@pytest.fixture(scope="module")
def trainer_reference(tmp_path_factory):
    """job -> (trained adapter tensors, logged losses, adapter before training, trained model): Trainer
    in this process on the whole batch, the same arguments otherwise."""
    cache = {}

    def get(job: str):
        if job not in cache:
            before = shirakit.adapter_state_dict(dist_trainer_worker.build(job.split("-")[0]))
            trainer, losses = dist_trainer_worker.train(job, tmp_path_factory.mktemp(job), processes=1,
                                                        configured_state=False)
            cache[job] = (shirakit.adapter_state_dict(trainer.model), losses, before, trainer.model.eval())
        return cache[job]

    return get


def trainer_records(out: Path, job: str) -> list[dict]:
    found = [json.loads((out / job / f"rank{r}.json").read_text()) for r in range(2)]
    for r in found:
        assert "error" not in r, f"rank {r['rank']}: {r['error']}\n{r.get('traceback', '')}"
        setting = (r["world"], r["backend"], r["distributed_type"], r["fsdp_version"])
        assert setting == (2, "gloo", "DistributedType.FSDP", 2), r
        assert r["wrapped"].startswith("FSDP") and r["base_weight_sharded"], r  # FSDP2 really sharded the base
    return found


def assert_same_tensors(found: dict, expected: dict, atol: float) -> None:
    assert found.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(found[key], value, rtol=0, atol=atol, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("job", TRAINER_JOBS)
def test_accelerate_fsdp2_trainer_trains_like_one_process(job, fsdp2_trainer_out, trainer_reference):
    """`accelerate launch --config_file` (FSDP2) + Trainer: the same losses and trained adapter as Trainer
    in one process on the whole batch (SGD and Trainer's default fused AdamW), and the adapter that
    `save_adapter` wrote on every rank is complete: every tensor's second FSDP shard (rank 1's rows)
    trained and equal to the one-process values, not rank 1's initial values (accelerate#4206)."""
    expected, expected_losses, before, _ = trainer_reference(job)
    ranks = trainer_records(fsdp2_trainer_out, job)
    assert len(ranks[0]["losses"]) == dist_trainer_worker.STEPS
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor(expected_losses), rtol=0, atol=1e-5)
    assert expected_losses[-1] < expected_losses[0]

    saved = load_file(str(fsdp2_trainer_out / job / "adapter" / "adapter_model.safetensors"))
    assert_same_tensors(saved, expected, atol=1e-5)
    for key, value in saved.items():
        if value.dtype.is_floating_point:
            assert not torch.equal(value.chunk(2)[1], before[key].chunk(2)[1]), f"{key}: rank 1's part not trained"


@pytest.mark.parametrize("job", TRAINER_JOBS)
def test_accelerate_fsdp2_trainer_save_model_is_complete_and_clean(job, fsdp2_trainer_out, trainer_reference):
    """Trainer's own save (`save_model`: accelerate gathers the full state dict) holds the clean base
    weights, bit for bit, and the complete trained adapter; a fresh injected model loading it
    gives the one-process model's outputs."""
    method = job.split("-")[0]
    expected, _, _, model = trainer_reference(job)
    saved = load_file(str(fsdp2_trainer_out / job / "trainer" / "model.safetensors"))
    clean = tiny_llama(seed=0).state_dict()
    base = {k.replace(".base_layer.", "."): v for k, v in saved.items() if ".adapters." not in k}
    assert base.keys() == clean.keys()
    for key, value in base.items():
        assert torch.equal(value, clean[key]), f"{key}: the checkpoint must hold the clean base weight"
    fresh = dist_trainer_worker.build(method)
    fresh.load_state_dict(saved)
    assert_same_tensors(shirakit.adapter_state_dict(fresh), expected, atol=1e-5)
    ids = inputs(seed=7, batch=2, length=9)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("job", ["shira-sgd", "lora-sgd"])
def test_accelerate_fsdp2_trainer_adapter_loads_in_shirakit_and_peft(job, fsdp2_trainer_out, trainer_reference):
    """The adapter saved under FSDP2 loads into a plain base with shirakit and with PEFT: identical
    outputs, equal to the one-process trained model's."""
    peft = pytest.importorskip("peft")
    _, _, _, model = trainer_reference(job)
    folder = fsdp2_trainer_out / job / "adapter"
    ours = tiny_llama(seed=0)
    shirakit.load_adapter(ours, folder)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(seed=0), folder).eval()
    ids = inputs(seed=7, batch=2, length=9)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        torch.testing.assert_close(ours.eval()(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(theirs(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
