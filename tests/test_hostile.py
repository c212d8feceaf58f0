"""Hostile and broken configs and files: each is refused with an error naming the file and the field,
before anything is allocated from the config, and the model is left as it was."""

from __future__ import annotations

import importlib
import json
import os

import pytest
import torch

import shirakit
from shirakit.io.checkpoint import WEIGHTS_NAME
from shirakit.io.folder import CONFIG_NAME
from tests.checks import assert_load_fails, assert_untouched, edit_weights
from tests.models import MODELS, inputs, output

INJECT = importlib.import_module("shirakit.model.inject")  # the module (shirakit.inject is the function)
Q = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture
def lora_dir(save_adapter_folder):
    return save_adapter_folder(shirakit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))


def edit_config(directory, **changes) -> None:
    data = json.loads((directory / CONFIG_NAME).read_text())
    data.update(changes)
    (directory / CONFIG_NAME).write_text(json.dumps(data))


def write_config_text(directory, text: str) -> None:
    (directory / CONFIG_NAME).write_text(text)


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"peft_type": ["LORA"]}, r"field 'peft_type': expected a string, found \['LORA'\]"),
        ({"target_modules": 7}, r"field 'target_modules': expected .*found 7 \(int\)"),
        ({"r": True}, r"field 'r': expected an int, found True \(bool\)"),
        ({"lora_alpha": "16"}, r"field 'lora_alpha': expected a number, found '16' \(str\)"),
        ({"use_rslora": "false"}, r"field 'use_rslora': expected a bool, found 'false' \(str\)"),
        ({"lora_alpha": 1e308}, r"field 'lora_alpha': expected a finite number.*found 1e\+308"),
        ({"r": 2**70}, r"field 'r': expected an integer that fits in 64 bits"),
        ({"target_modules": "(q_proj"}, r"field 'target_modules': '\(q_proj' is not a valid regular expression"),
        ({"target_modules": ".*q_proj", "layers_to_transform": [0]}, "layers_to_transform cannot be used when"),
        ({"layers_to_transform": ["0"]}, r"field 'layers_to_transform': expected a list of ints or an int"),
    ],
)
def test_wrong_config_types_are_named(lora_dir, changes, match):
    edit_config(lora_dir, **changes)
    assert_load_fails(lora_dir, rf"{CONFIG_NAME}.*{match}")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_json_constants_refused(lora_dir, constant):
    text = (lora_dir / CONFIG_NAME).read_text().replace('"lora_alpha": 8', f'"lora_alpha": {constant}')
    assert constant in text
    write_config_text(lora_dir, text)
    assert_load_fails(lora_dir, f"{CONFIG_NAME}: not valid JSON: {constant} is not a JSON number")


@pytest.mark.parametrize(
    "text,match",
    [
        ("[" * 100_000 + "]" * 100_000, "not valid JSON: nested too deeply"),
        ('{"peft_type": "LORA", "r": ' + "9" * 5000 + "}", "not valid JSON"),
        ("[1, 2]", "expected a JSON object, found list"),
        ('{"r": 4}', "expected a 'peft_type' key"),
    ],
    ids=["deep", "huge-int", "list", "no-type"],
)
def test_hostile_json_text(lora_dir, text, match):
    write_config_text(lora_dir, text)
    assert_load_fails(lora_dir, f"{CONFIG_NAME}: {match}")


def test_config_scalars_from_python():
    for bad in (float("nan"), float("inf"), 1e308, -1e7):
        with pytest.raises(ValueError, match="field 'lora_alpha': expected a finite number"):
            shirakit.LoraConfig(lora_alpha=bad)
    with pytest.raises(ValueError, match="field 'init_weights': expected a bool"):
        shirakit.ShiraConfig(init_weights="false")
    with pytest.raises(ValueError, match="layers_pattern cannot be used when target_modules is a string"):
        shirakit.MissConfig(target_modules=".*proj", layers_pattern="layers")
    assert shirakit.LoraConfig(target_modules=("v", "q"), layers_to_transform=(0, 1)).layers_to_transform == [0, 1]


def test_set_scale_refuses_non_finite():
    model = MODELS["llama"]()
    shirakit.inject(model, shirakit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    before = output(model, inputs())
    for bad in (float("nan"), float("inf"), "2"):
        with pytest.raises(ValueError, match="scale: expected"):
            shirakit.set_scale(model, "default", bad)
    assert torch.equal(output(model, inputs()), before)


def test_value_that_overflows_after_the_cast_is_refused(lora_dir):
    def to_float64_with_huge(t):
        value = t[f"{Q}.lora_A.weight"].double()
        value[0, 0] = 1e300  # finite in float64, inf in the adapter's float32
        t[f"{Q}.lora_A.weight"] = value
    edit_weights(lora_dir, to_float64_with_huge)
    assert_load_fails(lora_dir, r"lora_A.weight.*non-finite values \(nan or inf\) in torch.float32")


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64, torch.bool])
def test_unsupported_dtypes_are_named(lora_dir, dtype):
    edit_weights(lora_dir, lambda t: t.update({f"{Q}.lora_B.weight": t[f"{Q}.lora_B.weight"].to(dtype)}))
    assert_load_fails(lora_dir, rf"{WEIGHTS_NAME}.*lora_B.weight.*expected a float tensor.*found {dtype}")


def test_rank_checked_against_file_shapes_before_allocation(lora_dir):
    """r = 2**30 would need 256 GB per LoRA matrix: it must be refused by the file's shapes, not tried."""
    edit_config(lora_dir, r=2**30)
    assert_load_fails(lora_dir, r"lora_A.weight.*expected shape \(1073741824, 64\), found \(2, 64\)")


def test_redos_in_target_modules_is_bounded(lora_dir, monkeypatch):
    edit_config(lora_dir, target_modules="(.*.*)*z")  # the example: hangs Python's re forever
    assert_load_fails(lora_dir, "matched no module")
    edit_config(lora_dir, target_modules=".*q_proj")
    monkeypatch.setattr(INJECT, "REGEX_TIME_LIMIT", 0.0)  # every match is over the limit
    assert_load_fails(lora_dir, r"target_modules '\.\*q_proj' took too long to match")


@pytest.mark.parametrize("name", ["forward", "to", "training", "state_dict", "__base__", "a.b", ""])
def test_impossible_adapter_names_are_refused_up_front(lora_dir, name):
    model = MODELS["llama"]()
    base = output(model, inputs())
    with pytest.raises(ValueError, match="adapter_name"):
        shirakit.inject(model, shirakit.LoraConfig(r=2, target_modules=["q_proj"]), name)
    with pytest.raises(ValueError, match="adapter_name"):
        shirakit.load_adapter(model, lora_dir, name)
    assert_untouched(model, base)


@pytest.mark.parametrize("fail_in", ["set_adapter", "install_keyword_routing", "ModulesToSave.add_adapter"])
def test_inject_rolls_back_every_failure(monkeypatch, fail_in):
    model = MODELS["bert"]()
    base = output(model, inputs())

    def boom(*args, **kwargs):
        raise RuntimeError("injected failure")

    owner, _, attr = fail_in.rpartition(".")
    monkeypatch.setattr(getattr(INJECT, owner) if owner else INJECT, attr, boom)
    config = shirakit.LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS")
    with pytest.raises(RuntimeError, match="injected failure"):
        shirakit.inject(model, config)
    assert_untouched(model, base)
    assert not any(isinstance(m, shirakit.ModulesToSave) for m in model.modules())


def test_failed_second_inject_keeps_the_first(monkeypatch):
    model = MODELS["llama"]()
    shirakit.inject(model, shirakit.ShiraConfig(r=2, target_modules=["q_proj"], init_weights=False), "a")
    before = output(model, inputs())
    monkeypatch.setattr(INJECT, "set_adapter", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(RuntimeError):
        shirakit.inject(model, shirakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), "b")
    monkeypatch.undo()
    assert list(model.shirakit.configs) == ["a"] and shirakit.active_adapters(model) == ["a"]
    assert all("b" not in layer.adapters for _, layer in INJECT.adapter_layers(model))
    assert type(model.model.layers[0].self_attn.v_proj) is torch.nn.Linear
    assert torch.equal(output(model, inputs()), before)


@pytest.mark.parametrize("which", [CONFIG_NAME, WEIGHTS_NAME])
def test_fifo_is_refused_without_blocking(lora_dir, which):
    os.unlink(lora_dir / which)
    os.mkfifo(lora_dir / which)
    assert_load_fails(lora_dir, f"{which}: the adapter .* is not a regular file")


def test_symlinked_files_load(lora_dir, tmp_path_factory):
    """The Hugging Face cache stores files as symlinks into blobs/: they must keep working."""
    linked = tmp_path_factory.mktemp("linked")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        os.symlink(lora_dir / name, linked / name)
    base = output(MODELS["llama"](), inputs())
    model = shirakit.load_adapter(MODELS["llama"](), linked)
    reference = shirakit.load_adapter(MODELS["llama"](), lora_dir)
    assert not torch.allclose(output(model, inputs()), base), "the linked adapter changed nothing"
    assert torch.equal(output(model, inputs()), output(reference, inputs()))
