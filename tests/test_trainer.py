"""Training an injected model through ``transformers.Trainer`` (CPU, a few steps, tiny models).

What this guards:
- SHiRA and LoRA train under Trainer's defaults (its default optimizer is torch's *fused* AdamW,
  whose kernels do not bump parameter version counters: SHiRA must still re-scatter its values
  after every step), and the trained adapter round-trips through save_adapter / load_adapter;
- Trainer's own checkpoints (``save_strategy="steps"``: ``model.safetensors`` via save_pretrained)
  hold the clean base weights, do not perturb training, and resume exactly;
- activation (gradient) checkpointing: SHiRA's autograd Function under ``torch.utils.checkpoint``,
  both the non-reentrant (Trainer's default) and the reentrant variant.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

import shirakit
from tests.models import inputs, tiny_llama

STEPS = 4
FIELDS = {f.name for f in dataclasses.fields(TrainingArguments)}
# transformers 5 renamed gradient_checkpointing to activation_checkpointing (the old name warns)
CHECKPOINTING = "activation_checkpointing" if "activation_checkpointing" in FIELDS else "gradient_checkpointing"


class Tokens(Dataset):
    """16 fixed random sequences; causal LM with labels = input_ids."""

    def __init__(self, n: int = 16) -> None:
        self.ids = inputs(seed=3, batch=n, length=12)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def make_config(method: str):
    if method == "shira":
        return shirakit.ShiraConfig(r=4, target_modules="all-linear", random_seed=0)
    return shirakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)


def injected(method: str) -> torch.nn.Module:
    model = tiny_llama()
    shirakit.inject(model, make_config(method))
    return model


def train(model, out_dir, *, save_steps: int | None = None, resume: str | None = None, **extra):
    kwargs = dict(
        output_dir=str(out_dir), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], use_cpu=True, logging_steps=1, disable_tqdm=True, seed=0,
        save_strategy="steps" if save_steps else "no", **extra,
    )
    if save_steps:
        kwargs["save_steps"] = save_steps
    trainer = Trainer(model=model, args=TrainingArguments(**kwargs), train_dataset=Tokens())
    result = trainer.train(resume_from_checkpoint=resume)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return result, losses


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in shirakit.adapter_state_dict(model).items()}


@torch.no_grad()
def logits(model) -> torch.Tensor:
    model.eval()
    return model(input_ids=inputs(seed=7, batch=2, length=9)).logits


def assert_same_adapter(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=lambda m, k=key: f"{k}: {m}")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """method -> (model, losses, adapter before training), each trained once for the whole module."""
    cache = {}

    def get(method: str):
        if method not in cache:
            model = injected(method)
            before = snapshot(model)
            result, losses = train(model, tmp_path_factory.mktemp(f"{method}-run"))
            assert math.isfinite(result.training_loss)
            cache[method] = (model, losses, before)
        return cache[method]

    return get


@pytest.mark.parametrize("method", ["shira", "lora"])
def test_trainer_trains_and_round_trips(method, trained, tmp_path):
    model, losses, before = trained(method)
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    after = snapshot(model)
    floats = [k for k in after if after[k].dtype.is_floating_point]
    assert floats and all(not torch.equal(before[k], after[k]) for k in floats), "every adapter tensor must train"
    assert all(torch.equal(before[k], after[k]) for k in after if k not in floats)  # SHiRA indices stay fixed

    shirakit.save_adapter(model, tmp_path / "adapter")
    fresh = tiny_llama()
    shirakit.load_adapter(fresh, tmp_path / "adapter")
    assert_same_adapter(shirakit.adapter_state_dict(fresh), after)
    # The trained model's own forward (its live weight) matches the reloaded adapter's: no stale values.
    torch.testing.assert_close(logits(fresh), logits(model), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["shira", "miss-bat"])
def test_fused_optimizer_updates_reach_the_weight(method):
    """torch's fused AdamW does not bump version counters; adapters living in the weight (SHiRA,
    MiSS bat) must re-apply their values after its steps anyway."""
    ids = inputs(seed=3, batch=4, length=12)
    results = []
    for fused in (False, True):
        if method == "shira":
            model = injected("shira").train()
        else:
            model = tiny_llama()
            shirakit.inject(model, shirakit.MissConfig(r=4, target_modules="all-linear", init_weights="bat"))
            model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2, foreach=None if fused else False, fused=fused or None)
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        results.append((snapshot(model), logits(model)))
    (plain, out_plain), (fused_, out_fused) = results
    assert_same_adapter(plain, fused_, atol=1e-6)
    torch.testing.assert_close(out_fused, out_plain, rtol=0, atol=1e-5)


def test_trainer_checkpoints_hold_the_clean_base_and_resume(trained, tmp_path):
    reference, losses_plain, _ = trained("shira")
    model = injected("shira")
    _, losses_saving = train(model, tmp_path / "saving", save_steps=2)
    assert losses_saving == losses_plain, "saving a checkpoint must not change training"
    assert_same_adapter(snapshot(model), snapshot(reference))

    clean = tiny_llama().state_dict()
    saved = load_file(str(tmp_path / "saving" / "checkpoint-2" / "model.safetensors"))
    base = {k.replace(".base_layer.", "."): v for k, v in saved.items() if ".adapters." not in k}
    assert sorted(base) == sorted(clean)
    for key, value in base.items():
        assert torch.equal(value, clean[key]), f"{key}: the checkpoint must hold the clean base weight"
    assert any(k.endswith(".adapters.default.shira_weight") for k in saved)

    resumed = injected("shira")
    train(resumed, tmp_path / "resumed", resume=str(tmp_path / "saving" / "checkpoint-2"))
    assert_same_adapter(snapshot(resumed), snapshot(model))


@pytest.mark.parametrize("reentrant", [False, True])
def test_trainer_gradient_checkpointing_shira(reentrant, trained, tmp_path):
    reference, losses_reference, _ = trained("shira")
    model = injected("shira")
    _, losses = train(model, tmp_path / "gc", **{
        CHECKPOINTING: True, f"{CHECKPOINTING}_kwargs": {"use_reentrant": reentrant},
    })
    assert model.model.layers[0].gradient_checkpointing, "Trainer should have turned checkpointing on"
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(losses_reference), rtol=0, atol=1e-5)
    assert_same_adapter(snapshot(model), snapshot(reference), atol=1e-5)
