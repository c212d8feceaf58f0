"""Worker for tests/test_distributed.py: ``transformers.Trainer`` under ``accelerate launch`` with FSDP2.

The path most users take: an accelerate config file turns FSDP2 on (``fsdp_version: 2``), and the
training script is a plain Trainer script over a shirakit-injected model. Launched by the test (or
by hand) with the config that :func:`write_fsdp2_config` writes:

    python -m accelerate.commands.launch --config_file fsdp2.yaml --num_processes 2 \\
        --main_process_port 29502 tests/dist_trainer_worker.py --out /tmp/fsdp2-trainer shira-sgd lora-sgd

A job is ``<method>-<optimizer>``: ``sgd`` (comparable with one process to fp32 tolerance) or
``adamw`` (Trainer's default optimizer, torch's fused AdamW). Each trains STEPS steps on the GLOBAL_BATCH
sequences (every step sees all of them, each rank half), then on every rank calls
``trainer.save_model(<job>/trainer)`` (Trainer's own save: the full state dict, gathered) and
``shirakit.save_adapter(model, <job>/adapter)``, and writes ``<job>/rank<r>.json``.
The test runs :func:`train` in one process on the whole batch and compares.

On CPU accelerate does not turn FSDP on by itself: see :func:`fsdp2_state_on_cpu`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script by accelerate: make `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import shirakit  # noqa: E402
from tests.dist_worker import run_and_record, worker_args  # noqa: E402
from tests.models import inputs, tiny_llama  # noqa: E402

STEPS = 3
GLOBAL_BATCH = 8
FSDP2_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: 2
machine_rank: 0
mixed_precision: 'no'
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_reshard_after_forward: true
  fsdp_offload_params: false
  fsdp_cpu_ram_efficient_loading: false
"""


def write_fsdp2_config(path: Path) -> Path:
    """The accelerate config file the test launches with (what ``accelerate config`` would write)."""
    path.write_text(FSDP2_CONFIG)
    return path


CONFIGS = {
    "shira": lambda: shirakit.ShiraConfig(r=4, target_modules="all-linear", random_seed=0),
    "lora": lambda: shirakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
}


# sgd: linear in the gradients, so the ranks' reduction order stays at float rounding (fp32 tolerance);
# adamw: Trainer's default optimizer (torch's fused AdamW), whose first steps amplify rounding.
OPTIMIZERS = {"sgd": {"optim": "sgd", "learning_rate": 0.5}, "adamw": {"learning_rate": 1e-2}}


def build(method: str) -> torch.nn.Module:
    """The same base and adapter on every rank (seeded base; SHiRA masks from random_seed; LoRA's
    A and B drawn from the RNG that tiny_llama seeded)."""
    model = tiny_llama(seed=0)
    shirakit.inject(model, CONFIGS[method]())
    return model


def rows() -> list[dict[str, torch.Tensor]]:
    """GLOBAL_BATCH fixed sequences, causal LM (labels = input_ids): one step sees all of them, so
    the sampler's order cannot change a step's mean loss."""
    return [{"input_ids": r, "labels": r} for r in inputs(seed=3, batch=GLOBAL_BATCH, length=12)]


def train(job: str, out: Path, *, processes: int, configured_state: bool):
    """Trainer over ``build(method)``, per-device batch GLOBAL_BATCH / processes. Returns the trainer
    and the logged losses (Trainer averages them over ranks)."""
    from transformers import Trainer, TrainingArguments

    method, optimizer = job.split("-")
    args = TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=GLOBAL_BATCH // processes,
        lr_scheduler_type="constant", report_to=[], use_cpu=True, logging_steps=1, disable_tqdm=True,
        save_strategy="no", seed=0, accelerator_config={"use_configured_state": configured_state},
        **OPTIMIZERS[optimizer],
    )
    trainer = Trainer(model=build(method).train(), args=args, train_dataset=rows())
    trainer.train()
    return trainer, [e["loss"] for e in trainer.state.log_history if "loss" in e]


def fsdp2_state_on_cpu() -> None:
    """Set accelerate's process state up as FSDP (from the launch config) on CPU processes (gloo).

    accelerate enables FSDP only for accelerator process groups (its ``AcceleratorState`` switches
    to ``DistributedType.FSDP`` for MULTI_GPU/NPU/XPU/... and never for MULTI_CPU); on a CPU-only
    machine the same launch silently runs Trainer as DDP (``use_cpu=True``) or as unconnected
    single processes. So: build the state as accelerate does on CPU (MULTI_CPU on gloo), with the
    FSDP plugin it reads from the launcher's environment (``FSDP_VERSION=2``, ...), and mark it FSDP.
    Trainer then uses this state (``accelerator_config={"use_configured_state": True}``) and all of
    the FSDP2 work -- ``fully_shard`` per decoder layer and at the root, the optimizer over DTensors,
    the gathered full state dict at ``save_model`` -- is accelerate's and Trainer's own code.
    Not needed on GPUs."""
    from accelerate import PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, TorchDynamoPlugin

    partial = PartialState(cpu=True)
    if partial.distributed_type != DistributedType.MULTI_CPU:
        raise RuntimeError(f"expected accelerate's MULTI_CPU state, found {partial.distributed_type}")
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables accelerate launch set
    state = AcceleratorState(cpu=True, dynamo_plugin=TorchDynamoPlugin(), fsdp_plugin=plugin, _from_accelerator=True)
    # AcceleratorState copies PartialState's fields each time it is built (Trainer builds it again)
    partial.distributed_type = state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin


def run_job(job: str, out: Path, rank: int, world: int, record: dict) -> None:
    from torch.distributed.tensor import DTensor

    trainer, losses = train(job, out / "run", processes=world, configured_state=True)
    model = trainer.model
    weight = model.model.layers[0].self_attn.q_proj.base_layer.weight
    record.update(
        losses=losses, distributed_type=str(trainer.accelerator.distributed_type),
        fsdp_version=trainer.accelerator.state.fsdp_plugin.fsdp_version, wrapped=type(trainer.model_wrapped).__name__,
        base_weight_sharded=isinstance(weight, DTensor) and tuple(weight.to_local().shape) != tuple(weight.shape),
    )
    trainer.save_model(str(out / "trainer"))  # every rank: the full state dict is gathered (a collective)
    shirakit.save_adapter(model, out / "adapter")  # every rank: gathers the adapter's shards, rank 0 writes


def main() -> None:
    import torch.distributed as dist

    args = worker_args(f"<method>-<optimizer>: {sorted(CONFIGS)} x {sorted(OPTIMIZERS)}")
    fsdp2_state_on_cpu()
    rank, world = dist.get_rank(), dist.get_world_size()
    for job in args.jobs:
        run_and_record(job, args.out / job, lambda record, out, job=job: run_job(job, out, rank, world, record))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
