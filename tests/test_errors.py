"""Bad input gets a clear exception naming what was expected and what was found; nothing half-done."""

from __future__ import annotations

import json
import os

import pytest
import torch

import shirakit
from shirakit.io.checkpoint import WEIGHTS_NAME
from shirakit.io.folder import CONFIG_NAME
from tests.checks import assert_load_fails, edit_weights
from tests.models import MODELS, inputs, output

Q = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture
def saved(save_adapter_folder):
    return save_adapter_folder(shirakit.ShiraConfig(r=2, target_modules=["q_proj"], init_weights=False))


def test_missing_key(saved):
    edit_weights(saved, lambda t: t.pop(f"{Q}.shira_weight"))
    assert_load_fails(saved, r"adapter_model.safetensors: missing 1 key.*q_proj.shira_weight")


def test_unexpected_key(saved):
    edit_weights(saved, lambda t: t.update({"base_model.model.bogus.weight": torch.zeros(2)}))
    assert_load_fails(saved, "unexpected key.*bogus")


def test_wrong_shape(saved):
    edit_weights(saved, lambda t: t.update({f"{Q}.shira_weight": torch.zeros(7)}))
    assert_load_fails(saved, r"q_proj.shira_weight.*expected shape \(256,\), found \(7,\)")


def test_wrong_dtype(saved):
    edit_weights(saved, lambda t: t.update({f"{Q}.shira_indices": t[f"{Q}.shira_indices"].float()}))
    assert_load_fails(saved, r"shira_indices.*expected an integer tensor.*found torch.float32")


def test_index_out_of_range(saved):
    def bad(t):
        t[f"{Q}.shira_indices"][1, 5] = 64
    edit_weights(saved, bad)
    assert_load_fails(saved, "out of range")


def test_duplicated_index(saved):
    def bad(t):
        t[f"{Q}.shira_indices"][:, 1] = t[f"{Q}.shira_indices"][:, 0]
    edit_weights(saved, bad)
    assert_load_fails(saved, "duplicated index")


def test_wrong_index_count(saved):
    edit_weights(saved, lambda t: t.update({f"{Q}.shira_indices": t[f"{Q}.shira_indices"][:, :-3].contiguous()}))
    assert_load_fails(saved, "expected K = r\\*\\(in\\+out\\) = 256 indices, found 253")


def test_non_finite(saved):
    def bad(t):
        t[f"{Q}.shira_weight"][3] = float("nan")
    edit_weights(saved, bad)
    assert_load_fails(saved, "non-finite")


def test_corrupt_file(saved):
    path = saved / WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[:100])
    assert_load_fails(saved, "not a readable safetensors file")


def test_garbage_header(saved):
    (saved / WEIGHTS_NAME).write_bytes(b"\xff" * 8 + b"{not json")
    assert_load_fails(saved, "not a readable safetensors file")


def test_unknown_peft_type(saved):
    cfg = json.loads((saved / CONFIG_NAME).read_text())
    cfg["peft_type"] = "NOPE"
    (saved / CONFIG_NAME).write_text(json.dumps(cfg))
    assert_load_fails(saved, "unknown peft_type 'NOPE'")


def test_bad_json(saved):
    (saved / CONFIG_NAME).write_text("{")
    assert_load_fails(saved, "adapter_config.json: not valid JSON")


def test_unsupported_peft_feature(tmp_path):
    model = MODELS["llama"]()
    shirakit.inject(model, shirakit.LoraConfig(r=2, target_modules=["q_proj"]))
    shirakit.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    cfg["use_dora"] = True
    (tmp_path / CONFIG_NAME).write_text(json.dumps(cfg))
    assert_load_fails(tmp_path, "'use_dora' = True asks for a PEFT feature")


def test_missing_directory(tmp_path):
    assert_load_fails(tmp_path / "nowhere", "no adapter config here")


def test_failed_load_keeps_existing_adapters(saved):
    model = MODELS["llama"]()
    shirakit.inject(model, shirakit.LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False), "mine")
    before = output(model, inputs())
    edit_weights(saved, lambda t: t.pop(f"{Q}.shira_weight"))
    with pytest.raises(ValueError, match="missing"):
        shirakit.load_adapter(model, saved, "other")
    assert list(model.shirakit.configs) == ["mine"] and shirakit.active_adapters(model) == ["mine"]
    assert torch.equal(output(model, inputs()), before)


def test_atomic_save_leaves_old_file(saved, monkeypatch):
    model = MODELS["llama"]()
    shirakit.inject(model, shirakit.ShiraConfig(r=2, target_modules=["q_proj"]))
    old = (saved / WEIGHTS_NAME).read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        shirakit.save_adapter(model, saved)
    assert (saved / WEIGHTS_NAME).read_bytes() == old
    assert sorted(p.name for p in saved.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]


def test_unknown_adapter_names():
    model = MODELS["llama"]()
    shirakit.inject(model, shirakit.LoraConfig(r=2, target_modules=["q_proj"]))
    for call in (lambda: shirakit.set_adapter(model, "x"), lambda: shirakit.save_adapter(model, "/tmp/x", "x"),
                 lambda: shirakit.merge(model, ["x"]), lambda: shirakit.delete_adapter(model, "x"),
                 lambda: shirakit.set_scale(model, "x", 2.0)):
        with pytest.raises(KeyError, match=r"unknown adapter\(s\) \['x'\]; this model has \['default'\]"):
            call()


def test_target_matching_nothing_lists_names():
    with pytest.raises(ValueError, match=r"matched no module.*'q_proj'"):
        shirakit.inject(MODELS["llama"](), shirakit.LoraConfig(target_modules=["nope"]))


def test_target_of_wrong_type():
    with pytest.raises(TypeError, match=r"LlamaRMSNorm"):
        shirakit.inject(MODELS["llama"](), shirakit.LoraConfig(target_modules=["input_layernorm"]))
    with pytest.raises(TypeError, match=r"embed_tokens \(Embedding\): VeraAdapter does not adapt embedding"):
        shirakit.inject(MODELS["llama"](), shirakit.VeraConfig(target_modules=["embed_tokens"]))


def test_shira_budget_too_large():
    with pytest.raises(ValueError, match="only 4096"):
        shirakit.inject(MODELS["llama"](), shirakit.ShiraConfig(r=40, target_modules=["q_proj"]))


def test_duplicate_adapter_name():
    model = MODELS["llama"]()
    shirakit.inject(model, shirakit.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already exists"):
        shirakit.inject(model, shirakit.LoraConfig(target_modules=["q_proj"]))


@pytest.mark.parametrize(
    "mask,match",
    [
        (lambda layer, r, g: torch.arange(5), "expected K = r\\*\\(in\\+out\\) = 256 indices, found 5"),
        (lambda layer, r, g: torch.zeros(256, dtype=torch.long), "duplicated index"),
        (lambda layer, r, g: torch.arange(256) + 64 * 64, "out of range"),
        (lambda layer, r, g: torch.rand(256), "expected integer indices"),
    ],
)
def test_custom_mask_validated(mask, match):
    with pytest.raises((ValueError, TypeError), match=match):
        shirakit.inject(MODELS["llama"](), shirakit.ShiraConfig(r=2, target_modules=["q_proj"], mask_fn=mask))


def test_bad_config_values():
    with pytest.raises(ValueError, match="r must be a positive int"):
        shirakit.LoraConfig(r=0)
    with pytest.raises(ValueError, match="unknown mask_type 'bogus'"):
        shirakit.ShiraConfig(mask_type="bogus")


def test_inference_mode_model_is_refused_clearly():
    with torch.inference_mode():
        inner = torch.nn.Linear(8, 8)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), inner)  # the first layer is fine, the second is not
    with pytest.raises(RuntimeError, match="inference_mode"):
        shirakit.inject(model, shirakit.LoraConfig(r=2, target_modules=["0", "1"]))
    assert all(type(m) is torch.nn.Linear for m in model)  # the wrapper made for layer 0 is gone again


def test_one_cache_variable_the_old_one_warns(monkeypatch, tmp_path):
    """SHIRAKIT_CACHE_DIR names the cache folder; SHIRAKIT_CACHE still works for one release, with a warning."""
    import warnings

    from shirakit.app.data import smollm2_cache

    monkeypatch.delenv("SHIRAKIT_CACHE_DIR", raising=False)
    monkeypatch.setenv("SHIRAKIT_CACHE", str(tmp_path / "old"))
    with pytest.warns(FutureWarning, match="SHIRAKIT_CACHE_DIR"):
        assert smollm2_cache() == tmp_path / "old" / "smollm2-135m"
    monkeypatch.setenv("SHIRAKIT_CACHE_DIR", str(tmp_path / "new"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert smollm2_cache() == tmp_path / "new" / "smollm2-135m"


@pytest.mark.parametrize("where", ["the path", "a parent"])
def test_save_onto_a_file_names_it(tmp_path, where):
    """save_adapter to a path that is a file (or under one): a FileExistsError naming it, nothing written."""
    model = MODELS["llama"]()
    shirakit.inject(model, shirakit.LoraConfig(r=2, target_modules=["q_proj"]))
    blocker = tmp_path / "adapter.bin"
    blocker.write_bytes(b"not a folder")
    target = blocker if where == "the path" else blocker / "sub" / "adapter"
    with pytest.raises(FileExistsError) as info:
        shirakit.save_adapter(model, target)
    text = str(info.value)
    assert f"cannot save an adapter to {str(target)!r}: {str(blocker)!r}" in text
    assert "exists and is a file" in text and "give a folder path" in text
    assert (where == "a parent") == ("a parent of" in text)
    assert blocker.read_bytes() == b"not a folder" and sorted(tmp_path.iterdir()) == [blocker]
