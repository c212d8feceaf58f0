"""torch.compile: outputs equal to eager, and hot swaps that never recompile (counted by dynamo).

Recompiles are counted with dynamo's own frame counter (``CompileCounterWithBackend``): every
graph dynamo hands to a backend is one compilation. Most tests use the "eager"/"aot_eager"
backends (the point is what dynamo traces and guards, and they compile in a fraction of
inductor's time); a few run inductor for numerical equality of the generated code.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import shirakit
from tests.models import inputs, tiny_llama

ATOL = 1e-5


class MLP(nn.Module):
    """Three linear layers: dynamo traces it in well under a second."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up, self.mid, self.down = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.mid(torch.relu(self.up(x)))))


ALL = ["up", "mid", "down"]


def config(method: str, i: int, targets=ALL) -> shirakit.AdapterConfig:
    """Adapter i of a method: ranks differ between adapters where the method allows it."""
    if method == "lora":
        return shirakit.LoraConfig(r=2 + i % 3, lora_alpha=4 + i, target_modules=targets, init_lora_weights=False)
    if method == "vera":
        return shirakit.VeraConfig(r=4 + i % 3, projection_prng_key=i, target_modules=targets, init_weights=False)
    if method == "shira":
        return shirakit.ShiraConfig(r=1 + i % 2, random_seed=i, target_modules=targets, init_weights=False)
    mode = {"miss": "balance", "bat": "bat"}[method]
    return shirakit.MissConfig(r=4, init_weights=mode, init_random=True, target_modules=targets)


METHODS = ["lora", "vera", "shira", "miss", "bat"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def x_in(rows: int = 3) -> torch.Tensor:
    return torch.randn(rows, 5, 16, generator=torch.Generator().manual_seed(7))


#: torch.compile(model): the eager bookkeeping at the model's entry and exit (shirakit.compile.sync).
MODEL_CALL_BREAKS = 2


def graph_breaks() -> int:
    return sum(counters["graph_break"].values())


def layers(model: nn.Module) -> list[shirakit.AdapterLinear]:
    return [m for m in model.modules() if isinstance(m, shirakit.AdapterLinear)]


def model_with(adapters: dict[str, shirakit.AdapterConfig]) -> MLP:
    model = MLP().eval()
    for name, cfg in adapters.items():
        shirakit.inject(model, cfg, name)
    return model


@torch.no_grad()
def eager_outputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {}
    for name in names:
        shirakit.set_adapter(model, name)
        out[name] = model(x)
    return out


#: The layers adapter i targets: the ten adapters of a method differ in targets too.
TARGET_SETS = [ALL, ["up", "down"], ["mid"], ["down"]]


def ten_adapters(method: str):
    """A model with 10 adapters of one method (different ranks where the method has them, and
    different target modules), an input, and each adapter's eager output."""
    names = [f"a{i}" for i in range(10)]
    model = model_with({n: config(method, i, TARGET_SETS[i % 4]) for i, n in enumerate(names)})
    x = x_in()
    return names, model, x, eager_outputs(model, names, x)


def warmed_up(model: nn.Module, x: torch.Tensor, swap, names: list[str]):
    """The compiled model (eager backend, counting frames) after one call per adapter in ``names``."""
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        for name in names:
            swap(model, name)
            compiled(x)
    return compiled, counter


def swap_through(model, compiled, counter, names, x, expected) -> None:
    """set_adapter through every name and back: outputs equal eager, no compilation after warm-up."""
    warm = counter.frame_count
    with torch.no_grad():
        for name in names + names[::-1]:
            shirakit.set_adapter(model, name)
            torch.testing.assert_close(compiled(x), expected[name], atol=ATOL, rtol=0)
    assert counter.frame_count == warm, f"{counter.frame_count - warm} recompiles after warm-up"


# ---- hot swap: zero recompiles after warm-up ---------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_ten_adapters_swap_without_recompiling(method):
    """10 adapters (more than dynamo's 8-graph cache) with different targets, warm up on two,
    set_adapter through all ten and back."""
    names, model, x, expected = ten_adapters(method)
    shirakit.prepare_for_hotswap(model, on_recompile="raise")
    compiled, counter = warmed_up(model, x, shirakit.set_adapter, names[:2])
    swap_through(model, compiled, counter, names, x, expected)
    assert graph_breaks() == MODEL_CALL_BREAKS


def test_all_methods_and_different_targets_swap_without_recompiling():
    """One model, adapters of all four methods on different layers; prepared once, then swapped."""
    adapters = {
        "lora": config("lora", 0, ["up", "mid"]), "lora2": config("lora", 1, ["down"]),
        "vera": config("vera", 2, ["mid", "down"]), "shira": config("shira", 1, ["up"]),
        "miss": config("miss", 0, ["down"]), "bat": config("bat", 0, ["mid"]),
    }
    model = model_with(adapters)
    x = x_in()
    expected = eager_outputs(model, list(adapters), x)
    shirakit.prepare_for_hotswap(model, on_recompile="raise")
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        for name in ["lora", "shira"]:
            shirakit.set_adapter(model, name)
            compiled(x)
        warm = counter.frame_count
        for name in list(adapters) * 2:
            shirakit.set_adapter(model, name)
            torch.testing.assert_close(compiled(x), expected[name], atol=ATOL, rtol=0)
        for name in ["shira", "bat", "lora", None]:  # fused mode
            shirakit.switch_adapter(model, name)
            want = expected[name] if name else MLP()(x)
            torch.testing.assert_close(compiled(x), want, atol=ATOL, rtol=0)
        shirakit.switch_adapter(model, None)
        shirakit.set_adapter(model, "vera")
        with shirakit.disable_adapters(model):
            torch.testing.assert_close(compiled(x), MLP()(x), atol=ATOL, rtol=0)
    assert counter.frame_count == warm


def test_adapters_loaded_after_preparing_swap_in(tmp_path):
    """prepare_for_hotswap(r=, target_modules=) makes room for adapters that come later, from files."""
    model = model_with({"first": config("lora", 0, ["up"])})
    for i, targets in enumerate([["down"], ["mid", "down"]]):
        donor = model_with({"x": shirakit.LoraConfig(r=6, lora_alpha=3 + i, target_modules=targets,
                                                     init_lora_weights=False)})
        shirakit.save_adapter(donor, tmp_path / f"later{i}", "x")
    x = x_in()
    shirakit.prepare_for_hotswap(model, r=8, target_modules=ALL, on_recompile="raise")
    compiled, counter = warmed_up(model, x, shirakit.set_adapter, ["first"])
    warm = counter.frame_count
    with torch.no_grad():
        for i in range(2):
            shirakit.load_adapter(model, tmp_path / f"later{i}", f"later{i}")
            reference = MLP().eval()
            shirakit.load_adapter(reference, tmp_path / f"later{i}", "x")
            torch.testing.assert_close(compiled(x), reference(x), atol=ATOL, rtol=0)
    assert counter.frame_count == warm


def test_unprepared_swap_warns_or_raises():
    model = model_with({"a": config("lora", 0), "b": config("lora", 1)})
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        compiled(x_in())
    with pytest.warns(shirakit.RecompileWarning, match="not prepared"):
        shirakit.set_adapter(model, "a")
    shirakit.set_recompile_policy(model, "raise")
    with pytest.raises(shirakit.RecompileError, match="not prepared"):
        shirakit.set_adapter(model, "b")
    assert shirakit.active_adapters(model) == ["a"]  # refused: nothing changed
    shirakit.set_recompile_policy(model, "ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shirakit.set_adapter(model, "b")


def test_prepared_swap_that_does_not_fit_raises_and_changes_nothing():
    model = model_with({"a": config("lora", 0, ["up"])})  # r = 2
    shirakit.prepare_for_hotswap(model, on_recompile="raise")
    with pytest.raises(shirakit.RecompileError, match="does not fit"):
        shirakit.inject(model, shirakit.LoraConfig(r=4, target_modules=["up"]), "big")
    with pytest.raises(shirakit.RecompileError, match="not adapted before"):
        shirakit.inject(model, shirakit.LoraConfig(r=2, target_modules=["down"]), "elsewhere")
    assert list(model.shirakit.configs) == ["a"]
    assert isinstance(model.down, nn.Linear) and isinstance(model.up, shirakit.AdapterLinear)
    shirakit.inject(model, shirakit.LoraConfig(r=1, target_modules=["up"]), "small")  # fits: fine
    with pytest.raises(shirakit.RecompileError, match="two active adapters of one kind"):
        shirakit.set_adapter(model, ["a", "small"])


def test_fused_shira_switching_needs_no_preparation():
    """SHiRA in fused mode lives in the weight: the compiled forward reads no adapter name."""
    names, model, x, expected = ten_adapters("shira")
    shirakit.set_recompile_policy(model, "raise")
    compiled, counter = warmed_up(model, x, shirakit.switch_adapter, names[:2])
    warm = counter.frame_count
    with torch.no_grad():
        for name in names:
            shirakit.switch_adapter(model, name)
            torch.testing.assert_close(compiled(x), expected[name], atol=ATOL, rtol=0)
            shirakit.set_adapter(model, name)  # unmerged, in the weight: no recompile either
            shirakit.unmerge(model)
            torch.testing.assert_close(compiled(x), expected[name], atol=ATOL, rtol=0)
    assert counter.frame_count == warm


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("prepared", [False, True])
def test_swapping_the_active_adapters_values_does_not_recompile(method, prepared):
    """PEFT-style hot swap: new values copied into the active adapter's own tensors."""
    model = model_with({"a": config(method, 0), "donor": config(method, 0)})
    if prepared:
        shirakit.prepare_for_hotswap(model)
    x = x_in()
    compiled, counter = warmed_up(model, x, shirakit.set_adapter, ["a"])
    warm = counter.frame_count
    with torch.no_grad():
        for step in range(3):
            for layer in layers(model):
                for mine, theirs in zip(layer.adapters["a"].parameters(), layer.adapters["donor"].parameters()):
                    mine.copy_(theirs * (1 + step))
            got = compiled(x)
            torch.testing.assert_close(got, model(x), atol=ATOL, rtol=0)
    assert counter.frame_count == warm


# ---- equality with eager: training, routing, disable, generate --------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_training_step_matches_eager(method):
    """Every method; SHiRA's autograd Function (value gradient as a custom op) and MiSS bat's tap
    compile whole: one graph, the model's two bookkeeping breaks only."""
    eager, other = (model_with({"a": config(method, 0)}).train() for _ in range(2))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(other, backend=counter)
    x = x_in()
    target = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(3))
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.05) for m in (eager, other)]
    for _ in range(3):
        for run, opt in zip((eager, compiled), optimizers):
            loss = (run(x) - target).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
    for mine, theirs in zip(eager.parameters(), other.parameters()):
        torch.testing.assert_close(mine, theirs, atol=ATOL, rtol=0)
    assert counter.frame_count == 1 and graph_breaks() == MODEL_CALL_BREAKS


def test_route_mixed_batch_matches_eager():
    model = model_with({"a": config("lora", 0), "s": config("shira", 1), "m": config("bat", 0)})
    x = x_in(4)
    names = ["a", "s", "__base__", "m"]
    with torch.no_grad(), shirakit.route(model, names):
        expected = model(x)
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad(), shirakit.route(model, names):
        torch.testing.assert_close(compiled(x), expected, atol=ATOL, rtol=0)
    # each adapted layer's routed product runs eagerly (it scatters per group): the only breaks
    reasons = list(counters["graph_break"])
    allowed = ("_enter_model_call", "_leave_model_call", "_eager_layer_forward")
    assert reasons and all(any(a in r for a in allowed) for r in reasons), reasons
    # dynamo counts a break in a nested frame once per restart of its analysis: 1 + 7 + 1 here
    assert len(reasons) == len(allowed) and graph_breaks() >= MODEL_CALL_BREAKS + len(layers(model))
    with torch.no_grad():  # the keyword form, and a plain call after it: the route was per call
        torch.testing.assert_close(compiled(x, adapter_names=names), expected, atol=ATOL, rtol=0)
        shirakit.set_adapter(model, "s")
        torch.testing.assert_close(compiled(x), model(x), atol=ATOL, rtol=0)


@pytest.mark.slow  # inductor builds a C++ kernel per fused op
def test_inductor_outputs_equal_eager_for_every_method():
    """Inductor's generated code, one compile, adapters of every method swapped through it (one
    adapted layer: inductor builds a C++ kernel per fused op, seconds each on a small CPU)."""
    adapters = {m: config(m, 1, ["mid"]) for m in METHODS}
    model = model_with(adapters)
    x = x_in()
    expected = eager_outputs(model, list(adapters), x)
    with torch.no_grad():
        with shirakit.disable_adapters(model):
            base = model(x)
    shirakit.prepare_for_hotswap(model, on_recompile="raise")
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        for name in adapters:
            shirakit.set_adapter(model, name)
            torch.testing.assert_close(compiled(x), expected[name], atol=ATOL, rtol=1e-5)
        with shirakit.disable_adapters(model):
            torch.testing.assert_close(compiled(x), base, atol=ATOL, rtol=1e-5)
    assert counter.frame_count == 1


@pytest.mark.slow
def test_inductor_shira_training_step_matches_eager():
    eager, other = (model_with({"a": config("shira", 0, ["mid"])}).train() for _ in range(2))
    compiled = torch.compile(other, backend="inductor")
    x = x_in()
    for run in (eager, compiled):
        loss = run(x).pow(2).mean()
        loss.backward()
    for mine, theirs in zip(layers(eager), layers(other)):
        grads = [layer.adapters["a"].shira_weight.grad for layer in (mine, theirs)]
        torch.testing.assert_close(*grads, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_generate_with_compiled_forward_matches_eager(method):
    """transformers' generate on a model whose forward is compiled (the usual static-cache recipe)."""
    model = tiny_llama()
    targets = ["q_proj", "v_proj"] if method != "bat" else ["q_proj", "o_proj"]
    shirakit.inject(model, config(method, 1, targets), "a")
    ids = inputs(batch=1, length=6)
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    expected = model.generate(ids, **kwargs)
    model.forward = torch.compile(model.forward, backend="eager", dynamic=True)
    torch.testing.assert_close(model.generate(ids, **kwargs), expected)


# ---- SHiRA K padding: adapters that cannot live in the weight (tied layers) -------------------------
class TiedMLP(nn.Module):
    """``head`` shares its weight with an embedding (as lm_head does with embed_tokens): SHiRA runs
    additively there (never written into a shared tensor), so it needs a K-padded slot."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up, self.head = nn.Linear(16, 32), nn.Linear(32, 16)
        self.embed = nn.Embedding(16, 32)
        self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.up(x)))


def test_shira_k_padding_swaps_different_masks_and_targets_on_tied_layers():
    """10 SHiRA adapters with different r (so different K per layer), masks and targets; the tied
    head runs them additively from a slot padded to the layer's largest K with zero-valued slots."""
    targets = [["up", "head"], ["head"], ["up"]]
    model = TiedMLP().eval()
    names = [f"s{i}" for i in range(10)]
    for i, name in enumerate(names):
        shirakit.inject(model, shirakit.ShiraConfig(r=1 + i % 4, random_seed=i, init_weights=False,
                                                    target_modules=targets[i % 3]), name)
    head = model.head
    assert head.weight_shared_with and isinstance(head, shirakit.AdapterLinear)
    x = x_in()
    expected = eager_outputs(model, names, x)
    shirakit.prepare_for_hotswap(model, on_recompile="raise")
    ks = {head.adapters[n].shira_weight.numel() for n in names if n in head.adapters}
    (slot,) = head.hotswap.slots.values()
    assert len(ks) >= 3 and slot.get_buffer("shira_weight").numel() == max(ks)  # per-layer max K
    assert not model.up.hotswap.slots  # SHiRA lives in up's own weight: no slot there
    compiled, counter = warmed_up(model, x, shirakit.set_adapter, names[:2])
    swap_through(model, compiled, counter, names, x, expected)
    assert graph_breaks() == MODEL_CALL_BREAKS  # the additive SHiRA product is traced (no sparse tensor)


def test_shira_on_a_tied_layer_trains_compiled_like_eager():
    """The additive SHiRA product under compile (a gather and an index_add, no sparse tensor) has
    the same value gradients as the eager sparse product."""
    models = [TiedMLP().train() for _ in range(2)]
    for model in models:
        shirakit.inject(model, shirakit.ShiraConfig(r=2, random_seed=3, init_weights=False,
                                                    target_modules=["up", "head"]), "s")
    compiled = torch.compile(models[1], backend="aot_eager")
    x = x_in()
    for run in (models[0], compiled):
        run(x).pow(2).mean().backward()
    for mine, theirs in zip(models[0].parameters(), models[1].parameters()):
        if mine.requires_grad:
            torch.testing.assert_close(mine.grad, theirs.grad, atol=ATOL, rtol=0)


# ---- threads: a compiled call is a forward in flight ------------------------------------------------
class Paused(nn.Module):
    """An MLP whose forward waits (eagerly, a graph break) until released: a compiled call in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = MLP()
        self.inside, self.release = __import__("threading").Event(), __import__("threading").Event()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _wait(self, x)
        return self.mlp(x)


@torch.compiler.disable
def _wait(module: Paused, x: torch.Tensor) -> None:
    module.inside.set()
    assert module.release.wait(30)


@pytest.mark.filterwarnings("ignore::shirakit.compile.slots.RecompileWarning")
@pytest.mark.parametrize("method", ["shira", "lora"])
def test_compiled_call_in_flight_refuses_writers_and_leaves_nothing_behind(method):
    import threading

    model = Paused().eval()
    for i, name in enumerate(["a", "b"]):
        shirakit.inject(model, config(method, i, ["mlp.up", "mlp.mid", "mlp.down"]), name)
    compiled = torch.compile(model, backend="eager")
    x = x_in()
    results = []
    with torch.no_grad():
        worker = threading.Thread(target=lambda: results.append(compiled(x)))
        worker.start()
        assert model.inside.wait(60)
        with pytest.raises(shirakit.ConcurrentUseError):
            shirakit.set_adapter(model, "b")
        model.release.set()
        worker.join(60)
        assert results and not worker.is_alive()
        shirakit.set_adapter(model, "b")  # nothing left in flight
        torch.testing.assert_close(compiled(x), model.mlp(x), atol=ATOL, rtol=0)
        with pytest.raises(RuntimeError):  # a compiled call that raises leaves nothing in flight either
            compiled(torch.randn(2, 7))
        shirakit.set_adapter(model, "a")


@pytest.mark.parametrize("method", ["shira", "lora"])
def test_compiled_forward_is_one_full_graph(method):
    """``model.forward = torch.compile(model.forward, fullgraph=True)``: the model's hooks run
    outside the compiled function, so nothing breaks the graph (fullgraph raises on any break)."""
    names, model, x, expected = ten_adapters(method)
    shirakit.prepare_for_hotswap(model, on_recompile="raise")
    counter = CompileCounterWithBackend("eager")
    model.forward = torch.compile(model.forward, backend=counter, fullgraph=True)
    with torch.no_grad():
        for name in names[:2]:
            shirakit.set_adapter(model, name)
            model(x)
    swap_through(model, model, counter, names, x, expected)
    assert graph_breaks() == 0


def test_transformers_model_compiled_whole_swaps_every_method_without_recompiling():
    """torch.compile(model) on a transformers Llama: ten adapters of all four methods with other
    targets and ranks (SHiRA also on the lm_head), prepared once, swapped: equal logits, 0 recompiles."""
    model = tiny_llama()
    model.config.use_cache = False  # outputs: logits only
    attn, mlp = ["q_proj", "v_proj"], ["gate_proj", "down_proj"]
    adapters = {
        "lora1": config("lora", 0, attn), "lora2": config("lora", 1, mlp), "lora3": config("lora", 2, attn + mlp),
        "vera1": config("vera", 0, attn), "vera2": config("vera", 1, ["q_proj"]),
        "shira1": config("shira", 0, attn + ["lm_head"]), "shira2": config("shira", 1, mlp),
        "miss1": config("miss", 0, ["q_proj"]), "bat1": config("bat", 0, ["q_proj", "o_proj"]),
        "bat2": config("bat", 1, ["o_proj"]),
    }
    for name, cfg in adapters.items():
        shirakit.inject(model, cfg, name)
    ids = inputs(batch=2, length=6)
    expected = eager_outputs(model, list(adapters), ids)
    shirakit.prepare_for_hotswap(model, on_recompile="raise")
    names = list(adapters)
    compiled, counter = warmed_up(model, ids, shirakit.set_adapter, names[:2])
    swap_through(model, compiled, counter, names, ids, expected)
    assert graph_breaks() == MODEL_CALL_BREAKS
