"""Concurrent use of one model: per-call routes, the model lock, and the clear refusal.

Real threads, each loop bounded in count and every join bounded in time.
"""

from __future__ import annotations

import threading

import pytest
import torch

import shirakit
from shirakit import ConcurrentUseError
from shirakit.core.adapter import InWeightAdapter
from shirakit.model.routing import route
from tests.checks import rows_alone
from tests.models import MODELS, TARGETS, inputs, output

JOIN_S = 120
ROUNDS = 12


def _shira(seed):
    return shirakit.ShiraConfig(r=2, target_modules=TARGETS["llama"], init_weights=False, random_seed=seed)


def _bat(seed):
    torch.manual_seed(seed)
    return shirakit.MissConfig(r=4, target_modules=TARGETS["llama"], init_weights="bat", init_random=True)


def _lora(seed):
    torch.manual_seed(seed)
    return shirakit.LoraConfig(r=4, target_modules=TARGETS["llama"], init_lora_weights=False)


def _model(makers):
    model = MODELS["llama"]()
    for i, (name, make) in enumerate(makers.items()):
        shirakit.inject(model, make(10 + i), name)
    return model


def _run_threads(*targets):
    """Run each target in its own thread, started together; re-raise the first failure."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(targets))

    def wrap(target):
        try:
            barrier.wait(timeout=JOIN_S)
            target()
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(t,), daemon=True) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=JOIN_S)
    assert not any(t.is_alive() for t in threads), "a thread did not finish in time"
    if errors:
        raise errors[0]


def _base_weights(model):
    """The base parameters by their plain names (as after unload), copied."""
    return {n.replace(".base_layer", ""): p.detach().clone() for n, p in model.named_parameters()
            if ".adapters." not in n}


def _assert_base_is(model, base):
    now = _base_weights(model)
    assert now.keys() == base.keys()
    for name, value in base.items():
        assert torch.equal(now[name], value), name


@pytest.mark.parametrize("makers", [
    {"a": _shira, "b": _shira},
    {"a": _bat, "b": _shira},
    {"a": _lora, "b": _shira},
], ids=["shira", "bat+shira", "lora+shira"])
@pytest.mark.parametrize("scatter_path", [False, True], ids=["sparse", "scatter"])
def test_two_routed_threads_and_a_plain_one_each_get_their_own_adapters(makers, scatter_path, monkeypatch):
    monkeypatch.setattr(InWeightAdapter, "prefers_weight", lambda self, tokens: scatter_path)
    model = _model(makers)
    ids = inputs(batch=3)
    names_1, names_2 = ["a", "b", "__base__"], ["b", "__base__", "a"]
    with torch.no_grad():
        want_1, want_2 = rows_alone(model, ids, names_1), rows_alone(model, ids, names_2)
        shirakit.set_adapter(model, "a")  # the plain thread runs with "a" live in the weights
        want_plain = output(model, ids)
    wrong = {"route 1": 0, "route 2": 0, "plain": 0}

    def routed(names, want, key):
        def run():
            for _ in range(ROUNDS):
                with torch.no_grad(), route(model, names):
                    got = output(model, ids)
                wrong[key] += not torch.allclose(got, want, atol=1e-5, rtol=1e-5)
        return run

    def plain():
        for _ in range(ROUNDS):
            with torch.no_grad():
                wrong["plain"] += not torch.allclose(output(model, ids), want_plain, atol=1e-5, rtol=1e-5)

    _run_threads(routed(names_1, want_1, "route 1"), routed(names_2, want_2, "route 2"), plain)
    assert wrong == {"route 1": 0, "route 2": 0, "plain": 0}
    with torch.no_grad():  # nothing stayed behind in routed mode
        torch.testing.assert_close(output(model, ids), want_plain, atol=1e-5, rtol=1e-5)
    shirakit.unload(model)


def test_keyword_routing_in_two_threads():
    model = _model({"a": _shira, "b": _bat})
    ids = inputs(batch=2)
    with torch.no_grad():
        want = {("a", "b"): rows_alone(model, ids, ["a", "b"]), ("b", "a"): rows_alone(model, ids, ["b", "a"])}
    wrong = []

    def run(names):
        def loop():
            for _ in range(ROUNDS):
                with torch.no_grad():
                    got = model(input_ids=ids, adapter_names=list(names)).logits
                wrong.append(not torch.allclose(got, want[names], atol=1e-5, rtol=1e-5))
        return loop

    _run_threads(run(("a", "b")), run(("b", "a")))
    assert not any(wrong) and len(wrong) == 2 * ROUNDS


class _Pause:
    """A forward hook that parks the forward inside a layer until released (deterministic overlap)."""

    def __init__(self, module):
        self.inside, self.release = threading.Event(), threading.Event()
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, args, out):
        self.inside.set()
        assert self.release.wait(JOIN_S)


def _in_other_thread(fn):
    errors: list[BaseException] = []

    def run():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def test_a_route_is_invisible_to_other_threads():
    """Before: route() set state on the layers, so a plain forward elsewhere ran routed rows."""
    model = _model({"a": _shira, "b": _lora})
    ids = inputs(batch=2)
    with torch.no_grad():
        shirakit.set_adapter(model, "b")
        want_plain = output(model, ids)
    entered, leave = threading.Event(), threading.Event()

    def routed():
        with route(model, ["a", "__base__"]):
            entered.set()
            assert leave.wait(JOIN_S)

    thread, errors = _in_other_thread(routed)
    assert entered.wait(JOIN_S)
    try:
        with torch.no_grad():
            torch.testing.assert_close(output(model, ids), want_plain, atol=1e-5, rtol=1e-5)
    finally:
        leave.set()
        thread.join(JOIN_S)
    assert not errors


@pytest.mark.parametrize("change", [
    lambda m: shirakit.set_adapter(m, "b"),
    lambda m: shirakit.switch_adapter(m, "b"),
    lambda m: shirakit.merge(m, ["a"]),
    lambda m: shirakit.set_scale(m, "a", 0.5),
    lambda m: shirakit.delete_adapter(m, "b"),
    lambda m: m.state_dict(),
    lambda m: shirakit.disable_adapters(m).__enter__(),
], ids=["set_adapter", "switch_adapter", "merge", "set_scale", "delete_adapter", "state_dict", "disable"])
def test_a_change_during_another_threads_forward_is_refused(change):
    """A forward parked inside layer 1 relies on "a" living in the weights of every layer: changing
    the model now would mix adapters within that forward, so the change raises; the weights and the
    parked forward's result stay right, and afterwards the same change goes through."""
    model = _model({"a": _shira, "b": _bat})
    ids = inputs(batch=2)
    base = _base_weights(model)
    with torch.no_grad():
        shirakit.set_adapter(model, "a")
        want = output(model, ids)
    pause = _Pause(model.model.layers[1].self_attn.q_proj)
    got = []
    thread, errors = _in_other_thread(lambda: got.append(output(model, ids).detach()))
    assert pause.inside.wait(JOIN_S)
    try:
        with pytest.raises(ConcurrentUseError, match="another thread|other thread"):
            change(model)
    finally:
        pause.release.set()
        thread.join(JOIN_S)
    assert not errors and not thread.is_alive()
    torch.testing.assert_close(got[0], want, atol=1e-5, rtol=1e-5)
    pause.handle.remove()
    change(model)  # alone now: allowed
    shirakit.unload(model)
    _assert_base_is(model, base)


@pytest.mark.parametrize("makers", [{"a": _shira, "b": _bat}, {"a": _bat, "b": _bat}], ids=["shira+bat", "bat+bat"])
def test_set_adapter_from_two_threads_never_corrupts_the_base(makers):
    """Before: two threads switching SHiRA / MiSS-bat left the base weights permanently changed."""
    model = _model(makers)
    ids = inputs(batch=2)
    base = _base_weights(model)
    refused = []

    def switcher(name):
        def loop():
            for _ in range(ROUNDS):
                try:
                    shirakit.set_adapter(model, name)
                    with torch.no_grad():
                        output(model, ids)
                except ConcurrentUseError:
                    refused.append(name)
        return loop

    _run_threads(switcher("a"), switcher("b"))
    shirakit.unload(model)
    _assert_base_is(model, base)


def test_training_threads_see_their_gradients():
    """Two threads training-style forwards on one live SHiRA adapter: identical value gradients."""
    model = _model({"a": _shira})
    model.train()
    ids = inputs(batch=2)
    values = [p for n, p in model.named_parameters() if p.requires_grad]

    def grads():
        model.zero_grad()
        output(model, ids).pow(2).mean().backward()
        return [p.grad.clone() for p in values]

    want = grads()
    got = []

    def loop():
        for _ in range(4):
            out = output(model, ids).pow(2).mean()
            got.append(torch.autograd.grad(out, values))

    _run_threads(loop, loop)
    for g in got:
        for a, b in zip(g, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
