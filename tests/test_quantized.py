"""Adapters over a quantized base: every backend (bitsandbytes 4-bit NF4 and 8-bit, torchao's
weight-only kinds; CPU) in one parametrized test, then bitsandbytes' particulars (torchao's are in
tests/test_torchao.py).

The reference is the same network in fp32 holding the *dequantized* weights: an adapter over the
quantized layer must compute what it computes over those values, to 1e-5 (tests/quantized_bases.py).

SHiRA trains on a bitsandbytes base (CPU) by writing its values into the dense copy the library
dequantizes for each product (``dequantized_forward``), and additively (``base(x) + s x S^T``)
wherever that copy does not exist; both are checked against the reference, with no dense copy
outliving its product.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import shirakit
import shirakit.core.layer
import shirakit.core.quantized_weights
from tests.quantized_bases import (
    BACKENDS,
    CONFIGS,
    PAIRS,
    TOL,
    assert_adapters_close,
    bnb_pair,
    inject,
    spy_dense_copies,
    step_input_grads,
    train,
    train_keeping_no_copy,
)


def quantized_pair(kind: str) -> tuple[nn.Module, nn.Module]:
    pytest.importorskip("bitsandbytes")
    return bnb_pair(kind)


@pytest.mark.parametrize("backend,kind", BACKENDS, ids=[f"{b}-{k}" for b, k in BACKENDS])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_adapter_on_quantized_base_trains_like_the_dequantized_reference(backend, kind, method):
    """Every backend and kind: forward, 3 SGD steps and the input's gradient at each (a product that
    dropped it silently would leave only the adapter's share), against the fp32 reference."""
    pytest.importorskip(backend)
    quant, dense = PAIRS[backend](kind)
    for model in (quant, dense):
        inject(model, CONFIGS[method]())
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(quant(x), dense(x), rtol=0, atol=TOL)
    for got, want in zip(step_input_grads(quant, x), step_input_grads(dense, x)):
        assert got is not None and want.abs().max() > 1e-4
        torch.testing.assert_close(got, want, rtol=0, atol=TOL)
    assert_adapters_close(quant, dense)
    torch.testing.assert_close(quant(x), dense(x), rtol=0, atol=TOL)
    assert any(v.abs().max() > 1e-3 for v in shirakit.adapter_state_dict(quant).values() if v.is_floating_point())


@pytest.fixture
def dense_copies(monkeypatch):
    """Every dense copy the layers dequantize, as weak references (a live one is being kept)."""
    return spy_dense_copies(monkeypatch)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_shira_trains_in_the_dequantized_copy_like_the_reference_and_keeps_none(kind, dense_copies):
    """The dequantized-copy path: the reference's values after 5 SGD steps; every dense copy is
    made for one product and freed with it: per step, one per layer in the forward and one in the
    backward of layer 2 (layer 0's input needs no gradient, so its backward needs no weight)."""
    quant, dense = quantized_pair(kind)
    for model in (quant, dense):
        inject(model, CONFIGS["shira"]())
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    saved_numels = train_keeping_no_copy(quant, x, dense_copies)
    assert len(dense_copies) == 5 * 3
    assert max(saved_numels) < 64 * 128 // 4  # nothing weight-sized is saved for the backward
    train(dense, x, steps=5)
    assert_adapters_close(quant, dense)
    with torch.no_grad():
        torch.testing.assert_close(quant(x), dense(x), rtol=0, atol=TOL)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_shira_additive_path_trains_like_the_reference(kind, monkeypatch):
    """Where no dequantized copy exists (other devices or libraries), SHiRA adds s x S^T beside the
    base: the same values after the same steps."""
    monkeypatch.setattr(shirakit.core.layer, "dequantizer", lambda layer, x: None)
    quant, dense = quantized_pair(kind)
    for model in (quant, dense):
        inject(model, CONFIGS["shira"]())
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(4))
    train(quant, x, steps=5)
    train(dense, x, steps=5)
    assert_adapters_close(quant, dense)


def test_no_dequantized_copy_without_gradients(dense_copies):
    """Inference keeps bitsandbytes' own product (its CPU inference kernels) plus the sparse delta."""
    quant, dense = quantized_pair("nf4")
    for model in (quant, dense):
        inject(model, CONFIGS["shira"]())
    x = torch.randn(4, 64)
    with torch.no_grad():
        torch.testing.assert_close(quant(x), dense(x), rtol=0, atol=TOL)
    assert dense_copies == []


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_shira_keeps_no_dequantized_copy_and_leaves_the_codes_alone(kind):
    quant, _ = quantized_pair(kind)
    codes = [quant[i].weight.data.clone() for i in (0, 2)]
    inject(quant, CONFIGS["shira"]())
    train(quant, torch.randn(8, 64))
    for i, layer in enumerate(m for m in quant.modules() if isinstance(m, shirakit.AdapterLinear)):
        assert torch.equal(layer.weight.data, codes[i]), "the quantized codes were written"
        dense_numel = layer.in_features * layer.out_features
        held = [t for t in list(layer.adapters.parameters()) + list(layer.adapters.buffers()) if t.is_floating_point()]
        held += [v for v in vars(layer.adapters["default"]).values() if isinstance(v, torch.Tensor)]
        assert all(t.numel() < dense_numel // 4 for t in held), [tuple(t.shape) for t in held]


def test_merge_into_a_quantized_weight_is_refused_with_the_way_out():
    quant, _ = quantized_pair("nf4")
    inject(quant, CONFIGS["lora"]())
    before = quant[0].weight.data.clone()
    with pytest.raises(RuntimeError, match="quantized weight.*dequantize the base layer"):
        shirakit.merge(quant)
    assert torch.equal(quant[0].weight.data, before)


def test_miss_bat_needs_the_weight_and_is_refused_on_a_quantized_base():
    quant, _ = quantized_pair("nf4")
    config = shirakit.MissConfig(r=8, target_modules=["0", "2"], init_weights="bat")
    with pytest.raises(ValueError, match="quantized"):
        shirakit.inject(quant, config)
    assert not any(isinstance(m, shirakit.AdapterLinear) for m in quant.modules())  # rolled back


def test_load_adapter_and_route_on_a_quantized_base(tmp_path):
    quant, dense = quantized_pair("nf4")
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(2))
    for name, seed in (("a", 1), ("b", 2)):
        donor = quantized_pair("nf4")[1]
        shirakit.inject(donor, shirakit.ShiraConfig(r=4, target_modules=["0", "2"], random_seed=seed,
                                                    init_weights=False))
        shirakit.save_adapter(donor, tmp_path / name)
        for model in (quant, dense):
            shirakit.load_adapter(model, tmp_path / name, adapter_name=name)
    for name in ("a", "b"):
        for model in (quant, dense):
            shirakit.set_adapter(model, name)
        with torch.no_grad():
            torch.testing.assert_close(quant(x), dense(x), rtol=0, atol=TOL)
    # bitsandbytes' eval-mode CPU kernel differs from its train-mode one (~3e-3 here, the base alone):
    # the routed batch is compared with the same quantized model, one row and one adapter at a time
    names = ["a", "b", "a", "b", "b", "a"]
    quant.eval()
    with torch.no_grad(), shirakit.route(quant, names):
        mixed = quant(x)
    with torch.no_grad():
        for row, name in enumerate(names):
            shirakit.set_adapter(quant, name)
            torch.testing.assert_close(mixed[row], quant(x[row: row + 1])[0], rtol=0, atol=TOL)


@pytest.mark.parametrize("method", ["shira", "lora"])
def test_training_after_bitsandbytes_repacked_the_weight_for_inference_is_refused(method):
    """An eval-mode forward without gradients lets bitsandbytes (CPUs with AVX512-BF16) repack a 4-bit
    weight for inference; its product there has no backward, so training on would silently give the
    layers below no gradient. The next forward that needs an input gradient is refused; evaluating
    in train mode under no_grad keeps the layout trainable."""
    quant, dense = quantized_pair("nf4")
    for model in (quant, dense):
        inject(model, CONFIGS[method]())
    x = torch.randn(8, 64)
    with torch.no_grad():  # train mode: nothing is repacked, training goes on as before
        quant(x)
    train(quant, x, steps=1)
    train(dense, x, steps=1)
    assert_adapters_close(quant, dense)
    quant.eval()
    with torch.no_grad():
        quant(x)
    if not shirakit.core.quantized_weights.repacked_for_inference(quant[0]):
        pytest.skip("bitsandbytes did not repack here (no AVX512-BF16 on this CPU)")
    quant.train()
    with pytest.raises(RuntimeError, match="repacked for CPU inference.*train mode under torch.no_grad"):
        quant(x.requires_grad_())
