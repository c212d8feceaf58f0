"""The layer's fast path: a plain forward on a weight already in sync skips the sync, and only that.

``AdapterLinear._eager_forward`` skips the sync (reconcile, value stamps, wanted live adapters) when
the record ``_ready`` left by the last plain forward still holds: same guard epoch (no set_adapter,
merge, switch, set_scale, ...), same weight object and version counter (no write by anyone), the
live adapter's values unchanged (version counter, optimizer steps, scale). Each test changes one of
those after the fast path is armed and checks that the next forward computes what a fresh model
with the same state computes (the oracle: the same adapter reloaded into a clean copy of the base).
"""

from __future__ import annotations

import contextlib
import copy
import sys
from pathlib import Path

import pytest
import torch

import shirakit
from shirakit.core.layer import AdapterLinear
from tests.models import MODELS, TARGETS, inputs, output

T = TARGETS["llama"]


def _model(fused: bool):
    model = MODELS["llama"](seed=0)
    base = copy.deepcopy(model)
    shirakit.inject(model, shirakit.ShiraConfig(r=2, target_modules=T, init_weights=False, random_seed=1), "a")
    shirakit.inject(model, shirakit.ShiraConfig(r=2, target_modules=T, init_weights=False, random_seed=2), "b")
    if fused:
        shirakit.switch_adapter(model, "a")
    else:
        shirakit.set_adapter(model, "a")
    return model, base


def _layers(model):
    return [m for m in model.modules() if isinstance(m, AdapterLinear)]


def _oracle(model, base, tmp_path, name="a"):
    """The base with adapter ``name`` as it is now, loaded fresh (saved values, not live state)."""
    folder = tmp_path / f"oracle-{name}"
    shirakit.save_adapter(model, folder, name)
    fresh = copy.deepcopy(base)
    shirakit.load_adapter(fresh, folder, name)
    shirakit.set_adapter(fresh, name)
    return fresh


def _armed(model, ids):
    with torch.no_grad():
        output(model, ids)
        output(model, ids)
    assert all(layer._ready is not None for layer in _layers(model)), "the fast path was not armed"


@pytest.mark.parametrize("fused", [False, True], ids=["live", "fused"])
def test_fast_path_forward_equals_the_synced_one(fused, tmp_path):
    model, base = _model(fused)
    ids = inputs()
    _armed(model, ids)
    with torch.no_grad():
        assert torch.equal(output(model, ids), output(_oracle(model, base, tmp_path), ids))


def test_values_written_in_place_are_seen(tmp_path):
    model, base = _model(fused=False)
    ids = inputs()
    _armed(model, ids)
    with torch.no_grad():
        for layer in _layers(model):
            layer.adapters["a"].shira_weight.mul_(3.0)
        assert torch.allclose(output(model, ids), output(_oracle(model, base, tmp_path), ids), atol=1e-6)


class _FusedLikeStep(torch.optim.Optimizer):
    """Writes the values through ``.data`` (no version bump), as torch's fused kernels do."""

    def __init__(self, params):
        super().__init__(params, {})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.data.mul_(-2.0)


def test_a_step_that_bumps_no_version_counter_is_seen(tmp_path):
    """A fused optimizer writes values without bumping their version counters: the step count says so."""
    model, base = _model(fused=False)
    ids = inputs()
    _armed(model, ids)
    params = [p for n, p in model.named_parameters() if ".adapters.a." in n]
    versions = [p._version for p in params]
    _FusedLikeStep(params).step()
    assert [p._version for p in params] == versions  # nothing but the step count moved
    with torch.no_grad():
        assert torch.allclose(output(model, ids), output(_oracle(model, base, tmp_path), ids), atol=1e-6)


def test_set_scale_switch_and_disable_are_seen(tmp_path):
    model, base = _model(fused=False)
    ids = inputs()
    _armed(model, ids)
    with torch.no_grad():
        shirakit.set_scale(model, "a", 0.5)
        scaled = output(model, ids)
        shirakit.set_scale(model, "a", 1.0)
        assert not torch.allclose(scaled, output(model, ids))
        shirakit.switch_adapter(model, "b")
        assert torch.equal(output(model, ids), output(_oracle(model, base, tmp_path, "b"), ids))
        with shirakit.disable_adapters(model):
            assert torch.equal(output(model, ids), output(base, ids))


@pytest.mark.parametrize("fused", [False, True], ids=["live", "fused"])
def test_an_outside_write_to_the_weight_is_taken_as_the_new_base(fused, tmp_path):
    model, base = _model(fused)
    ids = inputs()
    _armed(model, ids)
    new_base = MODELS["llama"](seed=7)
    layers = dict(model.named_modules())
    with torch.no_grad(), pytest.warns(UserWarning) if fused else contextlib.nullcontext():
        for name, module in new_base.named_modules():
            if name in layers and isinstance(layers[name], AdapterLinear):
                layers[name].base_layer.weight.copy_(module.weight)
        got = output(model, ids)
    # the other weights (norms, embeddings) of the new base are not copied: compare on the old ones
    mixed = copy.deepcopy(base)
    for name, module in new_base.named_modules():
        if name in layers and isinstance(layers[name], AdapterLinear):
            dict(mixed.named_modules())[name].weight.data.copy_(module.weight)
    with torch.no_grad():
        assert torch.allclose(got, output(_oracle(model, mixed, tmp_path), ids), atol=1e-6)


def test_fast_path_costs_fewer_python_calls_than_the_sync():
    """A fused SHiRA layer's forward: no sync calls (the count is deterministic; the sync path took
    about four times as many)."""
    model, _ = _model(fused=True)
    layer = _layers(model)[0]
    x = torch.randn(2, layer.in_features)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    try:
        from layer_calls import count  # the counter benchmarks/layer_calls.py reports in docs/benchmarks.md
    finally:
        sys.path.pop(0)
    with torch.no_grad():
        total, calls = count(layer, x)
    assert not {"sync_live", "_reconcile", "_live_current", "_wanted_live", "_enter"} & set(calls), calls
    assert total <= 15, calls
