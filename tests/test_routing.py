"""Mixed-adapter batches: row i of a routed batch equals running row i alone with its adapter."""

from __future__ import annotations

import pytest
import torch

import shirakit
from shirakit.core.adapter import InWeightAdapter
from shirakit.core.layer import AdapterLinear
from shirakit.model.routing import route
from tests.cases import CASES
from tests.checks import rows_alone
from tests.models import MODELS, TARGETS, inputs, output


def _model_with(makers):
    model = MODELS["llama"]()
    for i, (name, make) in enumerate(makers.items()):
        torch.manual_seed(10 + i)
        shirakit.inject(model, make(), name)
    return model


def _generate_alone(model, ids, names, kwargs):
    """Row i generated on its own with adapter names[i] (the reference for routed generate)."""
    rows = []
    for i, name in enumerate(names):
        if name == "__base__":
            with shirakit.disable_adapters(model):
                rows.append(model.generate(ids[i : i + 1], **kwargs))
        else:
            shirakit.set_adapter(model, name)
            rows.append(model.generate(ids[i : i + 1], **kwargs))
    return torch.cat(rows)


def _case_makers(case):
    return {"a": lambda: case.make(TARGETS["llama"], False), "b": lambda: case.make(TARGETS["llama"], False)}


NAMES = ["a", "b", "__base__", "a", "b"]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("scatter_path", [False, True], ids=["sparse", "scatter"])
def test_routed_rows_equal_rows_alone(case, scatter_path, monkeypatch):
    monkeypatch.setattr(InWeightAdapter, "prefers_weight", lambda self, tokens: scatter_path)
    model = _model_with(_case_makers(case))
    ids = inputs(batch=len(NAMES))
    expected = rows_alone(model, ids, NAMES)
    with route(model, NAMES):
        routed = output(model, ids)
    torch.testing.assert_close(routed, expected, atol=1e-5, rtol=1e-5)
    # the keyword form gives the same, and routing leaves no trace afterwards
    torch.testing.assert_close(model(input_ids=ids, adapter_names=NAMES).logits, expected, atol=1e-5, rtol=1e-5)
    shirakit.set_adapter(model, "b")
    torch.testing.assert_close(output(model, ids[1:2]), expected[1:2], atol=1e-5, rtol=1e-5)


def test_mix_of_methods():
    makers = {f"m{i}": (lambda c=c: c.make(TARGETS["llama"], False)) for i, c in enumerate(CASES)}
    model = _model_with(makers)
    names = list(makers) + ["__base__"] + list(makers)[::-1]
    ids = inputs(batch=len(names))
    expected = rows_alone(model, ids, names)
    with route(model, names):
        torch.testing.assert_close(output(model, ids), expected, atol=1e-5, rtol=1e-5)


def test_generate_with_beams_and_return_sequences():
    shira = next(c for c in CASES if c.id.startswith("shira"))
    lora = next(c for c in CASES if c.id.startswith("lora"))
    model = _model_with({"s": lambda: shira.make(TARGETS["llama"], False),
                         "l": lambda: lora.make(TARGETS["llama"], False)})
    ids = inputs(batch=3, length=6)
    names = ["s", "l", "__base__"]
    kwargs = dict(max_new_tokens=5, do_sample=False, num_beams=3, num_return_sequences=2, pad_token_id=0)
    expected = _generate_alone(model, ids, names, kwargs)
    with route(model, names):
        routed = model.generate(ids, **kwargs)
    assert torch.equal(routed, expected)
    assert torch.equal(model.generate(ids, adapter_names=names, **kwargs), expected)


def test_greedy_generate_rows_equal_alone():
    case = next(c for c in CASES if c.id.startswith("shira"))
    model = _model_with(_case_makers(case))
    ids = inputs(batch=3, length=6)
    names = ["b", "a", "__base__"]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = _generate_alone(model, ids, names, kwargs)
    assert torch.equal(model.generate(ids, adapter_names=names, **kwargs), expected)


def _bert_with_two_saved_classifiers():
    """A BERT with adapters "a" and "b", each with its own (changed) copy of the classifier."""
    model = MODELS["bert"]()
    for i, name in enumerate(["a", "b"]):
        torch.manual_seed(i)
        shirakit.inject(model, shirakit.LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"],
                                                   init_lora_weights=False), name)
        with torch.no_grad():
            model.classifier.adapters[name].weight.add_(torch.randn_like(model.classifier.adapters[name].weight))
    return model


def test_modules_to_save_are_routed_per_row():
    model = _bert_with_two_saved_classifiers()
    names = ["a", "__base__", "b"]
    ids = inputs(batch=3)
    expected = rows_alone(model, ids, names)
    with route(model, names):
        torch.testing.assert_close(output(model, ids), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("scatter_path", [False, True], ids=["sparse", "scatter"])
def test_a_per_token_route_over_one_packed_row_equals_routing_the_tokens_as_rows(case, scatter_path, monkeypatch):
    """A serving engine's ragged step packs every request's tokens into one row (so the output layer
    runs only where logits are wanted): each adapter layer routes token i as row i would be."""
    monkeypatch.setattr(InWeightAdapter, "prefers_weight", lambda self, tokens: scatter_path)
    model = _model_with(_case_makers(case)).eval()
    names = ["a", "a", "__base__", "b", "a", "b", "b"]
    layers = [m for m in model.modules() if isinstance(m, AdapterLinear)][:3]
    torch.manual_seed(0)
    with torch.inference_mode():
        for layer in layers:
            x = torch.randn(1, len(names), layer.base_layer.in_features)
            with route(model, names, per_token=True):
                packed = layer(x)
            with route(model, names):
                rows = layer(x.view(len(names), 1, -1))
            assert packed.shape == (1, len(names), layer.base_layer.out_features)
            torch.testing.assert_close(packed, rows.view(1, len(names), -1), atol=1e-6, rtol=1e-6)
            with route(model, names, per_token=True), pytest.raises(ValueError, match="one packed row"):
                layer(x.view(len(names), 1, -1))


def test_modules_to_save_follow_a_per_token_route():
    model = _bert_with_two_saved_classifiers()
    model.eval()
    names = ["b", "__base__", "a", "b"]
    x = torch.randn(1, len(names), model.classifier.original_module.in_features)
    with torch.inference_mode():
        with route(model, names, per_token=True):
            packed = model.classifier(x)
        expected = [model.classifier.adapters[n](x[0, i]) if n != "__base__"
                    else model.classifier.original_module(x[0, i]) for i, n in enumerate(names)]
    torch.testing.assert_close(packed, torch.stack(expected).unsqueeze(0))


def test_errors_are_clear_and_early():
    case = CASES[0]
    model = _model_with(_case_makers(case))
    ids = inputs(batch=2)
    with pytest.raises(KeyError, match=r"unknown adapter\(s\) \['zz'\] in adapter_names"):
        with route(model, ["a", "zz"]):
            pass
    with pytest.raises(ValueError, match="adapter_names has 3 entries but the batch has 2 rows"):
        with route(model, ["a", "b", "a"]):
            output(model, ids)
    with pytest.raises(ValueError, match="adapter_names has 1 entries but the batch has 2 rows"):
        model(input_ids=ids, adapter_names=["a"])
    shirakit.merge(model, ["a"])
    with pytest.raises(RuntimeError, match="merged"):
        with route(model, ["a", "b"]):
            pass
    shirakit.unmerge(model)
    model.train()
    with pytest.raises(RuntimeError, match="model.eval"):
        with route(model, ["a", "b"]):
            pass


def _one_layer(in_f, out_f, config):
    holder = torch.nn.Sequential(torch.nn.Linear(in_f, out_f, bias=False))
    shirakit.inject(holder, config, "a")
    return holder[0].adapters["a"]


def test_cost_model_picks_the_route_by_layer_shape_and_tokens():
    """The group's route depends on the layer: the crossover grows with m*n/K (SHiRA) and sits
    where the measured costs cross (a decode group: sparse; a prefill group: written-in)."""
    small = _one_layer(512, 1376, shirakit.ShiraConfig(r=32, target_modules=["0"]))
    sparse_mask = _one_layer(512, 1376, shirakit.ShiraConfig(r=4, target_modules=["0"]))
    for adapter in (small, sparse_mask):
        assert not adapter.prefers_weight(4) and adapter.prefers_weight(4096)
    crossover = [next(t for t in range(1, 5000) if a.prefers_weight(t)) for a in (small, sparse_mask)]
    assert 20 <= crossover[0] <= 100 < crossover[1]  # fewer values: the sparse product stays cheap longer
    with torch.no_grad():  # inference on CPU: the grouped kernel, cheaper per multiply-add, writes in later
        grouped = [next(t for t in range(1, 5000) if a.prefers_weight(t)) for a in (small, sparse_mask)]
        assert not small.prefers_weight(16) and small.prefers_weight(4096)
    assert crossover[0] < grouped[0] <= 256 and crossover[1] < grouped[1] and grouped[0] < grouped[1]
    bat = _one_layer(512, 512, shirakit.MissConfig(r=64, target_modules=["0"], init_weights="bat"))
    assert not bat.prefers_weight(4) and bat.prefers_weight(512)


def test_routed_forward_asks_the_cost_model_with_the_group_tokens(monkeypatch):
    asked = []
    monkeypatch.setattr(InWeightAdapter, "prefers_weight", lambda self, tokens: asked.append(tokens) or False)
    holder = torch.nn.Sequential(torch.nn.Linear(16, 8, bias=False))
    for name in ("a", "b"):
        shirakit.inject(holder, shirakit.ShiraConfig(r=2, target_modules=["0"], init_weights=False), name)
    holder.eval()
    x = torch.randn(5, 3, 16)  # 5 rows of 3 tokens
    with route(holder, ["a", "b", "a", "__base__", "a"]):
        holder(x)
    assert sorted(asked) == [3, 9]  # b: 1 row x 3 tokens; a: 3 rows x 3 tokens
