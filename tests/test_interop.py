"""Files move both ways between shirakit and peft with identical outputs, for every method (peft is
the oracle), and merging follows peft's formula; then what is particular to VeRA and MiSS: gradients
against peft, shared projections, modes, their errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import shirakit
from shirakit.core.state import SHARED_ATTR, adapter_layers, shared_of
from shirakit.io.checkpoint import WEIGHTS_NAME
from tests.checks import assert_load_fails, assert_untouched, edit_weights
from tests.models import MODELS, inputs, output

peft = pytest.importorskip("peft")

LLAMA_T = ["q_proj", "k_proj", "down_proj"]  # in/out: 64/64, 64/32, 96/64
MISS_ROWS = {
    # id: (model, kwargs shared by both libraries)
    "balance-r8": ("llama", dict(r=8, target_modules=LLAMA_T, init_weights=True)),
    "balance-r5-padded": ("llama", dict(r=5, target_modules=LLAMA_T, init_weights=True)),
    "bat-r8": ("llama", dict(r=8, target_modules=LLAMA_T, init_weights="bat")),
    "mini-r4-m8": ("llama", dict(r=4, mini_r=8, target_modules=LLAMA_T, init_weights="mini")),
    "balance-bert-head": ("bert", dict(r=8, target_modules=["query", "value"], modules_to_save=["classifier"])),
}
VERA_ROWS = {
    "proj-saved": ("llama", dict(r=8, target_modules=LLAMA_T, projection_prng_key=3)),
    "proj-not-saved": ("llama", dict(r=8, target_modules=LLAMA_T, projection_prng_key=3, save_projection=False)),
    "all-linear": ("llama", dict(r=4, target_modules="all-linear", save_projection=False, d_initial=0.3)),
    "gpt2-conv1d": ("gpt2", dict(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, save_projection=False)),
    "bert-head": ("bert", dict(r=4, target_modules=["query", "dense"], modules_to_save=["classifier"])),
}
LORA_ROWS = {
    "llama": ("llama", dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                            init_lora_weights=False)),
    "rslora-all-linear": ("llama", dict(r=8, lora_alpha=4, use_rslora=True, target_modules="all-linear",
                                        init_lora_weights=False)),
    "gpt2-conv1d": ("gpt2", dict(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights=False)),
    "bert-head": ("bert", dict(r=4, target_modules=["query", "value"], modules_to_save=["classifier"],
                               init_lora_weights=False)),
}
SHIRA_ROWS = {
    "llama": ("llama", dict(r=2, target_modules=["q_proj", "up_proj"], init_weights=False)),
    "bert-head": ("bert", dict(r=2, target_modules=["query", "dense"], modules_to_save=["classifier"],
                               init_weights=False)),
}
ROWS = [(f"lora-{k}", m, "LoraConfig", kw) for k, (m, kw) in LORA_ROWS.items()]
ROWS += [(f"shira-{k}", m, "ShiraConfig", kw) for k, (m, kw) in SHIRA_ROWS.items()]
ROWS += [(f"miss-{k}", m, "MissConfig", kw) for k, (m, kw) in MISS_ROWS.items()]
ROWS += [(f"vera-{k}", m, "VeraConfig", kw) for k, (m, kw) in VERA_ROWS.items()]


def _randomize(model, seed=7):
    """Trainable adapter tensors (and classifier copies) get random values, in both libraries."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if any(k in name for k in ("miss_block", "vera_lambda", "classifier")) and p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _peft_model(model_name, cls_name, kwargs):
    torch.manual_seed(7)  # peft's own random init (LoRA's A and B with init_lora_weights=False)
    pm = peft.get_peft_model(MODELS[model_name](), getattr(peft, cls_name)(**kwargs))
    _randomize(pm)
    return pm.eval()


def _ours(model_name, cls_name, kwargs, name="default"):
    model = MODELS[model_name]()
    shirakit.inject(model, getattr(shirakit, cls_name)(**kwargs), name)
    _randomize(model)
    return model


@pytest.mark.parametrize("direction", ["peft-to-shirakit", "shirakit-to-peft"])
@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_files_move_both_ways(row, direction, tmp_path):
    """The writer's outputs are the reader's, to fp32 rounding; merging follows peft's formula."""
    _, model_name, cls_name, kwargs = row
    ids = inputs()
    from_peft = direction == "peft-to-shirakit"
    writer = _peft_model(model_name, cls_name, kwargs) if from_peft else _ours(model_name, cls_name, kwargs)
    expected = output(writer, ids)
    if from_peft:
        writer.save_pretrained(tmp_path)
        reader = shirakit.load_adapter(MODELS[model_name](), tmp_path)
    else:
        shirakit.save_adapter(writer, tmp_path)
        reader = peft.PeftModel.from_pretrained(MODELS[model_name](), tmp_path).eval()
    torch.testing.assert_close(output(reader, ids), expected, atol=1e-6, rtol=1e-5)
    if from_peft:  # merging follows peft's merge formula for every method and mode
        shirakit.merge(reader)
        theirs = dict(writer.merge_and_unload().named_modules())
        for name, layer in adapter_layers(reader):
            torch.testing.assert_close(layer.weight, theirs[name].weight, atol=1e-6, rtol=1e-5, msg=name)


def test_saved_shira_file_has_peft_layout(tmp_path):
    model = MODELS["llama"]()
    shirakit.inject(model, shirakit.ShiraConfig(r=2, target_modules=["q_proj"]))
    shirakit.save_adapter(model, tmp_path)
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    key = "base_model.model.model.layers.0.self_attn.q_proj.shira_indices"
    assert tensors[key].dtype == torch.int32 and tensors[key].shape == (2, 2 * (64 + 64))
    assert tensors[key.replace("indices", "weight")].shape == (2 * (64 + 64),)


@pytest.mark.parametrize("mode", [True, "bat", "mini"])
def test_miss_gradients_match_peft(mode, tmp_path):
    kwargs = dict(r=4, mini_r=8, target_modules=LLAMA_T, init_weights=mode)
    ids = inputs()
    pm = _peft_model("llama", "MissConfig", kwargs)
    pm.save_pretrained(tmp_path)
    model = MODELS["llama"]()
    shirakit.load_adapter(model, tmp_path, is_trainable=True)
    output(pm, ids).square().mean().backward()
    output(model, ids).square().mean().backward()
    theirs = {n.replace("base_model.model.", "").replace(".miss_block.default", ""): p.grad
              for n, p in pm.named_parameters() if "miss_block" in n}
    for name, layer in adapter_layers(model):
        torch.testing.assert_close(layer.adapters["default"].miss_block.grad, theirs[name], atol=1e-6, rtol=1e-4)


# ---- VeRA: shared projections ------------------------------------------------------------------
def test_vera_projections_bit_equal_to_peft():
    for key, r in [(0, 4), (3, 8), (12345, 16)]:
        kwargs = dict(r=r, target_modules=["q_proj", "k_proj", "up_proj"], projection_prng_key=key)
        pm = peft.get_peft_model(MODELS["llama"](), peft.VeraConfig(**kwargs))
        model = _ours("llama", "VeraConfig", kwargs)
        holder = shared_of(model, "default")
        assert torch.equal(holder.vera_A, pm.base_model.vera_A["default"])  # (r, 64)
        assert torch.equal(holder.vera_B, pm.base_model.vera_B["default"])  # (96, r)


def test_vera_shared_once_per_model_not_in_state_dict():
    model = MODELS["llama"]()
    base_keys = set(model.state_dict())
    shirakit.inject(model, shirakit.VeraConfig(r=4, target_modules="all-linear", init_weights=False))
    sd_keys = set(model.state_dict())
    assert not any("vera_A" in k or "vera_B" in k for k in sd_keys)
    wrapped_base = {k.replace("_proj.", "_proj.base_layer.") for k in base_keys}
    assert {k for k in sd_keys if ".adapters." not in k} == wrapped_base
    ids = inputs()
    expected = output(model, ids).double()
    model.to(torch.float64)  # the holder moves once, with the model; layers still point at it
    holder = shared_of(model, "default")
    assert holder.vera_A.dtype == torch.float64
    layers = adapter_layers(model)
    assert all(layer.adapters["default"]._shared is holder for _, layer in layers)
    assert len([b for b in model.buffers() if b.shape == holder.vera_A.shape and b.data_ptr() ==
                holder.vera_A.data_ptr()]) == 1
    torch.testing.assert_close(output(model, ids), expected, atol=1e-5, rtol=1e-5)
    plain = shirakit.unload(model)
    assert not hasattr(plain, SHARED_ATTR)


def test_vera_two_adapters_different_r(tmp_path):
    """peft refuses a larger r after a smaller one; here each adapter owns its projections."""
    ids = inputs()
    rows = {"small": dict(r=4, projection_prng_key=1), "big": dict(r=16, projection_prng_key=1, save_projection=False)}
    expected = {}
    for name, kw in rows.items():  # peft -> shirakit: one peft file per adapter, both into one model
        pm = _peft_model("llama", "VeraConfig", dict(target_modules=LLAMA_T, **kw))
        expected[name] = output(pm, ids)
        pm.save_pretrained(tmp_path / name)
    model = MODELS["llama"]()
    for name in rows:
        shirakit.load_adapter(model, tmp_path / name, adapter_name=name)
    assert shared_of(model, "small").vera_A.shape == (4, 96) and shared_of(model, "big").vera_A.shape == (16, 96)
    for name in rows:
        shirakit.set_adapter(model, name)
        torch.testing.assert_close(output(model, ids), expected[name], atol=1e-6, rtol=1e-5)
    # shirakit -> peft: save each adapter of the two-adapter model, load each into peft
    for name in rows:
        shirakit.save_adapter(model, tmp_path / f"ours-{name}", adapter_name=name)
        pm = peft.PeftModel.from_pretrained(MODELS["llama"](), tmp_path / f"ours-{name}").eval()
        torch.testing.assert_close(output(pm, ids), expected[name], atol=1e-6, rtol=1e-5)
    shirakit.delete_adapter(model, "small")
    assert shared_of(model, "small") is None and shared_of(model, "big") is not None


def test_vera_save_projection_controls_file_keys(tmp_path):
    for save in (True, False):
        model = _ours("llama", "VeraConfig", dict(r=4, target_modules=["q_proj"], save_projection=save))
        shirakit.save_adapter(model, tmp_path / str(save))
        keys = set(load_file(str(tmp_path / str(save) / WEIGHTS_NAME)))
        assert ({"base_model.vera_A", "base_model.vera_B"} <= keys) == save
        assert all(k.startswith("base_model.model.") for k in keys - {"base_model.vera_A", "base_model.vera_B"})


# ---- MiSS: modes, exact unmerge ----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bat_unmerge_is_exact(dtype):
    model = MODELS["llama"](dtype=dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shirakit.inject(model, shirakit.MissConfig(r=8, target_modules=LLAMA_T, init_weights="bat", init_random=True))
    ids = inputs()
    unmerged = output(model, ids)
    shirakit.merge(model)
    merged = output(model, ids)
    assert merged.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(merged, unmerged, atol=tol, rtol=tol)
    shirakit.unmerge(model)
    plain = shirakit.unload(model)
    for key, value in plain.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_two_modes_on_one_layer():
    ids = inputs()
    kw = dict(target_modules=LLAMA_T, init_random=True)
    configs = {"bal": shirakit.MissConfig(r=4, init_weights=False, **kw),
               "bat": shirakit.MissConfig(r=8, init_weights="bat", **kw),
               "mini": shirakit.MissConfig(r=4, mini_r=16, init_weights="mini", **kw)}
    alone = {}
    for name, config in configs.items():
        single = MODELS["llama"]()
        torch.manual_seed(0)
        shirakit.inject(single, config, name)
        alone[name] = output(single, ids)
    model = MODELS["llama"]()
    for name, config in configs.items():
        torch.manual_seed(0)
        shirakit.inject(model, config, name)
    for name in configs:
        shirakit.set_adapter(model, name)
        torch.testing.assert_close(output(model, ids), alone[name], atol=1e-6, rtol=1e-6)
    shirakit.set_adapter(model, list(configs))
    together = output(model, ids)
    shirakit.merge(model)  # bat goes in first, as forward writes it into the weight; the others add
    torch.testing.assert_close(output(model, ids), together, atol=1e-5, rtol=1e-5)


def test_miss_conv1d_matches_dense_delta():
    """peft's MiSS takes nn.Linear only; on GPT-2's Conv1D shirakit reads the weight transposed."""
    ids = inputs()
    for mode in (True, "bat", "mini"):
        model = MODELS["gpt2"]()
        shirakit.inject(model, shirakit.MissConfig(r=8, mini_r=8, target_modules=["c_attn", "c_fc"],
                                                   init_weights=mode, init_random=True))
        expected = output(model, ids)
        shirakit.merge(model)
        torch.testing.assert_close(output(model, ids), expected, atol=1e-5, rtol=1e-5)


# ---- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(r=5, init_weights="bat"), r"q_proj: MiSS 'bat' needs .* divisible by r=5 .*in_features=64, out_features=64"),
    (dict(r=4, init_weights="bat", target_modules=["k_proj", "down_proj"]), None),  # fine: 32, 64, 96 all divide
    (dict(r=4, mini_r=7, init_weights="mini"), r"q_proj: MiSS 'mini' needs out_features divisible by mini_r=7"),
    (dict(r=128, init_weights=True), r"q_proj: MiSS r=128 exceeds in_features=64"),
])
def test_miss_shape_errors_at_inject(kwargs, match):
    model = MODELS["llama"]()
    base = output(model, inputs())
    kwargs = {"target_modules": ["q_proj", "down_proj"], **kwargs}
    if match is None:
        shirakit.inject(model, shirakit.MissConfig(**kwargs))
        return
    with pytest.raises(ValueError, match=match):
        shirakit.inject(model, shirakit.MissConfig(**kwargs))
    assert_untouched(model, base)


def test_miss_bad_config():
    with pytest.raises(ValueError, match="init_weights='householder'"):
        shirakit.MissConfig(init_weights="householder")
    with pytest.raises(ValueError, match="mini_r"):
        shirakit.MissConfig(mini_r=0)


@pytest.fixture
def vera_saved(tmp_path):
    model = _ours("llama", "VeraConfig", dict(r=4, target_modules=["q_proj", "up_proj"]))
    shirakit.save_adapter(model, tmp_path)
    return tmp_path


def test_vera_missing_projection(vera_saved):
    edit_weights(vera_saved, lambda t: t.pop("base_model.vera_B"))
    assert_load_fails(vera_saved, r"adapter_model.safetensors: missing 1 key.*'base_model.vera_B'")


def test_vera_projection_wrong_shape(vera_saved):
    edit_weights(vera_saved, lambda t: t.update({"base_model.vera_A": torch.zeros(4, 63)}))
    assert_load_fails(vera_saved, r"adapter_model.safetensors: key 'base_model.vera_A'.*expected shape \(4, 64\), "
                                   r"found \(4, 63\)")


def test_vera_projection_not_finite(vera_saved):
    edit_weights(vera_saved, lambda t: t["base_model.vera_A"].__setitem__((0, 0), float("nan")))
    assert_load_fails(vera_saved, r"'base_model.vera_A'.*non-finite")


def test_vera_unexpected_shared_key(vera_saved):
    edit_weights(vera_saved, lambda t: t.update({"base_model.vera_C": torch.zeros(2)}))
    assert_load_fails(vera_saved, r"adapter_model.safetensors: 1 unexpected key.*'base_model.vera_C'")


def test_shared_key_on_a_method_without_shared_tensors(tmp_path):
    model = MODELS["llama"]()
    shirakit.inject(model, shirakit.MissConfig(r=8, target_modules=["q_proj"]))
    shirakit.save_adapter(model, tmp_path)
    edit_weights(tmp_path, lambda t: t.update({"base_model.vera_A": torch.zeros(8, 64)}))
    assert_load_fails(tmp_path, r"unexpected key.*'base_model.vera_A'")


def test_vera_projection_in_file_but_config_says_not_saved(tmp_path):
    """As peft: the config wins, the projections are rebuilt from the key (with a warning)."""
    ids = inputs()
    model = _ours("llama", "VeraConfig", dict(r=4, target_modules=["q_proj"], save_projection=False))
    expected = output(model, ids)
    shirakit.save_adapter(model, tmp_path)
    ones = {"base_model.vera_A": torch.ones(4, 64), "base_model.vera_B": torch.ones(64, 4)}
    edit_weights(tmp_path, lambda t: t.update(ones))
    fresh = MODELS["llama"]()
    with pytest.warns(UserWarning, match="base_model.vera_A.*not saved"):
        shirakit.load_adapter(fresh, tmp_path)
    assert torch.equal(output(fresh, ids), expected)


def test_bat_trains_in_the_weight_and_resyncs(tmp_path):
    """bat lives in the weight while active: state_dict shows the clean base, a step re-writes it."""
    model = MODELS["llama"]()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    shirakit.inject(model, shirakit.MissConfig(r=8, target_modules=LLAMA_T, init_weights="bat", init_random=True))
    ids = inputs()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    output(model, ids).square().mean().backward()
    opt.step()
    after_step = output(model, ids)
    for key, value in model.state_dict().items():  # the base weights, never the written-in delta
        if ".adapters." not in key:
            assert torch.equal(value, base[key.replace(".base_layer.", ".")]), key
    shirakit.save_adapter(model, tmp_path)
    fresh = MODELS["llama"]()
    shirakit.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(output(fresh, ids), after_step, atol=1e-6, rtol=1e-6)
