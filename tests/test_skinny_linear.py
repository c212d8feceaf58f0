"""serve/skinny_linear.py: few-row linears as (W x^T)^T and many-row ones through oneDNN, chosen
per weight shape by measurement."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

import shirakit
from shirakit.serve.skinny_linear import (
    MANY_ROWS,
    PACKED_FROM_ROWS,
    ROW_COUNTS,
    LinearForms,
    calibrate,
    calibrate_many,
    drop_skinny_linears,
    fastest_ratios,
    install_linear_forms,
    onednn_available,
    skinny_candidate,
    skinny_forward,
    use_skinny_linears,
)
from tests.models import inputs, tiny_llama


def _layer(out_features=48, in_features=40, bias=True, rows_limit=64, onednn_from=0, seed=0,
           packed_from=0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias)
    layer.skinny_rows, layer.onednn_rows, layer.packed_rows = rows_limit, onednn_from, packed_from
    return layer


needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 40), (2, 40), (3, 5, 40), (64, 40), (65, 40), (2, 0, 40)])
def test_equals_the_float64_product_for_every_row_count(shape, bias):
    layer = _layer(bias=bias)
    x = torch.randn(shape)
    got = skinny_forward(layer, x)
    want = nn.functional.linear(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())
    assert got.shape == (*shape[:-1], 48) and got.is_contiguous()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(100, 40), (2, 50, 40), (300, 40)])
def test_onednn_from_its_rows_up_equals_the_float64_product(shape, bias):
    layer = _layer(bias=bias, rows_limit=8, onednn_from=100)
    x = torch.randn(shape)
    with torch.inference_mode():
        got = skinny_forward(layer, x)
    want = nn.functional.linear(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())
    assert got.shape == (*shape[:-1], 48) and got.is_contiguous()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_packed_weight_equals_the_product_and_follows_writes_into_the_weight():
    """The packed copy is made once the weight has stayed the same for two calls, and remade after
    the weight is written (SHiRA's fused switch) or replaced; until then another form answers."""
    layer = _layer(rows_limit=8, packed_from=4)
    x = torch.randn(6, 40)

    def check():
        with torch.inference_mode():
            got = skinny_forward(layer, x)
        want = nn.functional.linear(x.double(), layer.weight.double(), layer.bias.double())
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)

    check()  # first call: W x^T (nothing packed yet)
    assert "_packed_weight" not in layer.__dict__
    check()  # the weight stayed: packed now
    packed = layer._packed_weight
    check()
    assert layer._packed_weight is packed  # reused, not remade per call
    with torch.no_grad():
        layer.weight[3, :5] += 1.0  # an in-place write, as a fused switch's scatter
    check()  # changed since the last call: another form, the copy not remade yet
    assert layer._packed_weight is packed
    check()  # settled again: repacked from the written values
    assert layer._packed_weight is not packed
    layer.weight = nn.Parameter(torch.randn(48, 40))  # replaced outright (load_state_dict(assign=True))
    check()
    check()
    assert layer._packed_weight[0] is layer.weight
    packed = layer._packed_weight
    layer.load_state_dict({"weight": torch.randn(48, 40), "bias": torch.randn(48)})  # copied in place
    check()
    check()
    assert layer._packed_weight is not packed and layer._packed_weight[0] is layer.weight
    with torch.no_grad():  # a routed step scatters an adapter in and back on every call: never packed
        for _ in range(3):
            packed = layer._packed_weight
            layer.weight.mul_(1.0)
            check()
            assert layer._packed_weight is packed
    with torch.enable_grad():  # under autograd: F.linear's graph, not the packed op
        y = skinny_forward(layer, x.requires_grad_())
        y.sum().backward()
        assert x.grad is not None


def test_under_autograd_many_rows_keep_f_linear_and_its_gradient():
    """oneDNN's op has no backward: a forward that records a graph takes F.linear (bit for bit)."""
    layer = _layer(rows_limit=8, onednn_from=100)
    x = torch.randn(120, 40, requires_grad=True)
    got = skinny_forward(layer, x)
    assert torch.equal(got, nn.functional.linear(x, layer.weight, layer.bias))
    got.sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


@pytest.mark.parametrize("shape", [(1, 40), (65, 40), (4, 40)])
def test_outside_its_rows_it_is_f_linear_bit_for_bit(shape):
    layer = _layer(rows_limit=3)  # 4 rows: over this layer's limit
    x = torch.randn(shape)
    assert torch.equal(skinny_forward(layer, x), nn.functional.linear(x, layer.weight, layer.bias))


def test_other_dtypes_and_devices_keep_f_linear():
    layer = _layer()
    x = torch.randn(8, 40, dtype=torch.float64)  # not the weight's dtype: F.linear's own error or promotion
    with pytest.raises(RuntimeError):
        skinny_forward(layer, x)
    assert not skinny_candidate(nn.Linear(4, 4, dtype=torch.bfloat16))
    assert not skinny_candidate(nn.Linear(4, 4, device="meta"))
    assert not skinny_candidate(type("MyLinear", (nn.Linear,), {})(4, 4))
    assert not skinny_candidate(nn.Conv1d(4, 4, 1))
    assert skinny_candidate(nn.Linear(4, 4))


def test_a_model_gives_the_same_logits_and_state_and_drop_restores_it():
    model = tiny_llama().eval()
    ids = inputs(batch=3, length=1)
    with torch.inference_mode():
        before = model(ids).logits
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    chosen = use_skinny_linears(model, most_rows=64, onednn_rows=MANY_ROWS if onednn_available() else 0,
                                packed_rows=0)
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert set(chosen) == {tuple(m.weight.shape) for m in layers}
    assert set(chosen.values()) == {LinearForms(64, MANY_ROWS if onednn_available() else 0)}
    assert all("forward" in m.__dict__ for m in layers)
    long_ids = inputs(batch=1, length=MANY_ROWS + 3)  # a prefill: oneDNN's rows
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)
        long_after = model(long_ids).logits
        drop_skinny_linears(model)
        long_before = model(long_ids).logits
        install_linear_forms(model, chosen)
    torch.testing.assert_close(long_after, long_before, rtol=1e-5, atol=1e-5)
    state = model.state_dict()
    assert state.keys() == keys.keys() and all(torch.equal(state[k], keys[k]) for k in keys)
    drop_skinny_linears(model)
    assert not any("forward" in m.__dict__ or hasattr(m, "skinny_rows") or hasattr(m, "onednn_rows") for m in layers)


def test_values_written_into_the_weight_are_seen_fused_shira_included():
    """In-weight adapters write into the weight while active: the skinny forward reads it per call,
    at few rows and at oneDNN's many."""
    plain, skinny = tiny_llama().eval(), tiny_llama().eval()
    use_skinny_linears(skinny, most_rows=64, onednn_rows=MANY_ROWS if onednn_available() else 0, packed_rows=0)
    config = shirakit.ShiraConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False, random_seed=3)
    for model in (plain, skinny):
        shirakit.inject(model, config, "a")
        shirakit.switch_adapter(model, "a")
    ids = inputs(batch=4, length=1)
    with torch.inference_mode():
        fused = skinny(ids).logits
        torch.testing.assert_close(fused, plain(ids).logits, rtol=1e-5, atol=1e-5)
        long_ids = inputs(batch=1, length=MANY_ROWS + 3)
        torch.testing.assert_close(skinny(long_ids).logits, plain(long_ids).logits, rtol=1e-5, atol=1e-5)
        shirakit.switch_adapter(skinny, None)
        assert not torch.allclose(skinny(ids).logits, fused, rtol=1e-4, atol=1e-4)  # the base again, not a copy


@needs_onednn
def test_fused_shira_through_the_packed_weights():
    plain, packed = tiny_llama().eval(), tiny_llama().eval()
    use_skinny_linears(packed, most_rows=0, onednn_rows=0, packed_rows=2)
    config = shirakit.ShiraConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False, random_seed=3)
    for model in (plain, packed):
        shirakit.inject(model, config, "a")
    ids = inputs(batch=4, length=1)
    for name in ("a", None, "a"):  # switches write into the weights between steps
        for model in (plain, packed):
            shirakit.switch_adapter(model, name)
        with torch.inference_mode():
            for _ in range(3):  # the first steps after a switch use another form, later ones the repacked copy
                torch.testing.assert_close(packed(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)
    assert any("_packed_weight" in m.__dict__ for m in packed.modules())
    drop_skinny_linears(packed)
    assert not any("_packed_weight" in m.__dict__ for m in packed.modules())


def test_calibration_answers_a_tried_row_count_for_every_shape():
    model = tiny_llama()
    chosen = use_skinny_linears(model)
    candidates = [m for m in model.modules() if skinny_candidate(m)]
    assert set(chosen) == {tuple(m.weight.shape) for m in candidates}
    assert {f.few for f in chosen.values()} <= {0, *ROW_COUNTS}
    assert {f.many for f in chosen.values()} <= {0, MANY_ROWS}
    assert {f.packed for f in chosen.values()} <= {0, *ROW_COUNTS}
    for layer in candidates:  # a layer has the row-count forward exactly when its shape won somewhere
        assert ("forward" in layer.__dict__) == any(chosen[tuple(layer.weight.shape)])
    assert set(calibrate([nn.Linear(8, 8), nn.Linear(8, 4)], repeats=1).values()) <= {0, *ROW_COUNTS}
    assert calibrate_many([nn.Linear(8, 8)], repeats=1) in {0, MANY_ROWS}


def test_the_engine_installs_them_on_cpu_and_can_leave_them_out(served_folders):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shirakit.serve import Engine

    model_dir = served_folders[0]
    for wanted in (True, False):
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        engine = Engine(model, AutoTokenizer.from_pretrained(model_dir), "tiny", skinny_linears=wanted)
        assert bool(engine.skinny_shapes) is wanted and bool(engine.fused_norms) is wanted
        if not wanted:
            assert not any("forward" in m.__dict__ for m in model.modules())
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    packed = Engine(model, AutoTokenizer.from_pretrained(model_dir), "tiny").skinny_shapes
    assert {f.packed for f in packed.values()} == {PACKED_FROM_ROWS if onednn_available() else 0}
    unpacked = Engine(model, AutoTokenizer.from_pretrained(model_dir), "tiny", packed_weights=False).skinny_shapes
    assert {f.packed for f in unpacked.values()} == {0}


def test_calibration_times_the_two_forms_in_alternating_pairs():
    calls = []

    def form(name, seconds):
        def run():
            calls.append(name)
            time.sleep(seconds)
            return {"shape": seconds}
        return run

    ratios = fastest_ratios(form("candidate", 0.002), form("anchor", 0.006), repeats=4)
    assert ratios == {"shape": pytest.approx(1 / 3)}  # the seconds each call reported, per key
    # warm-up, then pairs back to back, the order alternating so drift does not favour one form
    assert calls == ["candidate", "anchor"] + ["candidate", "anchor", "anchor", "candidate"] * 2
