"""SHiRA's grouped routed delta (methods/shira/grouped.py): one kernel call per layer for every
adapter's rows gives bit for bit what one sparse product per adapter gives, and rows alone."""

from __future__ import annotations

import pytest
import torch

import shirakit
from shirakit.methods.shira import grouped
from shirakit.routing import route
from tests.models import MODELS, TARGETS, inputs

pytestmark = pytest.mark.skipif(not grouped.AVAILABLE, reason="numba is not installed")

NAMES = ["a", "b", "__base__", "c", "a", "d", "b", "__base__"]


def _model(dtype):
    model = MODELS["llama"](dtype=dtype).eval()
    for i, name in enumerate("abcd"):
        config = shirakit.ShiraConfig(r=2 + i, target_modules=TARGETS["llama"], init_weights=False, random_seed=i)
        shirakit.inject(model, config, name)
    shirakit.set_scale(model, "c", 0.5)
    shirakit.switch_adapter(model, None)
    return model


def _routed(model, ids, use_grouped, monkeypatch):
    monkeypatch.setattr(grouped, "AVAILABLE", use_grouped)
    calls = []
    real = grouped.add_grouped
    monkeypatch.setattr(grouped, "add_grouped", lambda *a: (calls.append(1), real(*a)))
    with torch.inference_mode(), route(model, NAMES):
        logits = model(input_ids=ids).logits
    assert bool(calls) == use_grouped
    return logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("length", [1, 7], ids=["decode", "prefill"])
def test_grouped_equals_one_product_per_adapter_bit_for_bit(dtype, length, monkeypatch):
    # the scatter path for large groups stays out of the way: every group takes the delta path
    monkeypatch.setattr(shirakit.adapter.InWeightAdapter, "scatter_min_tokens", 10**9)
    model = _model(dtype)
    ids = inputs(batch=len(NAMES), length=length)
    one_by_one = _routed(model, ids, False, monkeypatch)
    together = _routed(model, ids, True, monkeypatch)
    assert torch.equal(together, one_by_one)
    with torch.inference_mode():  # and each row as if run alone with its adapter
        for row, name in enumerate(NAMES):
            shirakit.switch_adapter(model, None if name == "__base__" else name)
            alone = model(input_ids=ids[row : row + 1]).logits
            torch.testing.assert_close(together[row : row + 1], alone, atol=1e-5, rtol=1e-5)
        shirakit.switch_adapter(model, None)


def test_training_and_half_precision_keep_the_sparse_product(monkeypatch):
    monkeypatch.setattr(shirakit.adapter.InWeightAdapter, "scatter_min_tokens", 10**9)
    monkeypatch.setattr(grouped, "add_grouped", lambda *a: pytest.fail("grouped path used"))
    model = _model(torch.float32)
    ids = inputs(batch=len(NAMES), length=3)
    with route(model, NAMES):  # gradients enabled: autograd needs the per-adapter product
        model(input_ids=ids).logits.sum().backward()
    half = _model(torch.bfloat16)
    with torch.inference_mode(), route(half, NAMES):
        assert torch.isfinite(half(input_ids=ids).logits).all()


def test_adapters_that_come_and_go_are_never_served_stale(monkeypatch, tmp_path):
    """Churn, as a server's cache does it: delete an adapter, load another of the same shapes into
    the same layers, route again: every step equals the per-adapter sparse product."""
    monkeypatch.setattr(shirakit.adapter.InWeightAdapter, "scatter_min_tokens", 10**9)
    model = _model(torch.float32)
    ids = inputs(batch=len(NAMES), length=1)
    for step in range(4):
        shirakit.delete_adapter(model, "d")
        config = shirakit.ShiraConfig(r=5, target_modules=TARGETS["llama"], init_weights=False, random_seed=100 + step)
        shirakit.inject(model, config, "d")
        shirakit.switch_adapter(model, None)
        if step == 2:  # and a write into a loaded adapter's values
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "adapters.a." in n).mul_(3)
        together = _routed(model, ids, True, monkeypatch)
        assert torch.equal(together, _routed(model, ids, False, monkeypatch))
