"""Adapters over a base quantized by torchao (0.18, CPU), against the fp32 reference holding the
dequantized weights, to 1e-5 (tests/quantized_bases.py).

The weight-only kinds that run on CPU here: ``Int8WeightOnlyConfig`` (``Int8Tensor``, int8 codes, a
scale per row), ``IntxWeightOnlyConfig(int4, PerGroup(32))`` (``IntxUnpackedToInt8Tensor``: 4-bit
values kept one per byte), ``Float8WeightOnlyConfig`` (``Float8Tensor``, e4m3) and ``to_nf4``
(``NF4Tensor``, torchtune's QLoRA base, two values per byte). ``Int4WeightOnlyConfig`` does not run
on this CPU (its packings need mslk, a CUDA package, or CUDA itself). Configs that quantize the
input too (``Int8DynamicActivation*``) give the input no gradient: training over them is refused.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import shirakit
import shirakit.core.layer
from tests.quantized_bases import (
    CONFIGS,
    TOL,
    TORCHAO_KINDS,
    assert_adapters_close,
    dense_mlp,
    inject,
    spy_dense_copies,
    step_input_grads,
    torchao_pair,
    torchao_quantize,
    train,
    train_keeping_no_copy,
)

torchao = pytest.importorskip("torchao")
from torchao import quantization as ao  # noqa: E402

KINDS = TORCHAO_KINDS
quantized_pair = torchao_pair
quantize = torchao_quantize


def inner_tensors(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Copies of the tensors a torchao weight is made of (codes, scales, ...)."""
    names, _ = weight.__tensor_flatten__()
    return {name: getattr(weight, name).detach().clone() for name in names}


def test_every_weight_only_kind_is_seen_as_quantized():
    for kind in KINDS:
        quant, _ = quantized_pair(kind)
        shirakit.inject(quant, CONFIGS["lora"]())
        assert all(layer.quantized for layer in quant.modules() if isinstance(layer, shirakit.AdapterLinear))


@pytest.fixture
def dense_copies(monkeypatch):
    """Every dense copy SHiRA's copy path dequantizes, as weak references (a live one is being kept)."""
    return spy_dense_copies(monkeypatch)


@pytest.mark.parametrize("kind", KINDS)
def test_shira_writes_into_the_dequantized_copy_and_keeps_none(kind, dense_copies):
    """torchao multiplies by a dense copy on CPU (and autograd keeps it for the backward); SHiRA takes
    the copy path instead: one copy per layer in the forward, one in layer 2's backward, none alive
    between them, nothing weight-sized saved; the reference's values after 5 steps."""
    quant, dense = quantized_pair(kind)
    codes = [inner_tensors(quant[i].weight) for i in (0, 2)]
    for model in (quant, dense):
        inject(model, CONFIGS["shira"]())
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    saved_numels = train_keeping_no_copy(quant, x, dense_copies)
    assert len(dense_copies) == 5 * 3
    assert max(saved_numels) < 64 * 128 // 4
    train(dense, x, steps=5)
    assert_adapters_close(quant, dense)
    with torch.no_grad():
        torch.testing.assert_close(quant(x), dense(x), rtol=0, atol=TOL)
    for i, before in zip((0, 2), codes):  # the quantized tensors themselves are never written
        after = inner_tensors(quant[i].base_layer.weight)
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def saved_for_backward(model: nn.Module, x: torch.Tensor) -> list[int]:
    """The sizes of the dense floating tensors autograd keeps for the backward of ``model(x)`` (a
    quantized tensor kept, as ``LinearNF4`` keeps its ``NF4Tensor``, counts 0)."""
    numels: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        numels.append(t.numel() if t.is_floating_point() and type(t) in (torch.Tensor, nn.Parameter) else 0)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).pow(2).mean().backward()
    return numels


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["lora", "vera", "miss"])
def test_other_methods_keep_no_dequantized_copy_for_the_backward(kind, method):
    """torchao's own product lets autograd keep its dense fp32 copy (checked below with torchao alone);
    over it, shirakit dequantizes again in the backward instead, as bitsandbytes does."""
    layer = quantize(dense_mlp(), kind)[2].requires_grad_(False)
    alone = saved_for_backward(layer, torch.randn(4, 128, requires_grad=True))
    copy_kept = max(alone) == 32 * 128
    assert copy_kept == (kind != "nf4"), "torchao changed which products keep a dense copy: see kept_by_library"
    quant, _ = quantized_pair(kind)
    inject(quant, CONFIGS[method]())
    assert max(saved_for_backward(quant, torch.randn(8, 64))) <= 8 * 128  # activations only (8 x 128 at most)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_shira_additive_path_trains_like_the_reference(kind, monkeypatch):
    """Where no dequantized copy is made (other devices, hooked layers), SHiRA adds s x S^T beside
    torchao's own product: the same values and input gradients."""
    monkeypatch.setattr(shirakit.core.layer, "dequantizer", lambda layer, x: None)
    quant, dense = quantized_pair(kind)
    for model in (quant, dense):
        inject(model, CONFIGS["shira"]())
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(4))
    for got, want in zip(step_input_grads(quant, x, steps=5), step_input_grads(dense, x, steps=5)):
        torch.testing.assert_close(got, want, rtol=0, atol=TOL)
    assert_adapters_close(quant, dense)


ACTIVATION_QUANTIZED = {
    "int8-dynamic": lambda: ao.Int8DynamicActivationInt8WeightConfig(),
    "intx-dynamic": lambda: ao.Int8DynamicActivationIntxWeightConfig(),
}


@pytest.mark.parametrize("config", list(ACTIVATION_QUANTIZED))
@pytest.mark.parametrize("method", ["shira", "lora"])
def test_training_over_an_activation_quantized_base_is_refused(config, method):
    """torchao's dynamic-activation products round the input: torch gives it no gradient through
    the base, silently (checked here with torchao alone). Training would feed every layer below a
    wrong gradient, so the first forward that needs one is refused; inference runs."""
    layer = nn.Linear(64, 32).requires_grad_(False)
    ao.quantize_(layer, ACTIVATION_QUANTIZED[config]())
    assert not layer(torch.randn(4, 64, requires_grad=True)).requires_grad, \
        "torchao now passes the input gradient: revisit the refusal"
    model = dense_mlp()
    ao.quantize_(model, ACTIVATION_QUANTIZED[config]())
    inject(model, CONFIGS[method]())
    with torch.no_grad():
        assert model(torch.randn(4, 64)).shape == (4, 32)
    with pytest.raises(RuntimeError, match="quantizes its input too.*weight-only"):
        model(torch.randn(4, 64)).pow(2).mean().backward()


class CodesLinear(nn.Linear):
    """A stand-in for an unknown library's quantized linear whose product drops the input gradient."""

    def __init__(self) -> None:
        super().__init__(64, 32, bias=False)
        self.weight = nn.Parameter(torch.randint(-8, 8, (32, 64), dtype=torch.int8), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach() @ self.weight.t().float()


def test_an_unknown_base_that_drops_the_input_gradient_is_refused():
    model = nn.Sequential(nn.Linear(64, 64), CodesLinear())
    shirakit.inject(model, shirakit.LoraConfig(r=4, target_modules=["0", "1"]))
    with torch.no_grad():
        model(torch.randn(2, 64))
    with pytest.raises(RuntimeError, match="no gradient path while its input needs one"):
        model(torch.randn(2, 64))


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_merge_into_a_torchao_weight_is_refused_with_the_way_out(kind):
    quant, _ = quantized_pair(kind)
    before = inner_tensors(quant[0].weight)
    inject(quant, CONFIGS["shira"]())
    with pytest.raises(RuntimeError, match="quantized weight.*dequantize the base layer"):
        shirakit.merge(quant)
    after = inner_tensors(quant[0].base_layer.weight)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_miss_bat_needs_the_weight_and_is_refused_on_a_torchao_base():
    quant, _ = quantized_pair("int8")
    with pytest.raises(ValueError, match="quantized"):
        shirakit.inject(quant, shirakit.MissConfig(r=8, target_modules=["0", "2"], init_weights="bat"))


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_save_load_and_route_on_a_torchao_base(kind, tmp_path):
    """Adapters trained over the quantized base, saved, loaded into a fresh quantized base and into
    the reference: the same outputs, alone and routed row by row in one mixed batch."""
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(2))
    trained = {}
    for name, method in (("a", "shira"), ("b", "lora")):
        donor, _ = quantized_pair(kind)
        inject(donor, CONFIGS[method]())
        train(donor, x)
        shirakit.save_adapter(donor, tmp_path / name)
        with torch.no_grad():
            trained[name] = donor(x)
    quant, dense = quantized_pair(kind)
    for name in trained:
        for model in (quant, dense):
            shirakit.load_adapter(model, tmp_path / name, adapter_name=name)
    with torch.no_grad():
        for name, want in trained.items():
            for model in (quant, dense):
                shirakit.set_adapter(model, name)
                torch.testing.assert_close(model(x), want, rtol=0, atol=TOL)
        names = ["a", "b", "b", "a", "a", "b"]
        quant.eval()  # torchao's product is the same in both modes
        with shirakit.route(quant, names):
            mixed = quant(x)
        for row, name in enumerate(names):
            torch.testing.assert_close(mixed[row], trained[name][row], rtol=0, atol=TOL)
