"""What a SHiRA adapter holds besides its values, in bytes per value (tensor nbytes, no timing).

Under FSDP2 every rank keeps whatever an adapter holds that is not a parameter (FSDP shards
parameters, not buffers or caches), so these bytes are per rank what the values are per process:
at 24 Llama layers, r=16, each byte per value is 7.6 MB on every rank (docs/distributed.md).
"""

from __future__ import annotations

import pytest
import torch

import shirakit
import shirakit.core.layer
from shirakit.core.state import adapter_layers
from tests.checks import held_bytes
from tests.models import MODELS, inputs, output


def _train(model, steps: int = 3) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(steps):
        output(model, inputs(seed=step)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():  # an evaluation between steps
            output(model, inputs(seed=9))


def _model():
    model = MODELS["llama"]()
    return shirakit.inject(model, shirakit.ShiraConfig(r=2, target_modules="all-linear", init_weights=False,
                                                       random_seed=3))


def _crow_bytes(adapter) -> int:
    return 8 * (adapter.geometry.out_features + 1)


def test_one_process_training_holds_the_indices_positions_and_base_values():
    model = _model().train()
    _train(model)
    for name, layer in adapter_layers(model):
        adapter = layer.adapters["default"]
        k = adapter.shira_weight.numel()
        pattern = adapter.pattern()
        # the kernels read views of the int32 indices, not int64 copies
        assert pattern.rows.dtype == torch.int32
        assert pattern.rows.untyped_storage().data_ptr() == adapter.shira_indices.untyped_storage().data_ptr()
        # indices (2 x int32) + storage positions (int64, kept for the per-step write) + the saved
        # base values and the written ones (fp32) + the CSR row offsets; was 40 bytes per value
        assert held_bytes(adapter) == k * (8 + 8 + 4 + 4) + _crow_bytes(adapter), name


@pytest.fixture
def gathered_path(monkeypatch):
    """Every layer takes the FSDP2 / ZeRO-3 path (a copy gathered per call) on a plain weight."""
    monkeypatch.setattr(shirakit.core.layer, "gathered_per_call", lambda module: True)


def test_gathered_path_holds_only_the_indices_and_keeps_the_weight_clean(gathered_path):
    """On the gathered-copy path the values are in the weight only while a product reads it:
    after every forward and backward the weight is the base, bit-exact, and an adapter holds its
    (2, K) int32 indices and CSR row offsets only (was 40 bytes per value: int64 position and
    pattern copies, and the base and written values kept between steps)."""
    model = _model().train()
    base = {n: layer.base_layer.weight.detach().clone() for n, layer in adapter_layers(model)}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(3):
        loss = output(model, inputs(seed=step)).pow(2).mean()
        for name, layer in adapter_layers(model):
            assert torch.equal(layer.base_layer.weight, base[name]), name
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            output(model, inputs(seed=9))
        for name, layer in adapter_layers(model):
            adapter = layer.adapters["default"]
            assert torch.equal(layer.base_layer.weight, base[name]), name
            assert held_bytes(adapter) == 8 * adapter.shira_weight.numel() + _crow_bytes(adapter), name


def test_gathered_path_trains_exactly_as_the_weight_path(monkeypatch):
    """Same values written, same products: the adapter after 3 SGD steps (with an evaluation
    forward between steps) is bit-identical to the one-process path's."""
    trained = []
    for gathered in (False, True):
        if gathered:
            monkeypatch.setattr(shirakit.core.layer, "gathered_per_call", lambda module: True)
        model = _model().train()
        _train(model)
        trained.append(shirakit.adapter_state_dict(model))
    assert trained[0].keys() == trained[1].keys()
    for key in trained[0]:
        assert torch.equal(trained[0][key], trained[1][key]), key
