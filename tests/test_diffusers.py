"""Adapters on diffusers pipelines (shirakit.diffusers): per-component load / save / switch / combine / unload, the
folder layout PEFT reads, diffusers' and kohya's LoRA files against diffusers' own loader, hot swap under compile."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

pytest.importorskip("diffusers")

import shirakit  # noqa: E402
import shirakit.diffusers as sd  # noqa: E402
from tests.diffusion_tiny import ATTENTION, TEXT_ATTENTION, tiny_pipeline, unet_inputs  # noqa: E402


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-pipe")


@pytest.fixture
def pipe(pipe_dir):
    return tiny_pipeline(pipe_dir)


def unet_out(pipe):
    x, t, h = unet_inputs()
    with torch.no_grad():
        return pipe.unet(x, t, encoder_hidden_states=h).sample


def text_out(pipe):
    ids = torch.tensor([[512, 40, 41, 42, 513]])
    with torch.no_grad():
        return pipe.text_encoder(ids).last_hidden_state


def snapshot(pipe):
    return {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in sd.components(pipe).items()}


def both(seed_unet=1, seed_text=2, method="shira"):
    if method == "shira":
        return {"unet": shirakit.ShiraConfig(r=2, target_modules=ATTENTION, random_seed=seed_unet),
                "text_encoder": shirakit.ShiraConfig(r=2, target_modules=TEXT_ATTENTION, random_seed=seed_text)}
    return {"unet": shirakit.LoraConfig(r=2, target_modules=ATTENTION, init_lora_weights=False),
            "text_encoder": shirakit.LoraConfig(r=2, target_modules=TEXT_ATTENTION, init_lora_weights=False)}


def randomize(pipe, name, seed):
    """Non-zero adapter values (SHiRA starts at zero: a fresh adapter would change nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in sd.holders(pipe, name).values():
            for pname, p in module.named_parameters():
                if f".adapters.{name}." in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_components_and_denoiser(pipe):
    assert {"unet", "text_encoder", "vae"} <= set(sd.components(pipe))
    assert "tokenizer" not in sd.components(pipe) and "scheduler" not in sd.components(pipe)
    assert sd.denoiser_name(pipe) == "unet"
    with pytest.raises(TypeError, match="expected a diffusers pipeline"):
        sd.components(pipe.unet)


def test_inject_denoiser_only_by_default(pipe):
    sd.inject(pipe, shirakit.ShiraConfig(r=2, target_modules=ATTENTION), "style")
    assert sorted(sd.adapted(pipe)) == ["unet"]
    assert sd.adapter_names(pipe) == ["style"]
    assert sd.active_adapters(pipe) == {"unet": ["style"]}


def test_save_load_round_trip_per_component(pipe, pipe_dir, tmp_path):
    sd.inject(pipe, both(), "a")
    randomize(pipe, "a", 0)
    want_unet, want_text = unet_out(pipe), text_out(pipe)
    sd.save_adapter(pipe, tmp_path / "a", "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["text_encoder", "unet"]
    assert (tmp_path / "a" / "unet" / "adapter_config.json").is_file()
    fresh = tiny_pipeline(pipe_dir)
    base_unet = unet_out(fresh)
    sd.load_adapter(fresh, tmp_path / "a", "a")
    assert torch.equal(unet_out(fresh), want_unet) and torch.equal(text_out(fresh), want_text)
    assert not torch.equal(base_unet, want_unet)


def test_save_replaces_the_folder_whole(pipe, tmp_path):
    sd.inject(pipe, both(), "a")
    sd.inject(pipe, shirakit.ShiraConfig(r=2, target_modules=ATTENTION), "b")  # unet only
    sd.save_adapter(pipe, tmp_path / "x", "a")
    sd.save_adapter(pipe, tmp_path / "x", "b")
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["unet"]
    assert [p.name for p in tmp_path.iterdir()] == ["x"]  # no staging folder left


def test_peft_reads_each_subfolder(pipe, pipe_dir, tmp_path):
    peft = pytest.importorskip("peft")
    sd.inject(pipe, both(method="lora"), "a")
    want_unet, want_text = unet_out(pipe), text_out(pipe)
    sd.save_adapter(pipe, tmp_path / "a", "a")
    fresh = tiny_pipeline(pipe_dir)
    unet = peft.PeftModel.from_pretrained(fresh.unet, tmp_path / "a" / "unet")
    text = peft.PeftModel.from_pretrained(fresh.text_encoder, tmp_path / "a" / "text_encoder")
    x, t, h = unet_inputs()
    with torch.no_grad():
        got_unet = unet(x, t, encoder_hidden_states=h).sample
        got_text = text(torch.tensor([[512, 40, 41, 42, 513]])).last_hidden_state
    torch.testing.assert_close(got_unet, want_unet, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_text, want_text, atol=1e-5, rtol=1e-5)


def test_peft_shira_subfolder(pipe, pipe_dir, tmp_path):
    peft = pytest.importorskip("peft")
    sd.inject(pipe, both(), "a")
    randomize(pipe, "a", 1)
    want = unet_out(pipe)
    sd.save_adapter(pipe, tmp_path / "a", "a")
    unet = peft.PeftModel.from_pretrained(tiny_pipeline(pipe_dir).unet, tmp_path / "a" / "unet")
    x, t, h = unet_inputs()
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, encoder_hidden_states=h).sample, want, atol=1e-5, rtol=1e-5)


def test_switch_is_bit_exact_back_to_base(pipe):
    base = snapshot(pipe)
    base_out = unet_out(pipe)
    sd.inject(pipe, both(1, 2), "a")
    randomize(pipe, "a", 3)
    sd.inject(pipe, {"unet": shirakit.ShiraConfig(r=3, target_modules=["to_q", "to_v"], random_seed=5)}, "b")
    randomize(pipe, "b", 4)
    sd.set_adapter(pipe, "a")
    want_a = unet_out(pipe), text_out(pipe)
    sd.set_adapter(pipe, "b")
    want_b = unet_out(pipe), text_out(pipe)
    sd.set_adapter(pipe, [])
    for _ in range(3):
        sd.switch_adapter(pipe, "a")
        assert torch.allclose(unet_out(pipe), want_a[0], atol=1e-6) and torch.allclose(text_out(pipe), want_a[1],
                                                                                      atol=1e-6)
        sd.switch_adapter(pipe, "b")
        assert torch.allclose(unet_out(pipe), want_b[0], atol=1e-6)
        assert torch.equal(text_out(pipe), want_b[1])  # b has no text part: the text encoder is its base
    sd.switch_adapter(pipe, None)
    assert torch.equal(unet_out(pipe), base_out)
    sd.unload(pipe)
    after = snapshot(pipe)
    for c in base:
        for k in base[c]:
            assert torch.equal(base[c][k], after[c][k]), (c, k)


def test_combine_set_scale_disable(pipe):
    sd.inject(pipe, both(1, 2), "a")
    randomize(pipe, "a", 5)
    sd.inject(pipe, both(3, 4), "b")
    randomize(pipe, "b", 6)
    sd.set_adapter(pipe, ["a", "b"])
    want = unet_out(pipe), text_out(pipe)
    sd.combine_adapters(pipe, ["a", "b"], [1.0, 1.0], "ab")
    assert sd.active_adapters(pipe) == {"unet": ["ab"], "text_encoder": ["ab"]}
    torch.testing.assert_close(unet_out(pipe), want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(text_out(pipe), want[1], atol=1e-5, rtol=1e-5)
    sd.set_scale(pipe, "ab", 0.0)
    sd.set_adapter(pipe, [])
    base = unet_out(pipe)
    sd.set_adapter(pipe, "ab")
    torch.testing.assert_close(unet_out(pipe), base, atol=1e-6, rtol=0)
    sd.set_scale(pipe, "ab", 1.0)
    sd.switch_adapter(pipe, "ab")
    with sd.disable_adapters(pipe):
        assert torch.equal(unet_out(pipe), base)
    torch.testing.assert_close(unet_out(pipe), want[0], atol=1e-5, rtol=1e-5)
    orth = sd.adapter_orthogonality(pipe, "a", "b")
    assert set(orth) == {"unet", "text_encoder"} and all(orth.values())


def test_delete_and_unknown_names(pipe):
    sd.inject(pipe, both(), "a")
    sd.switch_adapter(pipe, "a")
    with pytest.raises(RuntimeError, match="merged"):
        sd.delete_adapter(pipe, "a")
    sd.switch_adapter(pipe, None)
    sd.delete_adapter(pipe, "a")
    assert sd.adapter_names(pipe) == []
    with pytest.raises(KeyError, match="unknown adapter"):
        sd.switch_adapter(pipe, "a")
    with pytest.raises(ValueError, match="no component named"):
        sd.inject(pipe, {"unet2": shirakit.ShiraConfig(r=2, target_modules=ATTENTION)}, "z")


def test_inject_is_all_or_nothing(pipe):
    before = snapshot(pipe)
    bad = {"unet": shirakit.ShiraConfig(r=2, target_modules=ATTENTION),
           "text_encoder": shirakit.ShiraConfig(r=2, target_modules=["no_such_layer"])}
    with pytest.raises(ValueError):
        sd.inject(pipe, bad, "a")
    assert sd.adapted(pipe) == {}
    assert all(p.requires_grad for p in pipe.unet.parameters())
    after = snapshot(pipe)
    assert all(torch.equal(before[c][k], after[c][k]) for c in before for k in before[c])


def test_load_failure_in_second_component_leaves_first_unchanged(pipe, pipe_dir, tmp_path):
    sd.inject(pipe, both(), "a")
    sd.save_adapter(pipe, tmp_path / "a", "a")
    target = tiny_pipeline(pipe_dir)
    sd.inject(target, {"unet": shirakit.ShiraConfig(r=2, target_modules=ATTENTION)}, "old")
    out_before = unet_out(target)
    weights = tmp_path / "a" / "text_encoder" / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("shira_weight"))
    tensors[key] = tensors[key][:-1]  # a wrong length: refused when the text encoder's part is filled
    config = (tmp_path / "a" / "text_encoder" / "adapter_config.json").read_text()
    from shirakit.io.folder import write_adapter_folder

    write_adapter_folder(tmp_path / "a" / "text_encoder", config.encode(),
                         __import__("safetensors.torch", fromlist=["save"]).save(tensors))
    with pytest.raises(ValueError, match="text_encoder"):
        sd.load_adapter(target, tmp_path / "a", "a")
    assert sd.adapter_names(target) == ["old"] and sd.active_adapters(target) == {"unet": ["old"]}
    assert "text_encoder" not in sd.adapted(target)
    assert torch.equal(unet_out(target), out_before)
    del save_file


def test_folder_errors(pipe, tmp_path):
    with pytest.raises(FileNotFoundError):
        sd.load_adapter(pipe, tmp_path / "missing", "a")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="component subfolders"):
        sd.load_adapter(pipe, tmp_path / "empty", "a")
    sd.inject(pipe, both(), "a")
    sd.save_adapter(pipe, tmp_path / "a", "a")
    (tmp_path / "a" / "unet").rename(tmp_path / "a" / "unet3")
    with pytest.raises(ValueError, match="unet3"):
        sd.load_adapter(pipe, tmp_path / "a", "b")
    shirakit.save_adapter(pipe.unet, tmp_path / "single", "a")
    with pytest.raises(ValueError, match="single-model adapter folder"):
        sd.load_adapter(pipe, tmp_path / "single", "b")


# ---- diffusers-format LoRA files --------------------------------------------------------------------------------
def diffusers_lora(pipe, folder, rank=4, alpha=8, text=True, unet_targets=ATTENTION):
    """A LoRA saved by diffusers itself (peft underneath), with non-zero B."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=unet_targets, init_lora_weights=False))
    layers = {"unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))}
    if text:
        pipe.text_encoder.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=TEXT_ATTENTION,
                                                 init_lora_weights=False))
        layers["text_encoder_lora_layers"] = convert_state_dict_to_diffusers(
            get_peft_model_state_dict(pipe.text_encoder))
    meta = {"unet_lora_adapter_metadata": {"r": rank, "lora_alpha": alpha, "target_modules": unet_targets}}
    if text:
        meta["text_encoder_lora_adapter_metadata"] = {"r": rank, "lora_alpha": alpha,
                                                      "target_modules": TEXT_ATTENTION}
    type(pipe).save_lora_weights(folder, **layers, **meta)
    return folder


@pytest.mark.parametrize("with_metadata", [True, False])
def test_diffusers_lora_file_equals_diffusers_load(pipe_dir, tmp_path, with_metadata):
    pytest.importorskip("peft")
    source = tiny_pipeline(pipe_dir, seed=0)
    folder = diffusers_lora(source, tmp_path / "lora", rank=4, alpha=4 if not with_metadata else 8)
    if not with_metadata:  # an older file: no metadata, diffusers then takes alpha = r
        from safetensors.torch import load_file, save_file

        path = folder / "pytorch_lora_weights.safetensors"
        save_file(load_file(path), path, metadata={"format": "pt"})
    theirs = tiny_pipeline(pipe_dir)
    theirs.load_lora_weights(folder, adapter_name="x")
    ours = tiny_pipeline(pipe_dir)
    sd.load_adapter(ours, folder, "x")
    assert sorted(sd.adapted(ours)) == ["text_encoder", "unet"]
    torch.testing.assert_close(unet_out(ours), unet_out(theirs), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(text_out(ours), text_out(theirs), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unet_out(ours), unet_out(tiny_pipeline(pipe_dir)), atol=1e-4)
    theirs.fuse_lora()
    sd.switch_adapter(ours, "x")
    torch.testing.assert_close(unet_out(ours), unet_out(theirs), atol=1e-5, rtol=1e-5)


def test_diffusers_conv_lora_equals_diffusers_load(pipe_dir, tmp_path):
    """A LoRA on the resnets' convolutions (A: a conv with the layer's kernel, B: 1x1)."""
    pytest.importorskip("peft")
    folder = diffusers_lora(tiny_pipeline(pipe_dir), tmp_path / "lora", rank=2, alpha=4, text=False,
                            unet_targets=["conv1", "conv2"])
    theirs = tiny_pipeline(pipe_dir)
    theirs.load_lora_weights(folder, adapter_name="x")
    ours = tiny_pipeline(pipe_dir)
    sd.load_adapter(ours, folder, "x")
    assert any(t.endswith("conv1") for t in ours.unet.shirakit.configs["x"].target_modules)
    torch.testing.assert_close(unet_out(ours), unet_out(theirs), atol=1e-5, rtol=1e-5)
    theirs.fuse_lora()
    sd.switch_adapter(ours, "x")
    torch.testing.assert_close(unet_out(ours), unet_out(theirs), atol=1e-5, rtol=1e-5)


def test_lora_beside_shira_switches(pipe_dir, tmp_path):
    pytest.importorskip("peft")
    folder = diffusers_lora(tiny_pipeline(pipe_dir), tmp_path / "lora")
    pipe = tiny_pipeline(pipe_dir)
    base = unet_out(pipe)
    sd.inject(pipe, both(), "shira")
    randomize(pipe, "shira", 2)
    want_shira = unet_out(pipe)
    sd.load_adapter(pipe, folder / "pytorch_lora_weights.safetensors", "lora")
    want_lora = unet_out(pipe)
    sd.set_adapter(pipe, [])
    for _ in range(2):
        sd.switch_adapter(pipe, "lora")
        torch.testing.assert_close(unet_out(pipe), want_lora, atol=1e-5, rtol=1e-5)
        sd.switch_adapter(pipe, "shira")
        torch.testing.assert_close(unet_out(pipe), want_shira, atol=1e-5, rtol=1e-5)
    sd.switch_adapter(pipe, None, exact=True)
    torch.testing.assert_close(unet_out(pipe), base, atol=1e-6, rtol=0)


def kohya_file(path, pipe, rank_of, alpha_of, text=True):
    """A kohya-named LoRA file for the UNet's attention and the text encoder's q_proj (rank and alpha per layer)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    layers = [("lora_unet_", n, m) for n, m in pipe.unet.named_modules()
              if isinstance(m, torch.nn.Linear) and any(n.endswith("." + t) for t in ATTENTION)]
    layers += [("lora_te_", n, m) for n, m in pipe.text_encoder.named_modules() if text and n.endswith("q_proj")]
    tensors = {}
    for i, (prefix, name, layer) in enumerate(layers):
        flat, r = prefix + name.replace(".", "_"), rank_of(i)
        tensors[f"{flat}.lora_down.weight"] = torch.randn(r, layer.in_features, generator=g) * 0.1
        tensors[f"{flat}.lora_up.weight"] = torch.randn(layer.out_features, r, generator=g) * 0.1
        tensors[f"{flat}.alpha"] = torch.tensor(float(alpha_of(i)))
    save_file(tensors, path)
    return path


def test_kohya_file_equals_diffusers_load(pipe_dir, tmp_path):
    """The UNet part against diffusers' own kohya conversion (ranks 2 and 3 across layers)."""
    pytest.importorskip("peft")
    path = kohya_file(tmp_path / "k.safetensors", tiny_pipeline(pipe_dir), rank_of=lambda i: 2 + i % 2,
                      alpha_of=lambda i: 2.0, text=False)
    theirs = tiny_pipeline(pipe_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.load_lora_weights(str(path), adapter_name="k")
    ours = tiny_pipeline(pipe_dir)
    sd.load_adapter(ours, path, "k")
    assert ours.unet.shirakit.configs["k"].r == 3  # ranks 2 and 3 padded to 3, the scale ratio folded into B
    torch.testing.assert_close(unet_out(ours), unet_out(theirs), atol=1e-5, rtol=1e-5)


def test_kohya_per_layer_alpha_and_text_encoder(pipe_dir, tmp_path):
    """Every layer's delta is kohya's (alpha_l / r_l) B_l A_l, with rank and alpha differing per layer, in the UNet
    (lora_unet_) and the text encoder (lora_te_)."""
    from safetensors.torch import load_file

    path = kohya_file(tmp_path / "k.safetensors", tiny_pipeline(pipe_dir), rank_of=lambda i: 1 + i % 3,
                      alpha_of=lambda i: 1 + i % 4)
    ours = tiny_pipeline(pipe_dir)
    sd.load_adapter(ours, path, "k")
    tensors = load_file(path)
    checked = 0
    for component, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_")):
        for name, delta in shirakit.delta_weights(getattr(ours, component), "k").items():
            flat = prefix + name.replace(".", "_")
            a, b = tensors[f"{flat}.lora_down.weight"], tensors[f"{flat}.lora_up.weight"]
            alpha = float(tensors[f"{flat}.alpha"])
            torch.testing.assert_close(delta, alpha / a.shape[0] * b @ a, atol=1e-6, rtol=1e-5)
            checked += 1
    assert checked == len(tensors) // 3


def test_lora_file_errors(pipe, tmp_path):
    from safetensors.torch import save_file

    save_file({"lora_unet_no_such_layer.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_no_such_layer.lora_up.weight": torch.zeros(4, 2)}, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="no module of unet is named 'no_such_layer'"):
        sd.load_adapter(pipe, tmp_path / "a.safetensors", "a")
    save_file({"unet.mid_block.x.lora_magnitude_vector": torch.zeros(4)}, tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match="DoRA"):
        sd.load_adapter(pipe, tmp_path / "b.safetensors", "b")
    (tmp_path / "c.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="safetensors"):
        sd.load_adapter(pipe, tmp_path / "c.bin", "c")
    assert sd.adapted(pipe) == {}
    json.dumps({})


# ---- torch.compile --------------------------------------------------------------------------------------------
def _hotswap_round(pipe, backend):
    """Adapters on different layers of the UNet (attention, feed-forward, convolutions) and the text encoder
    (LoRA: slots; SHiRA: in the weight) swap under torch.compile; returns the frames compiled after warm-up (0
    expected) after checking outputs."""
    from torch._dynamo.testing import CompileCounterWithBackend

    sd.inject(pipe, both(method="lora"), "a")
    sd.inject(pipe, {"unet": shirakit.LoraConfig(r=3, target_modules=["to_q", "ff.net.2"], init_lora_weights=False),
                     "text_encoder": shirakit.LoraConfig(r=1, target_modules=["fc1"], init_lora_weights=False)}, "b")
    sd.inject(pipe, both(5, 6), "c")
    randomize(pipe, "c", 7)
    # convolutions too: a LoRA conv (slots) and a SHiRA conv (in the weight) on layers no other adapter has
    sd.inject(pipe, {"unet": shirakit.LoraConfig(r=2, target_modules=["conv1"], init_lora_weights=False)}, "d")
    sd.inject(pipe, {"unet": shirakit.ShiraConfig(r=1, target_modules=["conv2", "conv_in"], random_seed=8)}, "e")
    randomize(pipe, "e", 9)
    want = {}
    for name in ("a", "b", "c", "d", "e"):
        sd.set_adapter(pipe, name)
        want[name] = unet_out(pipe), text_out(pipe)
    sd.prepare_for_hotswap(pipe, on_recompile="raise")
    counter = CompileCounterWithBackend(backend)
    torch._dynamo.reset()
    unet, text = pipe.unet, pipe.text_encoder
    compiled = {"unet": torch.compile(unet, backend=counter), "text_encoder": torch.compile(text, backend=counter)}
    x, t, h = unet_inputs()
    ids = torch.tensor([[512, 40, 41, 42, 513]])

    def run():
        with torch.no_grad():
            return compiled["unet"](x, t, encoder_hidden_states=h).sample, compiled["text_encoder"](ids)[0]

    sd.set_adapter(pipe, "a")
    run()
    warm = counter.frame_count
    for name in ("b", "c", "e", "a", "d", "c", "e", "b"):
        sd.set_adapter(pipe, name)
        got = run()
        torch.testing.assert_close(got[0], want[name][0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got[1], want[name][1], atol=1e-4, rtol=1e-4)
    return counter.frame_count - warm


def test_hotswap_under_compile_no_recompiles(pipe):
    assert _hotswap_round(pipe, "eager") == 0


@pytest.mark.slow
def test_hotswap_under_inductor_no_recompiles(pipe):
    assert _hotswap_round(pipe, "inductor") == 0
