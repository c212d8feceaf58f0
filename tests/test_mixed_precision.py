"""Mixed precision: training under autocast (bf16, the HF Trainer's ``bf16=True``) and bf16/fp16
model weights, for SHiRA's three paths (in the weight, additive for tied weights, the quantized
base's dequantized copy and its additive fallback) and every method of the contract battery.

References: the same step in fp32. bf16 keeps 8 bits of mantissa, so gradients are compared by
direction (cosine similarity) and norm, not element by element; SHiRA's merge/unmerge is compared
bit for bit in the weight's own dtype.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import shirakit
import shirakit.core.layer
from shirakit.core.state import adapter_layers
from shirakit.model.routing import route
from tests.cases import CASES
from tests.checks import rows_alone
from tests.models import MODELS, TARGETS, inputs, output


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.float().flatten() for p in model.parameters() if p.requires_grad])


def _step(model, ids, autocast_dtype=None, device="cpu"):
    model.train()
    if autocast_dtype is None:
        loss = output(model, ids).float().pow(2).mean()
    else:
        with torch.autocast(device, dtype=autocast_dtype):
            loss = output(model, ids).float().pow(2).mean()
    loss.backward()
    return loss


def _assert_same_direction(got: torch.Tensor, want: torch.Tensor, min_cos: float = 0.99) -> None:
    assert torch.isfinite(got).all()
    cos = torch.nn.functional.cosine_similarity(got, want, dim=0)
    assert cos > min_cos, f"gradient direction off: cosine {cos:.4f}"
    assert 0.8 < got.norm() / want.norm() < 1.25, f"gradient norm {got.norm():.4g} vs {want.norm():.4g}"


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_training_step_under_cpu_autocast_bf16(case, model_name):
    """Every method trains under ``torch.autocast("cpu", bfloat16)``; its gradients point where the
    fp32 step's do. (SHiRA's backward used to crash here: bf16 grad_out @ fp32 weight.)"""
    ids = inputs()
    ref = MODELS[model_name]()
    shirakit.inject(ref, case.make(TARGETS[model_name], False))
    model = copy.deepcopy(ref)
    _step(ref, ids)
    _step(model, ids, torch.bfloat16)
    for p in model.parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.dtype == p.dtype
    _assert_same_direction(_grads(model), _grads(ref))


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_shira_value_gradient_under_autocast_equals_the_dense_one(model_name, device):
    """Under autocast, SHiRA's value gradient equals (to bf16 rounding) the dense weight gradient,
    at its positions, of a plain model holding W + delta, trained under the same autocast."""
    ids = inputs().to(device)
    model = MODELS[model_name]()
    shirakit.inject(model, shirakit.ShiraConfig(r=2, target_modules=TARGETS[model_name], init_weights=False,
                                                random_seed=5))
    ref = MODELS[model_name]()
    with torch.no_grad():
        for name, delta in shirakit.delta_weights(model, "default").items():
            layer = ref.get_submodule(name)
            (layer.weight.T if type(layer).__name__ == "Conv1D" else layer.weight).add_(delta)
    model, ref = model.to(device), ref.to(device)
    _step(model, ids, torch.bfloat16, device.type)
    _step(ref, ids, torch.bfloat16, device.type)
    for name, layer in adapter_layers(model):
        adapter = layer.adapters["default"]
        ref_layer = ref.get_submodule(name)
        dense = ref_layer.weight.grad.T if type(ref_layer).__name__ == "Conv1D" else ref_layer.weight.grad
        rows, cols = adapter.shira_indices.long()
        want = dense[rows, cols]
        got = adapter.shira_weight.grad
        # the dense one rounds its (m, n) product to bf16; SHiRA's SDDMM keeps fp32 sums
        torch.testing.assert_close(got, want, atol=2e-2 * want.abs().max().item(), rtol=2e-2)


def _tied_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def test_shira_on_a_tied_weight_trains_under_autocast():
    """lm_head tied to the embeddings: SHiRA runs additively there (x S^T beside the base)."""
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(3))
    ref = _tied_llama()
    shirakit.inject(ref, shirakit.ShiraConfig(r=2, target_modules=["lm_head", "q_proj"], init_weights=False,
                                              random_seed=1))
    model = copy.deepcopy(ref)
    _step(ref, ids)
    _step(model, ids, torch.bfloat16)
    _assert_same_direction(_grads(model), _grads(ref))


@pytest.mark.parametrize("additive", [False, True], ids=["dequantized-copy", "additive"])
def test_shira_on_a_quantized_base_trains_under_autocast(additive, monkeypatch):
    pytest.importorskip("bitsandbytes")
    from tests.quantized_bases import CONFIGS, inject
    from tests.test_quantized import quantized_pair

    if additive:
        monkeypatch.setattr(shirakit.core.layer, "dequantizer", lambda layer, x: None)
    quant, dense = quantized_pair("nf4")
    for model in (quant, dense):
        inject(model, CONFIGS["shira"]())
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(4))
    dense(x).pow(2).mean().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = quant(x).float().pow(2).mean()
    loss.backward()
    _assert_same_direction(_grads(quant), _grads(dense))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_training_step_with_half_precision_weights(case, dtype):
    """A model held in bf16/fp16 (no autocast): gradients in the parameters' dtype, pointing where
    the fp32 model's do."""
    ids = inputs()
    ref = MODELS["llama"]()
    shirakit.inject(ref, case.make(TARGETS["llama"], False))
    model = copy.deepcopy(ref).to(dtype)
    _step(ref, ids)
    _step(model, ids)
    for p in model.parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.dtype == dtype
    _assert_same_direction(_grads(model), _grads(ref), min_cos=0.98)
    # an optimizer step on the half-precision values as they are (SGD: AdamW's eps=1e-8 is 0 in fp16)
    trained = [p for p in model.parameters() if p.requires_grad]
    want = [p.detach() - 1e-2 * p.grad for p in trained]
    torch.optim.SGD(trained, lr=1e-2).step()
    for p, w in zip(trained, want):
        assert p.dtype == dtype
        torch.testing.assert_close(p.detach(), w)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_shira_merge_unmerge_is_bit_exact_in_half_precision(dtype, device):
    base = MODELS["llama"](dtype).to(device)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = copy.deepcopy(base)
    shirakit.inject(model, shirakit.ShiraConfig(r=2, target_modules="all-linear", init_weights=False, random_seed=5))
    ids = inputs().to(device)
    unmerged = output(model, ids)
    shirakit.merge(model)
    merged = output(model, ids)
    for name, layer in adapter_layers(model):
        adapter = layer.adapters["default"]
        rows, cols = adapter.shira_indices.long()
        w = layer.base_layer.weight
        assert w.dtype == dtype
        expected = (before[f"{name}.weight"][rows, cols].float() + adapter.shira_weight.float() * adapter.scale)
        assert torch.equal(w[rows, cols], expected.to(dtype)), name  # one rounding, in the weight's dtype
    torch.testing.assert_close(merged, unmerged, atol=2e-2, rtol=2e-2)
    shirakit.unmerge(model)
    after = model.state_dict()
    for key, value in before.items():
        prefix, _, leaf = key.rpartition(".")
        mine = after[key] if key in after else after[f"{prefix}.base_layer.{leaf}"]
        assert mine.dtype == dtype and torch.equal(mine, value), key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_routed_rows_equal_rows_alone_in_half_precision(dtype):
    model = MODELS["llama"](dtype)
    for i, name in enumerate("ab"):
        torch.manual_seed(10 + i)
        shirakit.inject(model, shirakit.ShiraConfig(r=2, target_modules="all-linear", init_weights=False,
                                                    random_seed=i), name)
    names = ["a", "b", "__base__", "a"]
    ids = inputs(batch=len(names))
    expected = rows_alone(model, ids, names)
    with route(model, names):
        routed = output(model, ids)
    assert routed.dtype == dtype
    # the routed rows take the additive path, the rows alone the values in the weight: two roundings
    torch.testing.assert_close(routed.float(), expected.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("method", ["shira", "lora"])
def test_conv_and_embedding_siblings_train_under_cpu_autocast_bf16(method):
    """The layer siblings (nn.Conv1d/2d, nn.Embedding; SHiRA's own autograd Functions there)."""
    from tests.models import SIBLING_MODELS

    targets = TARGETS["convnet"]
    config = (shirakit.ShiraConfig(r=2, target_modules=targets, init_weights=False, random_seed=2)
              if method == "shira" else shirakit.LoraConfig(r=2, target_modules=targets, init_lora_weights=False))
    ref = SIBLING_MODELS["convnet"]()
    shirakit.inject(ref, config)
    model = copy.deepcopy(ref)
    ids = inputs()
    _step(ref, ids)
    _step(model, ids, torch.bfloat16)
    for p in model.parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.dtype == p.dtype
    _assert_same_direction(_grads(model), _grads(ref))
