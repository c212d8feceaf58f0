"""Adapters injected into a model built on the meta device (the FSDP2 large-model recipe), one process.

``inject`` on the meta device draws nothing (placeholders); after ``to_empty`` and loading the base
weights, ``reset_adapter_parameters`` draws what ``inject`` would have drawn on the real model:
same masks, values, shared projections and ``modules_to_save`` copies, same outputs. Until then
the model refuses to run or save. The FSDP2 (sharded, 2 processes) case is in test_distributed.py.
"""

from __future__ import annotations

import pytest
import torch

import shirakit
from tests.models import MODELS, TARGETS, inputs, output

CASES = {
    "shira": lambda t: shirakit.ShiraConfig(r=2, target_modules=t, random_seed=0, init_weights=False),
    "shira-wm": lambda t: shirakit.ShiraConfig(r=2, target_modules=t, mask_type="wm", random_seed=0,
                                               init_weights=False),
    "lora": lambda t: shirakit.LoraConfig(r=4, target_modules=t, init_lora_weights=False),
    "vera": lambda t: shirakit.VeraConfig(r=8, target_modules=t, init_weights=False),
    "miss": lambda t: shirakit.MissConfig(r=4, target_modules=t, init_random=True),
    "miss-bat": lambda t: shirakit.MissConfig(r=4, target_modules=t, init_weights="bat", init_random=True),
}


def injected(model_name: str, case: str, meta: bool, **extra) -> torch.nn.Module:
    """The model (real, or built on the meta device), then the adapter from the same RNG state."""
    if meta:
        with torch.device("meta"):
            model = MODELS[model_name]()
    else:
        model = MODELS[model_name]()
    torch.manual_seed(11)  # LoRA/VeRA/MiSS draw their seed from torch's RNG: the same on both sides
    config = CASES[case](TARGETS[model_name])
    for key, value in extra.items():
        setattr(config, key, value)
    return shirakit.inject(model, config)


@torch.no_grad()
def materialized(model: torch.nn.Module, real: torch.nn.Module) -> torch.nn.Module:
    """to_empty, then the base model's tensors from ``real`` (what loading a checkpoint does)."""
    model.to_empty(device="cpu")
    own = dict([*real.named_parameters(), *real.named_buffers()])
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if ".adapters." not in name and not name.startswith("shirakit_shared."):
            tensor.copy_(own[name])
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_reset_draws_what_inject_draws_on_the_real_model(case):
    real = injected("llama", case, meta=False)
    model = injected("llama", case, meta=True)
    assert all(p.is_meta for n, p in model.named_parameters() if ".adapters." in n)  # nothing drawn
    shirakit.reset_adapter_parameters(materialized(model, real))
    expected, found = shirakit.adapter_state_dict(real), shirakit.adapter_state_dict(model)
    assert found.keys() == expected.keys()
    for key in expected:
        assert torch.equal(found[key], expected[key]), key
    ids = inputs()
    torch.testing.assert_close(output(model, ids), output(real, ids), rtol=0, atol=0)


def test_reset_covers_modules_to_save_copies():
    real = injected("bert", "lora", meta=False, modules_to_save=["classifier"])
    model = injected("bert", "lora", meta=True, modules_to_save=["classifier"])
    shirakit.reset_adapter_parameters(materialized(model, real))
    expected, found = shirakit.adapter_state_dict(real), shirakit.adapter_state_dict(model)
    assert any("classifier" in k for k in expected)
    for key in expected:
        assert torch.equal(found[key], expected[key]), key


def test_reset_on_a_real_model_restores_the_initial_draw():
    model = injected("llama", "lora", meta=False)
    initial = {k: v.clone() for k, v in shirakit.adapter_state_dict(model).items()}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    shirakit.reset_adapter_parameters(model)
    for key, value in shirakit.adapter_state_dict(model).items():
        assert torch.equal(value, initial[key]), key


def test_undrawn_adapters_refuse_to_run_or_save(tmp_path):
    model = injected("llama", "shira", meta=True)
    with pytest.raises(RuntimeError, match="meta device.*reset_adapter_parameters"):
        model(input_ids=inputs())
    with pytest.raises(RuntimeError, match="cannot save the adapter.*reset_adapter_parameters"):
        shirakit.save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_reset_before_to_empty_is_refused():
    model = injected("llama", "shira", meta=True)
    with pytest.raises(ValueError, match="still on the meta device.*to_empty"):
        shirakit.reset_adapter_parameters(model)


def test_reset_of_a_loaded_adapter_is_refused(tmp_path):
    real = injected("llama", "lora", meta=False)
    shirakit.save_adapter(real, tmp_path)
    model = MODELS["llama"]()
    shirakit.load_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="came from a checkpoint.*load_adapter"):
        shirakit.reset_adapter_parameters(model)


def test_reset_of_a_merged_adapter_is_refused():
    model = injected("llama", "shira", meta=False)
    shirakit.merge(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        shirakit.reset_adapter_parameters(model)


@pytest.mark.parametrize("case", ["shira", "lora"])
def test_inject_inside_a_meta_device_context(case):
    """`with torch.device("meta"):` around both the model and inject (the seed is still drawn on CPU)."""
    real = injected("llama", case, meta=False)
    with torch.device("meta"):
        model = injected("llama", case, meta=True)
    shirakit.reset_adapter_parameters(materialized(model, real))
    expected, found = shirakit.adapter_state_dict(real), shirakit.adapter_state_dict(model)
    for key in expected:
        assert torch.equal(found[key], expected[key]), key
