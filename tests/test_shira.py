"""SHiRA specifics: the sparse value gradient, live values in the weight, masks, exact restores."""

from __future__ import annotations

import pytest
import torch

import shirakit
from shirakit.core.state import adapter_layers
from shirakit.methods.shira.masks import MASKS
from tests.models import MODELS, TARGETS, inputs, output


def _shira(model_name, **kw):
    model = MODELS[model_name]()
    shirakit.inject(model, shirakit.ShiraConfig(r=2, target_modules=TARGETS[model_name], init_weights=False,
                                                random_seed=5, **kw))
    return model


@pytest.mark.parametrize("model_name", ["llama", "gpt2", "bert"])
def test_value_gradient_equals_dense_gradient_at_indices(model_name, device):
    ids = inputs().to(device)
    model = _shira(model_name).to(device)
    model.train()
    loss = output(model, ids).float().pow(2).mean()
    loss.backward()
    # the reference: a plain model with W + delta as a trainable dense weight
    ref = MODELS[model_name]().to(device)
    ref.train()
    deltas = shirakit.delta_weights(model, "default")
    with torch.no_grad():
        for name, delta in deltas.items():
            layer = ref.get_submodule(name)
            view = layer.weight.T if type(layer).__name__ == "Conv1D" else layer.weight
            view.add_(delta.to(device))
    output(ref, ids).float().pow(2).mean().backward()
    for name, layer in adapter_layers(model):
        adapter = layer.adapters["default"]
        ref_layer = ref.get_submodule(name)
        dense = ref_layer.weight.grad.T if type(ref_layer).__name__ == "Conv1D" else ref_layer.weight.grad
        rows, cols = adapter.shira_indices.long()
        torch.testing.assert_close(adapter.shira_weight.grad, dense[rows, cols], atol=1e-6, rtol=1e-4)


def test_hooked_base_layer_gets_same_gradient(device):
    ids = inputs().to(device)
    grads = []
    for hooked in (False, True):
        model = _shira("llama").to(device)
        model.train()
        calls = []
        if hooked:
            for _, layer in adapter_layers(model):
                layer.base_layer.register_forward_hook(lambda m, i, o, calls=calls: calls.append(1))
        output(model, ids).pow(2).mean().backward()
        grads.append(torch.cat([p.grad for p in model.parameters() if p.requires_grad]))
        assert bool(calls) == hooked
    torch.testing.assert_close(grads[0], grads[1])


def test_values_resync_after_in_place_update():
    ids = inputs()
    model = _shira("llama")
    before = output(model, ids)  # the values are now scattered into the weights
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(3.0)
    live = output(model, ids)
    assert not torch.allclose(live, before, atol=1e-4)
    # the reference shares no staleness check with the layer: W + the dense delta of the new values
    ref = MODELS["llama"]()
    with torch.no_grad():
        for name, delta in shirakit.delta_weights(model, "default").items():
            ref.get_submodule(name).weight.add_(delta)
    torch.testing.assert_close(live, output(ref, ids), atol=1e-5, rtol=1e-5)
    shirakit.merge(model)
    torch.testing.assert_close(output(model, ids), live, atol=0, rtol=0)


def test_state_dict_shows_clean_base_while_live():
    base = MODELS["llama"]().state_dict()
    model = _shira("llama")
    output(model, inputs())  # values are now scattered into the weights
    sd = model.state_dict()
    for key, value in base.items():
        prefix, _, leaf = key.rpartition(".")
        mine = sd[key] if key in sd else sd[f"{prefix}.base_layer.{leaf}"]
        assert torch.equal(mine, value), key


def test_set_scale():
    ids = inputs()
    model = _shira("llama")
    one = output(model, ids)
    shirakit.set_scale(model, "default", 0.0)
    torch.testing.assert_close(output(model, ids), output(MODELS["llama"](), ids), atol=0, rtol=0)
    shirakit.set_scale(model, "default", 2.0)
    two = output(model, ids)
    ref = MODELS["llama"]()
    with torch.no_grad():
        for name, delta in shirakit.delta_weights(model, "default").items():
            ref.get_submodule(name).weight.add_(delta)
    torch.testing.assert_close(two, output(ref, ids), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(one, two)


def test_masks_differ_per_layer_and_adapter_and_repeat_per_seed():
    model = _shira("llama")
    shirakit.inject(model, shirakit.ShiraConfig(r=2, target_modules=TARGETS["llama"], random_seed=5), "b")
    layers = adapter_layers(model)
    q0 = dict(layers)["model.layers.0.self_attn.q_proj"]
    q1 = dict(layers)["model.layers.1.self_attn.q_proj"]
    assert not torch.equal(q0.adapters["default"].shira_indices, q1.adapters["default"].shira_indices)
    assert not torch.equal(q0.adapters["default"].shira_indices, q0.adapters["b"].shira_indices)
    again = _shira("llama")
    for (_, a), (_, b) in zip(layers, adapter_layers(again)):
        assert torch.equal(a.adapters["default"].shira_indices, b.adapters["default"].shira_indices)


def test_loading_never_computes_a_mask(tmp_path, monkeypatch):
    ids = inputs()
    model = _shira("llama")
    expected = output(model, ids)
    shirakit.save_adapter(model, tmp_path)

    def forbidden(*args, **kwargs):
        raise AssertionError("mask recomputed at load time")

    monkeypatch.setitem(MASKS, "random", forbidden)
    fresh = MODELS["llama"]()
    shirakit.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(output(fresh, ids), expected, atol=0, rtol=0)


def test_unsorted_indices_in_file_load_with_their_values(tmp_path):
    from safetensors.torch import load_file, save_file

    ids = inputs()
    model = _shira("llama")
    expected = output(model, ids)
    shirakit.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    g = torch.Generator().manual_seed(0)
    for key in [k for k in tensors if k.endswith("shira_indices")]:
        perm = torch.randperm(tensors[key].shape[1], generator=g)
        tensors[key] = tensors[key][:, perm].contiguous()
        wkey = key.replace("shira_indices", "shira_weight")
        tensors[wkey] = tensors[wkey][perm].contiguous()
    save_file(tensors, str(path))
    fresh = MODELS["llama"]()
    shirakit.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(output(fresh, ids), expected, atol=0, rtol=0)


def test_merge_is_a_scatter_and_unmerge_bit_exact_in_bf16(device):
    model = MODELS["llama"](dtype=torch.bfloat16).to(device)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    shirakit.inject(model, shirakit.ShiraConfig(r=2, target_modules="all-linear", init_weights=False))
    for _ in range(3):
        shirakit.merge(model)
        shirakit.unmerge(model)
    sd = model.state_dict()
    for key, value in base.items():
        prefix, _, leaf = key.rpartition(".")
        assert torch.equal(sd[key] if key in sd else sd[f"{prefix}.base_layer.{leaf}"], value), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("threads", [1, 2])
def test_scatter_values_matches_index_copy(dtype, threads):
    from shirakit.methods.shira.sparse import scatter_values

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        flat = torch.randn(1000).to(dtype)
        expected = flat.clone()
        index = torch.tensor([3, 17, 400, 999])
        values = torch.randn(4).to(dtype)
        expected.index_copy_(0, index, values)
        version = flat._version
        scatter_values(flat, index, values)
        assert torch.equal(flat, expected)
        assert flat._version > version  # autograd and the layer's bookkeeping see the write
    finally:
        torch.set_num_threads(before)


def test_custom_named_mask_saves_and_loads(tmp_path):
    """A mask shirakit does not know saves; its file loads (indices from the file, no mask drawn)."""

    def every_other(base_layer, r, generator):
        return torch.arange(0, 2 * r * 128, 2)  # K = r * (64 + 64) flat positions of a 64x64 weight

    ids = inputs()
    model = MODELS["llama"]()
    shirakit.inject(model, shirakit.ShiraConfig(r=2, target_modules=["q_proj"], mask_type="every_other",
                                                mask_fn=every_other, init_weights=False))
    expected = output(model, ids)
    shirakit.save_adapter(model, tmp_path)
    assert shirakit.read_config(tmp_path).mask_type == "every_other"
    fresh = MODELS["llama"]()
    shirakit.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(output(fresh, ids), expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="'every_other' is not a shirakit mask; pass its mask_fn"):
        shirakit.inject(MODELS["llama"](), shirakit.read_config(tmp_path), "new")


def test_training_steps_write_new_values_over_old_and_keep_the_base_exact(device):
    """Each step's new values are written over the last ones (one scatter, from the saved base values):
    the weight holds exactly W0 + s*v at the positions and W0 elsewhere, and the base comes back bit-exact."""
    base = MODELS["llama"]().to(device).state_dict()
    model = _shira("llama").to(device)
    ids = inputs().to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        output(model, ids).pow(2).mean().backward()
        optimizer.step()
    output(model, ids)  # the stepped values written in
    for name, layer in adapter_layers(model):
        adapter = layer.adapters["default"]
        expected = base[f"{name}.weight"].clone().view(-1)
        index = adapter.storage_index()
        expected[index] = expected[index].float() + adapter.scale * adapter.shira_weight.detach().float()
        assert torch.equal(layer.weight.detach().view(-1), expected), name
    shirakit.unload(model)
    unloaded = model.state_dict()
    assert unloaded.keys() == base.keys()
    for key, value in base.items():
        assert torch.equal(unloaded[key], value), key


def test_cpu_training_needs_no_triton():
    """Without triton (an import that fails), SHiRA trains on CPU and never tries the Triton path."""
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import sys; sys.modules['triton'] = None\n"  # 'import triton' now raises ImportError
        "import torch, shirakit\n"
        "from shirakit.methods.shira import triton_kernels\n"
        "m = torch.nn.Sequential(torch.nn.Linear(16, 8))\n"
        "shirakit.inject(m, shirakit.ShiraConfig(r=2, target_modules=['0'], init_weights=False))\n"
        "m(torch.randn(3, 16)).pow(2).sum().backward()\n"
        "g = [p.grad for p in m.parameters() if p.requires_grad][0]\n"
        "assert g is not None and bool(g.abs().sum() > 0)\n"
        "assert not triton_kernels.usable(torch.zeros(1))\n"
        "print('ok')\n"
    )
    root = Path(__file__).resolve().parent.parent
    env = {**__import__("os").environ, "PYTHONPATH": str(root / "src"), "SHIRAKIT_TRITON": "1"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
