"""Worker for tests/test_distributed.py: trains a tiny injected model on 2 CPU processes (gloo).

Launched by the test (or by hand), one launch running several jobs in turn:

    python -m torch.distributed.run --nproc_per_node=2 --master_port=29500 tests/dist_worker.py \\
        --out /tmp/dist ddp:shira ddp:lora fsdp:lora fsdp:shira fsdp-ignored:shira
    python -m accelerate.commands.launch --cpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no --main_process_port 29501 tests/dist_worker.py --out /tmp/dist accelerate:shira

A job is ``<mode>:<method>``. Every job trains STEPS optimizer steps on one fixed global batch, each
rank taking its half, and writes ``<out>/<job>/rank<r>.json`` (a hash of the adapter's SHiRA
indices / initial values before any wrapping, a hash of its trained values, the loss averaged over
ranks per step, or the error it hit) and the trained adapter to ``<out>/<job>/adapter``.
The test trains :func:`train_single` on the whole global batch in one process and compares.

Modes: ``ddp`` (DistributedDataParallel, defaults: find_unused_parameters=False,
broadcast_buffers=True), ``accelerate`` (Accelerator().prepare(model, optimizer, dataloader)),
``fsdp`` (FSDP2 ``fully_shard`` per decoder layer and at the root), ``fsdp-ignored`` (the same, with
the adapted layers' base parameters passed as ``ignored_params``: kept whole on every rank),
``fsdp-resume`` (save, fresh model, shard again, train on), ``fsdp-meta`` (built and injected on the
meta device, sharded, ``to_empty``, base weights copied into the shards, ``reset_adapter_parameters``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import traceback
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script by torchrun / accelerate: make `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import shirakit  # noqa: E402
from tests.models import inputs, tiny_llama  # noqa: E402

STEPS = 3
GLOBAL_BATCH = 8
LR = 0.5


def build(method: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The same model and adapter on every process: tiny_llama seeds torch's global RNG, and the
    adapter's seed (no random_seed given) is then drawn from it, so every rank draws the same masks."""
    model = tiny_llama(dtype=dtype, seed=0)
    shirakit.inject(model, CONFIGS[method]())
    return model.train()


# Non-zero starting deltas (init off) so the first step's gradients reach every adapter tensor.
CONFIGS = {
    "shira": lambda: shirakit.ShiraConfig(r=4, target_modules="all-linear"),
    "lora": lambda: shirakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    "vera": lambda: shirakit.VeraConfig(r=8, target_modules="all-linear", init_weights=False),
    "miss": lambda: shirakit.MissConfig(r=4, target_modules="all-linear", init_random=True),
    "missbat": lambda: shirakit.MissConfig(r=4, target_modules="all-linear", init_weights="bat", init_random=True),
}


def global_batch() -> torch.Tensor:
    return inputs(seed=3, batch=GLOBAL_BATCH, length=12)


def optimizer_for(model: torch.nn.Module) -> torch.optim.Optimizer:
    # SGD with momentum: linear in the gradients, so float reduction order stays at ~1e-7.
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR, momentum=0.9)


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def init_digest(model: torch.nn.Module, method: str) -> str:
    """SHiRA: its masks (shira_indices); LoRA: its initial A and B (drawn from the same seed)."""
    if method == "shira":
        return digest(b for n, b in model.named_buffers() if n.endswith("shira_indices"))
    # the others: their initial trainable values (drawn from the same seed)
    return digest(p for n, p in model.named_parameters() if p.requires_grad)


def train_single(method: str, resume_dir: Path | None = None,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, list[float]]:
    """The reference: one process, the mean loss over the whole global batch, the same steps.
    ``resume_dir``: save after RESUME_AT steps, load the save into a fresh base, train on (a fresh
    optimizer: what is resumed here is the adapter, the optimizer state is torch's own checkpoint)."""
    model = build(method, dtype)
    optimizer = optimizer_for(model)
    ids = global_batch()
    losses = []
    for step in range(STEPS):
        if resume_dir is not None and step == RESUME_AT:
            model = resumed(model, resume_dir)
            optimizer = optimizer_for(model)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return model, losses


RESUME_AT = 2


def resumed(model: torch.nn.Module, folder: Path) -> torch.nn.Module:
    """Save the adapter, then a fresh base model loads it, trainable: a restart from a checkpoint."""
    shirakit.save_adapter(model, folder)
    fresh = tiny_llama(seed=0)
    shirakit.load_adapter(fresh, folder, is_trainable=True)
    return fresh.train()


# ---- the distributed jobs (run inside the launched processes) ----------------------------------
def _mean_over_ranks(value: float) -> float:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def _torch_loop(model, wrapped, rank: int, world: int) -> list[float]:
    optimizer = optimizer_for(model)
    local = global_batch().chunk(world)[rank]
    losses = []
    for _ in range(STEPS):
        loss = wrapped(input_ids=local, labels=local).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(_mean_over_ranks(loss.item()))
    return losses


def run_ddp(method: str, rank: int, world: int, record: dict, out: Path) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    model = build(method)
    record["init"] = init_digest(model, method)
    record["losses"] = _torch_loop(model, DistributedDataParallel(model), rank, world)
    if rank == 0:
        shirakit.save_adapter(model, out / "adapter")
    return model


def run_fsdp(method: str, rank: int, world: int, record: dict, out: Path, keep_adapted_whole: bool,
             dtype: torch.dtype = torch.float32):
    from torch.distributed.fsdp import fully_shard

    model = build(method, dtype)
    record["init"] = init_digest(model, method)
    ignored = None
    if keep_adapted_whole:
        adapted = [m for m in model.modules() if isinstance(m, shirakit.AdapterLinear)]
        ignored = {p for m in adapted for p in m.base_layer.parameters()}
    for layer in model.model.layers:
        fully_shard(layer, ignored_params=ignored)
    fully_shard(model, ignored_params=ignored)
    adapted = [m for m in model.modules() if isinstance(m, shirakit.AdapterLinear)]
    shards = [m.base_layer.weight.to_local().clone() for m in adapted] if not keep_adapted_whole else []
    record["losses"] = _torch_loop(model, model, rank, world)
    if method == "shira" and not keep_adapted_whole:
        record.update(_held_by_shira(adapted, shards))
    # Sharded adapter tensors are gathered while saving, a collective: every rank calls save_adapter
    # (each writes the same bytes, atomically).
    shirakit.save_adapter(model, out / "adapter")
    if method == "shira" and not keep_adapted_whole:
        record.update(_merge_check(model, global_batch().chunk(world)[rank]))
    elif method == "lora" and not keep_adapted_whole:
        try:  # a dense delta cannot be added to a shard: refused, clearly, before any write
            shirakit.merge(model)
        except RuntimeError as exc:
            record["merge_error"] = str(exc)
    return model


def run_fsdp_logits(method: str, rank: int, world: int, record: dict, out: Path, dtype: torch.dtype) -> torch.nn.Module:
    """``fsdp`` in ``dtype``, then the trained model's logits on the global batch (an FSDP2 forward is
    collective: every rank runs it), written by rank 0 to ``logits.safetensors`` for the test to compare."""
    from safetensors.torch import save_file

    model = run_fsdp(method, rank, world, record, out, keep_adapted_whole=False, dtype=dtype)
    with torch.no_grad():
        logits = model.eval()(input_ids=global_batch()).logits
    if rank == 0:
        save_file({"logits": logits.contiguous()}, str(out / "logits.safetensors"))
    return model


def _held_by_shira(adapted, shards) -> dict:
    """After training: are the shards still the clean base, and what does each SHiRA adapter hold
    besides its values, over its (2, K) int32 indices and CSR row offsets (expected: nothing)?"""
    from tests.checks import held_bytes

    excess = [held_bytes(a) - 8 * a.shira_indices.shape[1] - 8 * (a.geometry.out_features + 1)
              for a in (m.adapters["default"] for m in adapted)]
    return {"shards_clean_after_training": all(torch.equal(m.base_layer.weight.to_local(), s)
                                               for m, s in zip(adapted, shards)),
            "shira_held_bytes_over_indices": max(excess)}


def _merge_check(model, ids) -> dict:
    """Merge into the local shards, compare with the unmerged forward, unmerge: shards bit-exact?"""
    bases = [m.base_layer.weight for m in model.modules() if isinstance(m, shirakit.AdapterLinear)]
    before = [w.to_local().clone() for w in bases]
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        shirakit.merge(model)
        changed = sum(not torch.equal(w.to_local(), b) for w, b in zip(bases, before))
        merged = model(input_ids=ids).logits
        shirakit.unmerge(model)
        again = model(input_ids=ids).logits
    return {"merge_diff": (merged - unmerged).abs().max().item(), "shards_changed_by_merge": changed,
            "unmerge_exact": all(torch.equal(w.to_local(), b) for w, b in zip(bases, before)),
            "after_unmerge_diff": (again - unmerged).abs().max().item()}


def run_fsdp_resume(method: str, rank: int, world: int, record: dict, out: Path) -> torch.nn.Module:
    """FSDP2 training interrupted after RESUME_AT steps: save on every rank, a fresh model loads the
    save, is sharded again and trains on; must equal the same restart in one process."""
    from torch.distributed.fsdp import fully_shard

    def sharded(model):
        for layer in model.model.layers:
            fully_shard(layer)
        return fully_shard(model)

    model = build(method)
    record["init"] = init_digest(model, method)
    model = sharded(model)
    optimizer, local, losses = optimizer_for(model), global_batch().chunk(world)[rank], []
    for step in range(STEPS):
        if step == RESUME_AT:
            model = sharded(resumed(model, out / "checkpoint"))
            optimizer = optimizer_for(model)
        loss = model(input_ids=local, labels=local).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(_mean_over_ranks(loss.item()))
    record["losses"] = losses
    shirakit.save_adapter(model, out / "adapter")
    return model


def run_fsdp_meta(method: str, rank: int, world: int, record: dict, out: Path) -> torch.nn.Module:
    """The model is never whole on a rank: built and injected on the meta device, sharded, given
    storage (to_empty), the base weights copied into each rank's shards, the adapter drawn by
    shirakit.reset_adapter_parameters; then trained as the ``fsdp`` job."""
    from torch.distributed.fsdp import fully_shard

    from shirakit.model.meta_init import copy_tensors

    # stands for the checkpoint on disk; the global RNG is then where build() leaves it (LoRA's seed)
    pretrained = tiny_llama(seed=0)
    rng = torch.get_rng_state()
    with torch.device("meta"):
        model = tiny_llama(seed=0)
    torch.set_rng_state(rng)
    shirakit.inject(model, CONFIGS[method]())
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    model.to_empty(device="cpu")
    bases = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()]
             if ".adapters." not in n and not n.startswith("shirakit_shared.")}  # the base model's own
    sources = dict([*pretrained.named_parameters(), *pretrained.named_buffers()])  # buffers: rotary inv_freq
    copy_tensors(bases, {n: sources[n.replace(".base_layer.", ".")] for n in bases}, "base model")
    record["meta_before_reset"] = _refusal(lambda: model(input_ids=global_batch()[:1]))
    shirakit.reset_adapter_parameters(model)
    record["init"] = init_digest(model, method) if method == "shira" else digest(  # whole tensors, as build()'s
        p.full_tensor() for p in model.parameters() if p.requires_grad)
    record["base_sharded"] = all(p.to_local().shape != p.shape for n, p in model.named_parameters()
                                 if n.endswith("q_proj.base_layer.weight"))
    adapted = [m for m in model.modules() if isinstance(m, shirakit.AdapterLinear)]
    # Meta tensors all have data pointer 0: once every layer here looked tied to every other, and
    # SHiRA / MiSS bat silently ran their (slower, costlier) additive paths instead of the weight's.
    record["weights_marked_shared"] = sum(bool(m.weight_shared_with) for m in adapted)
    shards = [m.base_layer.weight.to_local().clone() for m in adapted]
    record["losses"] = _torch_loop(model.train(), model, rank, world)
    if method == "shira":
        record.update(_held_by_shira(adapted, shards))
    shirakit.save_adapter(model, out / "adapter")
    return model


def _refusal(call) -> str:
    try:
        call()
    except RuntimeError as exc:
        return str(exc)
    return "no error"


def run_zero3(method: str, rank: int, world: int, record: dict, out: Path, release: bool = False,
              merge: bool = False) -> torch.nn.Module:
    """DeepSpeed ZeRO-3 (its CPU accelerator, gloo): every parameter, adapter ones included
    (persistence threshold 0), partitioned across ranks and gathered into the same Parameter around
    each module's forward and backward. Saving needs the whole tensors: inside
    ``deepspeed.zero.GatheredParameters`` (a collective). ``release``: no prefetch and no reuse
    distance, so every weight is released after its forward and gathered again (clean) for its
    backward (by default a small model's weights stay gathered from forward to backward). ``merge``:
    then :func:`check_zero3_merge`."""
    import deepspeed

    model = build(method)
    record["init"] = init_digest(model, method)
    config = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // world, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                    **({"stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0,
                                        "stage3_max_live_parameters": 0} if release else {})},
              "zero_allow_untested_optimizer": True}
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, optimizer=optimizer_for(model),
                                           config=config)
    weight = model.model.layers[0].self_attn.q_proj.base_layer.weight
    record["partitioned"] = weight.numel() == 0 and hasattr(weight, "ds_id")
    local, losses = global_batch().chunk(world)[rank], []
    for _ in range(STEPS):
        loss = engine(input_ids=local, labels=local).loss
        engine.backward(loss)
        engine.step()
        losses.append(_mean_over_ranks(loss.item()))
    record["losses"] = losses
    everything = list(model.parameters())
    with deepspeed.zero.GatheredParameters(everything):
        record["trained"] = digest(shirakit.adapter_state_dict(model).values())
        if rank == 0:
            shirakit.save_adapter(model, out / "adapter")
    if merge:
        check_zero3_merge(model, record)
    return model


def check_zero3_merge(model: torch.nn.Module, record: dict) -> None:
    """After ZeRO-3 training: logits of the model with the adapter active; merged (shirakit gathers
    each weight and writes it back into the partitions); unmerged; merged inside a user's
    GatheredParameters (refused); merge_and_unload. Records the largest logit differences from the
    active adapter's and whether the base weights came back bit-exact after unmerge."""
    import deepspeed

    x = global_batch()[:2]
    model.eval()

    def logits() -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=x).logits

    def base_digest() -> str:
        weights = [m.base_layer.weight for m in model.modules() if isinstance(m, shirakit.AdapterLinear)]
        with deepspeed.zero.GatheredParameters(weights):
            return digest(weights)

    active, base = logits(), base_digest()
    shirakit.merge(model)
    record["merged_diff"] = (logits() - active).abs().max().item()
    record["merged_base_changed"] = base_digest() != base
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        record["unmerge_inside_gathered"] = _refusal(lambda: shirakit.unmerge(model))
    shirakit.unmerge(model)
    record["unmerged_diff"] = (logits() - active).abs().max().item()
    record["unmerged_base_exact"] = base_digest() == base
    model = shirakit.merge_and_unload(model)
    record["unloaded_diff"] = (logits() - active).abs().max().item()


def run_accelerate(method: str, rank: int, world: int, record: dict, out: Path) -> torch.nn.Module:
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    accelerator = Accelerator(cpu=True)
    model = build(method)
    record["init"] = init_digest(model, method)
    rows = [{"input_ids": row, "labels": row} for row in global_batch()]
    # per-process batch = half the global batch; accelerate gives process i the i-th batch of each round
    loader = DataLoader(rows, batch_size=GLOBAL_BATCH // world, shuffle=False)
    wrapped, optimizer, loader = accelerator.prepare(model, optimizer_for(model), loader)
    record["wrapped"] = type(wrapped).__name__
    losses = []
    while len(losses) < STEPS:
        for batch in loader:  # one round of batches = one global batch = one step
            loss = wrapped(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(_mean_over_ranks(loss.item()))
    record["losses"] = losses
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(wrapped)
    if accelerator.is_main_process:
        shirakit.save_adapter(model, out / "adapter")
    return model


RUNS = {
    "ddp": run_ddp,
    "accelerate": run_accelerate,
    "fsdp": lambda *a: run_fsdp(*a, keep_adapted_whole=False),
    "fsdp-ignored": lambda *a: run_fsdp(*a, keep_adapted_whole=True),
    "fsdp64": lambda *a: run_fsdp_logits(*a, dtype=torch.float64),
    "fsdp32": lambda *a: run_fsdp_logits(*a, dtype=torch.float32),
    "fsdp-resume": run_fsdp_resume,
    "fsdp-meta": run_fsdp_meta,
    "zero3": run_zero3,
    "zero3-release": lambda *a: run_zero3(*a, release=True),
    "zero3-merge": lambda *a: run_zero3(*a, merge=True),
}


def worker_args(jobs_help: str) -> argparse.Namespace:
    """A worker's command line (``--out DIR job ...``); one thread per rank, as the launchers run 2 ranks on 2 cores."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("jobs", nargs="+", help=jobs_help)
    args = parser.parse_args()
    torch.set_num_threads(1)
    return args


def main() -> None:
    import torch.distributed as dist

    args = worker_args(f"<mode>:<method>, mode in {sorted(RUNS)}, method in {sorted(CONFIGS)}")
    if all(job.startswith("accelerate:") for job in args.jobs):
        from accelerate import PartialState

        PartialState(cpu=True)  # accelerate sets the process group up itself (gloo on CPU)
    else:
        dist.init_process_group("gloo")  # torchrun set the env:// variables
    rank, world = dist.get_rank(), dist.get_world_size()
    for job in args.jobs:
        mode, method = job.split(":")

        def run(record: dict, out: Path, mode=mode, method=method) -> None:
            model = RUNS[mode](method, rank, world, record, out)
            if "trained" not in record:  # every rank's trained values (gathered under FSDP: every rank calls it)
                record["trained"] = digest(shirakit.adapter_state_dict(model).values())

        run_and_record(job, args.out / job.replace(":", "-"), run)
    dist.destroy_process_group()


def run_and_record(job: str, out: Path, run) -> None:
    """``run(record, out)`` on this rank; ``record`` (with the error, if it raised: FSDP + SHiRA
    must refuse clearly, and the test shows what failed) goes to ``out/rank<r>.json``; then all
    ranks meet at a barrier, so no rank starts the next job while another still writes."""
    import torch.distributed as dist

    out.mkdir(parents=True, exist_ok=True)
    rank = dist.get_rank()
    record: dict = {"job": job, "rank": rank, "world": dist.get_world_size(), "backend": dist.get_backend()}
    try:
        run(record, out)
    except Exception as exc:  # recorded for the test to judge
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc()
    (out / f"rank{rank}.json").write_text(json.dumps(record, indent=1))
    dist.barrier()


if __name__ == "__main__":
    main()
