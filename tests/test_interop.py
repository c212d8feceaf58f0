"""Files move both ways between shirakit and peft with identical outputs (peft is the oracle)."""

from __future__ import annotations

import pytest
import torch

import shirakit
from tests.models import MODELS, inputs, output

peft = pytest.importorskip("peft")

ROWS = [
    # (model, shirakit config, equivalent peft config)
    ("llama", lambda: shirakit.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                         init_lora_weights=False),
     lambda: peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                             init_lora_weights=False)),
    ("llama", lambda: shirakit.LoraConfig(r=8, lora_alpha=4, use_rslora=True, target_modules="all-linear",
                                         init_lora_weights=False),
     lambda: peft.LoraConfig(r=8, lora_alpha=4, use_rslora=True, target_modules="all-linear",
                             init_lora_weights=False)),
    ("gpt2", lambda: shirakit.LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                        init_lora_weights=False),
     lambda: peft.LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights=False)),
    ("bert", lambda: shirakit.LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"],
                                        init_lora_weights=False),
     lambda: peft.LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"],
                             init_lora_weights=False)),
    ("llama", lambda: shirakit.ShiraConfig(r=2, target_modules=["q_proj", "up_proj"], init_weights=False),
     lambda: peft.ShiraConfig(r=2, target_modules=["q_proj", "up_proj"], init_weights=False)),
    ("bert", lambda: shirakit.ShiraConfig(r=2, target_modules=["query", "dense"], modules_to_save=["classifier"],
                                         init_weights=False),
     lambda: peft.ShiraConfig(r=2, target_modules=["query", "dense"], modules_to_save=["classifier"],
                              init_weights=False)),
]
IDS = ["lora-llama", "rslora-all-linear", "lora-gpt2-conv1d", "lora-bert-head", "shira-llama", "shira-bert-head"]


def _randomize_heads(model):
    """modules_to_save copies start equal to the original; change them so the test sees them."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "classifier" in name and p.requires_grad:
                p.add_(torch.randn_like(p))


@pytest.mark.parametrize("model_name,ours,theirs", ROWS, ids=IDS)
def test_peft_file_loads_into_shirakit(model_name, ours, theirs, tmp_path):
    ids = inputs()
    torch.manual_seed(7)
    pm = peft.get_peft_model(MODELS[model_name](), theirs())
    _randomize_heads(pm)
    pm.eval()
    expected = output(pm, ids)
    pm.save_pretrained(tmp_path)
    model = MODELS[model_name]()
    shirakit.load_adapter(model, tmp_path)
    torch.testing.assert_close(output(model, ids), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("model_name,ours,theirs", ROWS, ids=IDS)
def test_shirakit_file_loads_into_peft(model_name, ours, theirs, tmp_path):
    ids = inputs()
    model = MODELS[model_name]()
    shirakit.inject(model, ours())
    _randomize_heads(model)
    expected = output(model, ids)
    shirakit.save_adapter(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(MODELS[model_name](), tmp_path)
    pm.eval()
    torch.testing.assert_close(output(pm, ids), expected, atol=1e-6, rtol=1e-6)


def test_saved_shira_file_has_peft_layout(tmp_path):
    from safetensors.torch import load_file

    model = MODELS["llama"]()
    shirakit.inject(model, shirakit.ShiraConfig(r=2, target_modules=["q_proj"]))
    shirakit.save_adapter(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.shira_indices"
    assert tensors[key].dtype == torch.int32 and tensors[key].shape == (2, 2 * (64 + 64))
    assert tensors[key.replace("indices", "weight")].shape == (2 * (64 + 64),)
