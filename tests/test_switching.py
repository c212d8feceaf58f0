"""Fused-mode switching, fusion of adapters, orthogonality metrics."""

from __future__ import annotations

import random

import pytest
import torch

import shirakit
from shirakit.core.state import adapter_layers
from shirakit.model.fusion import combine_adapters
from shirakit.model.metrics import adapter_orthogonality
from shirakit.model.switch import switch_adapter
from tests.models import MODELS, TARGETS, inputs, output


def _with_adapters(names, make):
    model = MODELS["llama"]()
    for i, name in enumerate(names):
        torch.manual_seed(100 + i)
        shirakit.inject(model, make(i), name)
    return model


def _shira(i):
    return shirakit.ShiraConfig(r=2, target_modules=TARGETS["llama"], init_weights=False, random_seed=i)


def _lora(i):
    return shirakit.LoraConfig(r=2 + i, lora_alpha=4, target_modules=TARGETS["llama"], init_lora_weights=False)


def _raw_weights(model):
    """The weights as stored right now (not through state_dict, which restores live values)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".adapters." not in n}


def test_thousand_random_switches_keep_the_base_bit_identical():
    names = ["a", "b", "c", "d"]
    model = _with_adapters(names, _shira)
    ids = inputs()
    expected = {}
    for name in names:
        shirakit.set_adapter(model, name)
        expected[name] = output(model, ids)
    shirakit.set_adapter(model, names)
    shirakit.unmerge(model)
    before = _raw_weights(MODELS["llama"]())  # a pristine copy of the base
    rng = random.Random(0)
    for step in range(1000):
        name = rng.choice(names + [None])
        switch_adapter(model, name)
        if step % 125 == 0 and name is not None:
            torch.testing.assert_close(output(model, ids), expected[name], atol=1e-5, rtol=1e-5)
    switch_adapter(model, None)
    after = {n.replace(".base_layer.", "."): w for n, w in _raw_weights(model).items()}
    assert set(after) == set(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_switch_falls_back_for_lora():
    names = ["a", "b"]
    model = _with_adapters(names, _lora)
    ids = inputs()
    shirakit.set_adapter(model, "b")
    expected_b = output(model, ids)
    switch_adapter(model, "a")
    switch_adapter(model, "b")
    torch.testing.assert_close(output(model, ids), expected_b, atol=1e-5, rtol=1e-5)
    assert all(layer.merged == ["b"] for _, layer in adapter_layers(model))


def test_switch_rejects_unknown_name():
    model = _with_adapters(["a"], _shira)
    with pytest.raises(KeyError, match="unknown adapter"):
        switch_adapter(model, "zzz")


@pytest.mark.parametrize("make", [_shira, _lora], ids=["shira", "lora"])
def test_combine_equals_weighted_sum(make, tmp_path):
    model = _with_adapters(["a", "b"], make)
    ids = inputs()
    shirakit.set_scale(model, "a", 0.5)
    combine_adapters(model, ["a", "b"], [2.0, -1.0], "ab")
    deltas = {k: shirakit.delta_weights(model, k) for k in ("a", "b", "ab")}
    for layer, d in deltas["ab"].items():
        torch.testing.assert_close(d, 2.0 * deltas["a"][layer] - deltas["b"][layer], atol=1e-6, rtol=1e-5)
    fused = output(model, ids)
    shirakit.merge(model, ["ab"])
    torch.testing.assert_close(output(model, ids), fused, atol=1e-5, rtol=1e-5)
    shirakit.unmerge(model)
    shirakit.save_adapter(model, tmp_path, "ab")
    peft = pytest.importorskip("peft")
    pm = peft.PeftModel.from_pretrained(MODELS["llama"](), tmp_path).eval()
    torch.testing.assert_close(output(pm, ids), fused, atol=1e-5, rtol=1e-5)


def test_combine_unit_weights_equals_both_active():
    model = _with_adapters(["a", "b"], _shira)
    ids = inputs()
    shirakit.set_adapter(model, ["a", "b"])
    both = output(model, ids)
    combine_adapters(model, ["a", "b"], [1.0, 1.0], "ab")
    torch.testing.assert_close(output(model, ids), both, atol=1e-5, rtol=1e-5)


def test_combine_refuses_mixed_methods():
    model = _with_adapters(["a"], _shira)
    shirakit.inject(model, _lora(0), "b")
    with pytest.raises(ValueError, match="one method"):
        combine_adapters(model, ["a", "b"], [1.0, 1.0], "ab")


@pytest.mark.parametrize("make", [_shira, _lora], ids=["shira", "lora"])
def test_orthogonality_matches_dense_brute_force(make):
    model = _with_adapters(["a", "b"], make)
    rows = adapter_orthogonality(model, "a", "b")
    da, db = shirakit.delta_weights(model, "a"), shirakit.delta_weights(model, "b")
    assert [r.layer for r in rows] == list(da)
    for row in rows:
        product = da[row.layer].T @ db[row.layer]
        n = product.shape[0]
        assert row.awom == pytest.approx(float(product.norm()), rel=1e-4)
        assert row.awor == pytest.approx(1 - int((product != 0).sum()) / (n * n))
    if make is _shira:  # sparse adapters are far more orthogonal than low-rank ones
        assert min(r.awor for r in rows) > 0.0
    else:
        assert max(r.awor for r in rows) < 0.01


def test_compact_file_is_small_lossless_and_detected(tmp_path):
    model = _with_adapters(["a"], _shira)
    ids = inputs()
    expected = output(model, ids)
    shirakit.save_adapter(model, tmp_path / "peft", "a")
    shirakit.save_adapter(model, tmp_path / "compact", "a", compact=True)
    values = shirakit.trainable_parameters(model)[0]
    compact_bytes = (tmp_path / "compact" / "adapter_model.safetensors").stat().st_size
    peft_bytes = (tmp_path / "peft" / "adapter_model.safetensors").stat().st_size
    header = 8 + int.from_bytes((tmp_path / "compact" / "adapter_model.safetensors").read_bytes()[:8], "little")
    assert (compact_bytes - header) <= 6 * values + 16 * 14  # 14 layers may each hold an empty far table
    assert compact_bytes < peft_bytes
    for layout in ("peft", "compact"):
        fresh = MODELS["llama"]()
        shirakit.load_adapter(fresh, tmp_path / layout)
        torch.testing.assert_close(output(fresh, ids), expected, atol=0, rtol=0)


def test_compact_codec_handles_far_gaps():
    from shirakit.methods.shira.compact import decode, encode

    rows = torch.tensor([0, 0, 3, 70000 // 10, 99999 // 10])
    cols = torch.tensor([1, 5, 2, 0, 9])
    indices = torch.stack([rows, cols])
    values = torch.randn(5)
    packed = encode(indices, values, in_features=10)
    assert packed["shira_index_far"].shape[1] == 1
    back = decode(packed, in_features=10, source="test")
    assert torch.equal(back["shira_indices"], indices) and torch.equal(back["shira_weight"], values)


def test_compact_corrupt_far_table_is_rejected(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _with_adapters(["a"], _shira)
    shirakit.save_adapter(model, tmp_path, "a", compact=True)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith("shira_index_far"))
    tensors[key] = torch.tensor([[10**6], [3]])
    save_file(tensors, str(path), metadata={"format": "pt", "shirakit_format": "compact-v1"})
    with pytest.raises(ValueError, match="points outside"):
        shirakit.load_adapter(MODELS["llama"](), tmp_path)


def test_load_straight_into_fused_mode(tmp_path):
    model = _with_adapters(["a"], _shira)
    ids = inputs()
    expected = output(model, ids)
    shirakit.save_adapter(model, tmp_path, "a", compact=True)
    fresh = MODELS["llama"]()
    shirakit.load_adapter(fresh, tmp_path, "a", merge=True)
    assert all(layer.merged == ["a"] for _, layer in adapter_layers(fresh))
    torch.testing.assert_close(output(fresh, ids), expected, atol=0, rtol=0)


def test_combine_that_cannot_fit_a_small_layer_names_it():
    """Two r=2 masks (24 of a 4x8 weight's 32 entries each) together hold more than 24 positions, so the combined
    file needs r=3: K = 36 > 32 entries. A clear error naming the layer; both inputs stay loaded."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    for i, name in enumerate(["a", "b"]):
        shirakit.inject(model, shirakit.ShiraConfig(r=2, target_modules=["0"], random_seed=i), name)
    with pytest.raises(ValueError, match=r"layer '0'.*smaller r"):
        combine_adapters(model, ["a", "b"], [1.0, 1.0], "ab")
    assert [set(layer.adapters) for _, layer in adapter_layers(model)] == [{"a", "b"}]
