"""SHiRA's grouped routed delta (methods/shira/grouped.py): one kernel call per layer for every
adapter's rows gives bit for bit what one sparse product per adapter gives, and rows alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import shirakit
from shirakit.methods.shira import grouped
from shirakit.model.routing import route
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
    monkeypatch.setattr(shirakit.core.adapter.InWeightAdapter, "prefers_weight", lambda self, tokens: False)
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
    monkeypatch.setattr(shirakit.core.adapter.InWeightAdapter, "prefers_weight", lambda self, tokens: False)
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
    monkeypatch.setattr(shirakit.core.adapter.InWeightAdapter, "prefers_weight", lambda self, tokens: False)
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


def _layer_with_adapters(in_f, out_f, ranks, dtype=torch.float32):
    holder = torch.nn.Sequential(torch.nn.Linear(in_f, out_f, bias=False, dtype=dtype)).eval()
    for i, r in enumerate(ranks):
        config = shirakit.ShiraConfig(r=r, target_modules=["0"], init_weights=False, random_seed=i)
        shirakit.inject(holder, config, f"a{i}")
    shirakit.set_scale(holder, "a1", -0.75)
    layer = holder[0]
    layer.withdraw_live()
    return layer


@pytest.mark.parametrize("columns", ["uint16", "int32"])
def test_every_group_size_and_token_layout_is_bit_identical(columns, monkeypatch):
    """The kernel's blocks of 8 and 4 tokens (padded lanes, odd output rows, groups of 1-19 tokens,
    rows of several tokens each) give what one sparse product per adapter gives, bit for bit."""
    if columns == "int32":  # the layout for inputs wider than 65,536
        monkeypatch.setattr(grouped, "_narrow", lambda cols: cols)
    monkeypatch.setattr(shirakit.core.adapter.InWeightAdapter, "prefers_weight", lambda self, tokens: False)
    layer = _layer_with_adapters(24, 13, [1, 2, 3])
    g = torch.Generator().manual_seed(0)
    for rows_per, tokens in [(1, 1), (2, 1), (4, 1), (5, 1), (8, 1), (9, 1), (12, 1), (13, 1), (19, 1), (3, 3), (2, 7)]:
        names = [f"a{i % 3}" for i in range(3 * rows_per)] + ["__base__"]
        x = torch.randn(len(names), tokens, 24, generator=g)
        groups = [(n, torch.tensor([i for i, m in enumerate(names) if m == n])) for n in dict.fromkeys(names)]
        with torch.inference_mode():
            monkeypatch.setattr(grouped, "AVAILABLE", True)
            together = layer.routed_forward(x, groups)
            monkeypatch.setattr(grouped, "AVAILABLE", False)
            one_by_one = layer.routed_forward(x, groups)
        assert torch.equal(together, one_by_one), (rows_per, tokens)
        assert grouped._ARENAS[layer].col.dtype == getattr(np, columns)


def test_kernel_reads_only_the_adapters_of_the_call_and_refits_stale_ones(monkeypatch):
    """A call checks only its own adapters; one changed since the layout (a new scale) is laid out
    again before use, and the others stay correct."""
    monkeypatch.setattr(shirakit.core.adapter.InWeightAdapter, "prefers_weight", lambda self, tokens: False)
    layer = _layer_with_adapters(16, 10, [2, 2, 2, 2])
    x = torch.randn(4, 16)
    groups = [("a0", torch.tensor([0, 2])), ("a3", torch.tensor([1, 3]))]

    def both():
        with torch.inference_mode():
            monkeypatch.setattr(grouped, "AVAILABLE", True)
            together = layer.routed_forward(x, groups)
            monkeypatch.setattr(grouped, "AVAILABLE", False)
            return together, layer.routed_forward(x, groups)

    together, reference = both()
    assert torch.equal(together, reference)
    arena = grouped._ARENAS[layer]
    layer.adapters["a3"].set_scale(2.5)  # a used adapter changed: laid out again
    together, reference = both()
    assert torch.equal(together, reference) and grouped._ARENAS[layer] is not arena


def test_quad_layout_is_a_permutation_keeping_each_rows_column_order():
    """The kernel's layout (grouped._quad_order): quads of rows keep their CSR span, the first
    `common` values of their 4 rows interleaved, then each row's rest; the last m % 4 rows as CSR.
    Rows of any length, empty ones included."""
    lengths = np.array([3, 5, 0, 2, 4, 4, 6, 4, 1, 7, 2])  # 2 quads (one with an empty row) + 3 rows
    crow = np.concatenate([[0], np.cumsum(lengths)])
    order = grouped._quad_order(crow)
    assert sorted(order.tolist()) == list(range(crow[-1]))
    expected = []
    for q in range(0, 8, 4):
        common = min(lengths[q : q + 4])
        expected += [crow[r] + j for j in range(common) for r in range(q, q + 4)]
        expected += [k for r in range(q, q + 4) for k in range(crow[r] + common, crow[r + 1])]
    expected += list(range(crow[8], crow[-1]))
    assert order.tolist() == expected
