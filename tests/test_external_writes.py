"""Writes shirakit did not make, and values that change under a merge.

- ``load_state_dict`` / ``copy_`` into a weight while an in-weight adapter (SHiRA, MiSS bat) is live
  or merged: the values written in are gone; the new weight is the base; the adapter is applied to
  it again, so outputs equal a fresh load, and unload leaves exactly the new base.
- A merged additive adapter (LoRA, VeRA, MiSS balance) whose values change before unmerge (a stray
  optimizer step): unmerge takes out what was merged, not the new values, and says so.
- ``exact=True`` on merge / switch_adapter: additive adapters unmerge bit-exactly too.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import shirakit
from tests.models import MODELS, TARGETS, inputs, output

T = TARGETS["llama"]
IN_WEIGHT = {
    "shira": lambda: shirakit.ShiraConfig(r=2, target_modules=T, init_weights=False, random_seed=1),
    "miss-bat": lambda: shirakit.MissConfig(r=4, target_modules=T, init_weights="bat", init_random=True),
}
ADDITIVE = {
    "lora": lambda: shirakit.LoraConfig(r=4, target_modules=T, init_lora_weights=False),
    "vera": lambda: shirakit.VeraConfig(r=4, target_modules=T, init_weights=False, projection_prng_key=3),
    "miss-balance": lambda: shirakit.MissConfig(r=4, target_modules=T, init_random=True),
}


def _base_weights(model):
    return {n.replace(".base_layer", ""): p.detach().clone() for n, p in model.named_parameters()
            if ".adapters." not in n}


def _adapted(make, seed=0):
    model = MODELS["llama"](seed=seed)
    torch.manual_seed(5)
    shirakit.inject(model, make(), "a")
    return model


def _fresh_load(model, new_base, tmp_path):
    """The reference: the new base with the same adapter loaded from its saved files."""
    shirakit.save_adapter(model, tmp_path / "a", "a")
    fresh = copy.deepcopy(new_base)
    shirakit.load_adapter(fresh, tmp_path / "a", "a")
    return fresh


def _base_state(model, new_base):
    """new_base's state dict under the adapted model's keys (``...q_proj.base_layer.weight``)."""
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    # (not model.state_dict(): that would take the live adapters out first and hide the problem)
    keys = {k.replace(".base_layer", ""): k for k in names if ".adapters." not in k}
    return {keys[k]: v for k, v in new_base.state_dict().items()}


def _write(kind, model, new_base):
    if kind == "load_state_dict":
        model.load_state_dict(_base_state(model, new_base), strict=False)
    elif kind == "assign":
        model.load_state_dict(_base_state(model, new_base), strict=False, assign=True)
    else:  # a user's copy_ into every base parameter
        new = _base_state(model, new_base)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in new:
                    param.copy_(new[name])


@pytest.mark.parametrize("kind", ["load_state_dict", "assign", "copy_"])
@pytest.mark.parametrize("method", list(IN_WEIGHT))
def test_external_write_under_a_live_adapter_equals_a_fresh_load(method, kind, tmp_path):
    model = _adapted(IN_WEIGHT[method])
    ids = inputs()
    with torch.no_grad():
        output(model, ids)  # the adapter is now live: written into the weights
    new_base = MODELS["llama"](seed=9)
    fresh = _fresh_load(model, new_base, tmp_path)
    _write(kind, model, new_base)
    with torch.no_grad():
        torch.testing.assert_close(output(model, ids), output(fresh, ids), atol=1e-5, rtol=1e-5)
    shirakit.unload(model)
    want = _base_weights(new_base)
    got = _base_weights(model)
    for name in want:
        assert torch.equal(got[name], want[name]), name  # not the old base scattered back


@pytest.mark.parametrize("method", list(IN_WEIGHT) + list(ADDITIVE))
def test_load_state_dict_under_a_merged_adapter_merges_it_onto_the_new_base(method, tmp_path):
    make = {**IN_WEIGHT, **ADDITIVE}[method]
    model = _adapted(make)
    ids = inputs()
    new_base = MODELS["llama"](seed=9)
    fresh = _fresh_load(model, new_base, tmp_path)
    shirakit.merge(model, ["a"])
    model.load_state_dict(_base_state(model, new_base), strict=False)
    with pytest.warns(UserWarning, match="merged"), torch.no_grad():
        got = output(model, ids)
    with torch.no_grad():
        torch.testing.assert_close(got, output(fresh, ids), atol=1e-5, rtol=1e-5)
    shirakit.unmerge(model)
    want, now = _base_weights(new_base), _base_weights(model)
    exact = method in IN_WEIGHT
    for name in want:
        if exact:
            assert torch.equal(now[name], want[name]), name
        else:
            torch.testing.assert_close(now[name], want[name], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", list(ADDITIVE))
def test_values_changed_while_merged_are_not_subtracted(method):
    """Before: unmerge subtracted the new values' delta, leaving base + (old - new) delta."""
    model = _adapted(ADDITIVE[method])
    base = _base_weights(model)
    shirakit.merge(model, ["a"])
    params = [p for n, p in model.named_parameters() if ".adapters.a." in n]
    optimizer = torch.optim.SGD(params, lr=1.0)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()  # a stray step while merged
    with pytest.warns(UserWarning, match="changed while merged"):
        shirakit.unmerge(model)
    now = _base_weights(model)
    for name, value in base.items():
        torch.testing.assert_close(now[name], value, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", list(ADDITIVE))
def test_unmerge_without_changes_says_nothing(method):
    model = _adapted(ADDITIVE[method])
    shirakit.merge(model, ["a"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shirakit.unmerge(model)


@pytest.mark.parametrize("method", list(ADDITIVE))
def test_exact_mode_restores_the_base_bit_exactly(method):
    model = MODELS["llama"]()
    torch.manual_seed(5)
    shirakit.inject(model, ADDITIVE[method](), "a")
    shirakit.inject(model, ADDITIVE[method](), "b")
    base = _base_weights(model)
    for i in range(40):
        shirakit.switch_adapter(model, "ab"[i % 2], exact=True)
    params = [p for n, p in model.named_parameters() if ".adapters.b." in n]
    with torch.no_grad():
        for p in params:
            p.add_(0.5)  # even changed values cannot disturb an exact unmerge
    shirakit.switch_adapter(model, None)
    now = _base_weights(model)
    for name, value in base.items():
        assert torch.equal(now[name], value), name
    shirakit.merge(model, ["a"], exact=True)
    shirakit.unmerge(model)
    now = _base_weights(model)
    for name, value in base.items():
        assert torch.equal(now[name], value), name
