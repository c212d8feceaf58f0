"""The contract battery: every (method, config) row of tests/cases.py on tiny Llama, GPT-2, BERT, and,
for the methods that adapt them, on a tiny model of convs and embeddings (tests/models.py ConvNet)."""

from __future__ import annotations

import copy

import pytest
import torch

import shirakit
from shirakit.core.state import adapter_layers
from tests.cases import CASES
from tests.checks import lm_training_losses
from tests.models import MODELS as LINEAR_MODELS
from tests.models import SIBLING_MODELS, TARGETS, inputs, output

MODELS = {**LINEAR_MODELS, **SIBLING_MODELS}
# (case, model) pairs: every case on the linear models, the sibling-capable ones on the conv model too
PAIRS = [pytest.param(c, m, id=f"{m}-{c.id}") for c in CASES for m in MODELS
         if m in LINEAR_MODELS or c.siblings]


def build(model_name, case, identity=False, name="default"):
    model = MODELS[model_name]()
    shirakit.inject(model, case.make(TARGETS[model_name], identity), name)
    return model


def merged_copy(model_name, model, adapter_name):
    """A plain base model whose weights have the adapter's dense delta added (the reference)."""
    ref = MODELS[model_name]()
    deltas = shirakit.delta_weights(model, adapter_name)
    with torch.no_grad():
        for name, delta in deltas.items():
            layer = ref.get_submodule(name)
            w = layer.weight
            view = w.T if type(layer).__name__ == "Conv1D" else w
            view.add_(delta.to(w.dtype).view_as(view))  # a conv's delta is its flattened kernel
    return ref


@pytest.fixture(params=CASES, ids=lambda c: c.id)
def case(request):
    return request.param


@pytest.mark.parametrize("case,model_name", PAIRS)
def test_identity_at_init(case, model_name):
    ids = inputs()
    base = output(MODELS[model_name](), ids)
    model = build(model_name, case, identity=True)
    assert torch.equal(output(model, ids), base)


@pytest.mark.parametrize("case,model_name", PAIRS)
def test_forward_equals_base_plus_delta(case, model_name):
    ids = inputs()
    model = build(model_name, case)
    ref = merged_copy(model_name, model, "default")
    torch.testing.assert_close(output(model, ids), output(ref, ids), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(output(model, ids), output(MODELS[model_name](), ids), atol=1e-4)


@pytest.mark.parametrize("case,model_name", PAIRS)
def test_merge_unmerge_disable(case, model_name):
    ids = inputs()
    base_model = MODELS[model_name]()
    base = output(base_model, ids)
    base_weights = {k: v.clone() for k, v in base_model.state_dict().items()}
    model = build(model_name, case)
    unmerged = output(model, ids)
    shirakit.merge(model)
    torch.testing.assert_close(output(model, ids), unmerged, atol=1e-5, rtol=1e-5)
    shirakit.unmerge(model)
    after = model.state_dict()
    for key, value in base_weights.items():
        prefix, _, leaf = key.rpartition(".")
        mine = after[key] if key in after else after[f"{prefix}.base_layer.{leaf}"]
        if case.exact_unmerge:
            assert torch.equal(mine, value), key
        else:
            torch.testing.assert_close(mine, value, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(output(model, ids), unmerged, atol=1e-5, rtol=1e-5)
    with shirakit.disable_adapters(model):
        torch.testing.assert_close(output(model, ids), base, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(output(model, ids), unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case,model_name", PAIRS)
def test_save_load_roundtrip(case, model_name, tmp_path):
    ids = inputs()
    model = build(model_name, case)
    expected = output(model, ids)
    shirakit.save_adapter(model, tmp_path)
    fresh = MODELS[model_name]()
    shirakit.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(output(fresh, ids), expected, atol=0, rtol=0)
    assert shirakit.trainable_parameters(fresh)[0] == 0  # loaded for inference by default
    again = MODELS[model_name]()
    shirakit.load_adapter(again, tmp_path, is_trainable=True)
    assert shirakit.trainable_parameters(again)[0] == shirakit.trainable_parameters(model)[0]


@pytest.mark.parametrize("case,model_name", PAIRS)
def test_trainable_parameter_count(case, model_name):
    model = build(model_name, case)
    expected = sum(case.params(layer.in_features, layer.out_features) for _, layer in adapter_layers(model))
    assert shirakit.trainable_parameters(model)[0] == expected


@pytest.mark.parametrize("case,model_name", [p for p in PAIRS if p.values[1] in ("llama", "gpt2", "convnet")])
def test_two_adapters_do_not_leak(case, model_name):
    ids = inputs()
    alone = build(model_name, case)
    expected_a = output(alone, ids)
    model = build(model_name, case)
    other = case.make(TARGETS[model_name], False)
    torch.manual_seed(123)
    shirakit.inject(model, other, "b")
    assert shirakit.active_adapters(model) == ["b"]
    out_b = output(model, ids)
    shirakit.set_adapter(model, "default")
    torch.testing.assert_close(output(model, ids), expected_a, atol=1e-6, rtol=1e-6)
    shirakit.set_adapter(model, "b")
    torch.testing.assert_close(output(model, ids), out_b, atol=1e-6, rtol=1e-6)
    # only the active adapter trains
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.b." in n for n in trainable)


def test_both_active_equals_merged_both(case):
    ids = inputs()
    model = build("llama", case)
    shirakit.inject(model, case.make(TARGETS["llama"], False), "b")
    shirakit.set_adapter(model, ["default", "b"])
    together = output(model, ids)
    shirakit.merge(model)
    torch.testing.assert_close(output(model, ids), together, atol=1e-5, rtol=1e-5)
    shirakit.unmerge(model)
    torch.testing.assert_close(output(model, ids), together, atol=1e-5, rtol=1e-5)


def test_delete(case):
    ids = inputs()
    model = build("llama", case)
    shirakit.inject(model, case.make(TARGETS["llama"], False), "b")
    expected_b = output(model, ids)
    shirakit.merge(model, ["default"])
    with pytest.raises(RuntimeError, match="merged"):
        shirakit.delete_adapter(model, "default")
    shirakit.unmerge(model)
    shirakit.delete_adapter(model, "default")
    assert "default" not in model.shirakit.configs
    torch.testing.assert_close(output(model, ids), expected_b, atol=1e-6, rtol=1e-6)
    with pytest.raises(KeyError, match="unknown adapter"):
        shirakit.set_adapter(model, "default")


def test_merge_and_unload_gives_plain_model(case):
    ids = inputs()
    model = build("llama", case)
    expected = output(model, ids)
    plain = shirakit.merge_and_unload(model)
    assert not any(isinstance(m, shirakit.AdapterLinear) for m in plain.modules())
    torch.testing.assert_close(output(plain, ids), expected, atol=1e-5, rtol=1e-5)
    assert type(plain).__name__ == "LlamaForCausalLM"


def test_unload_restores_base(case):
    ids = inputs()
    base = output(MODELS["llama"](), ids)
    model = build("llama", case)
    output(model, ids)
    plain = shirakit.unload(model)
    torch.testing.assert_close(output(plain, ids), base, atol=1e-6, rtol=1e-6)


def test_safe_merge_refuses_non_finite(case):
    ids = inputs()
    model = build("llama", case)
    before = output(model, ids)
    weights = copy.deepcopy(model.state_dict())
    param = next(adapter_layers(model)[-1][1].adapters["default"].parameters())
    kept = param.detach().clone()
    with torch.no_grad():
        param.fill_(float("inf"))
    with pytest.raises(ValueError, match="non-finite"):
        shirakit.merge(model, safe_merge=True)
    assert all(not layer.merged for _, layer in adapter_layers(model))
    after = model.state_dict()
    for key in weights:
        if ".adapters." not in key:
            assert torch.equal(after[key], weights[key]), key
    # with the value put back the model computes exactly as before: nothing stayed merged or half-written
    with torch.no_grad():
        param.copy_(kept)
    torch.testing.assert_close(output(model, ids), before, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(case, dtype):
    ids = inputs()
    model = MODELS["llama"](dtype=dtype)
    shirakit.inject(model, case.make(TARGETS["llama"], False))
    out = output(model, ids)
    assert out.dtype == dtype and torch.isfinite(out).all()
    shirakit.merge(model)
    merged = output(model, ids)
    assert merged.dtype == dtype
    torch.testing.assert_close(merged.float(), out.float(), atol=0.1, rtol=0.05)
    # the model trains: a backward pass reaches the adapter parameters
    shirakit.unmerge(model)
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_training_reduces_loss_and_saved_adapter_matches(case, tmp_path):
    ids = inputs(batch=4, length=16)
    model = build("llama", case, identity=True)
    losses = lm_training_losses(model, ids, steps=8, lr=1e-2)
    assert losses[-1] < losses[0]
    model.eval()
    expected = output(model, ids)
    shirakit.save_adapter(model, tmp_path)
    fresh = MODELS["llama"]()
    shirakit.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(output(fresh, ids), expected, atol=1e-6, rtol=1e-6)
