"""The layer siblings: SHiRA and LoRA on nn.Conv1d / nn.Conv2d and nn.Embedding.

SHiRA's values and value gradients against a dense reference (W0 + scatter(v), autograd), on
grouped, strided, dilated and padded convs and on embeddings (padding row, frequency scaling);
LoRA against PEFT (outputs and files both ways); bit-exact switching on convs; tied embeddings;
VeRA and MiSS refusing convs by name.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import shirakit
from shirakit.core.layer import AdapterConv, AdapterEmbedding
from shirakit.core.state import adapter_layers
from tests.checks import lm_training_losses
from tests.models import inputs, output, tiny_convnet, tiny_llama

CONVS = {
    "conv1d": lambda: nn.Conv1d(6, 10, 3, padding=1),
    "conv2d": lambda: nn.Conv2d(6, 10, 3),
    "strided": lambda: nn.Conv2d(6, 10, (3, 2), stride=(2, 1), padding=(1, 0)),
    "dilated-grouped-reflect": lambda: nn.Conv2d(6, 9, 3, padding=2, dilation=2, groups=3, padding_mode="reflect"),
    "same-even-kernel": lambda: nn.Conv2d(6, 10, 4, padding="same", bias=False),
    "valid-circular-1d": lambda: nn.Conv1d(6, 8, 5, padding=2, padding_mode="circular", groups=2),
    "pointwise": lambda: nn.Conv2d(6, 10, 1),
}


def _conv_input(conv: nn.Module, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (2, conv.in_channels, 9) if isinstance(conv, nn.Conv1d) else (2, conv.in_channels, 9, 8)
    return torch.randn(shape, generator=g, requires_grad=True)


def _dense_reference(base: nn.Module, adapter, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(W0 + s S as a differentiable function of a leaf copy of the values, that leaf)."""
    values = adapter.shira_weight.detach().clone().requires_grad_(True)
    positions = adapter.storage_index()
    flat = base.weight.detach().reshape(-1).clone()
    weight = flat.index_put((positions,), flat[positions] + scale * values).view_as(base.weight)
    return weight, values


class _Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def _shira_on(layer_factory, r=2, hooked=False, seed=0):
    torch.manual_seed(seed)
    base = layer_factory()
    model = _Holder(base)
    reference = _Holder(layer_factory())
    reference.load_state_dict(model.state_dict())
    shirakit.inject(model, shirakit.ShiraConfig(r=r, target_modules=["layer"], init_weights=False, random_seed=4))
    model.train()
    if hooked:
        model.layer.base_layer.register_forward_hook(lambda mod, inp, out: None)
    return model, reference.layer


@pytest.mark.parametrize("hooked", [False, True], ids=["scattered", "hooked-tap"])
@pytest.mark.parametrize("kind", list(CONVS))
def test_conv_shira_matches_dense_reference(kind, hooked):
    model, ref = _shira_on(CONVS[kind], hooked=hooked)
    layer = model.layer
    assert isinstance(layer, AdapterConv)
    adapter = layer.adapters["default"]
    x = _conv_input(ref)
    y = model(x)
    weight, values = _dense_reference(ref, adapter)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = ref._conv_forward(x_ref, weight, ref.bias)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(adapter.shira_weight.grad, values.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["conv2d", "dilated-grouped-reflect", "valid-circular-1d"])
def test_conv_shira_additive_form_matches(kind):
    """The additive delta (mixed batches, FSDP, tied or quantized weights) equals the in-weight one."""
    model, ref = _shira_on(CONVS[kind])
    adapter = model.layer.adapters["default"]
    x = _conv_input(ref)
    delta = adapter(x, model.layer.weight)
    weight, values = _dense_reference(ref, adapter)
    expected = ref._conv_forward(x, weight, None) - ref._conv_forward(x, ref.weight.detach(), None)
    torch.testing.assert_close(delta, expected, atol=1e-5, rtol=1e-4)
    delta.pow(2).sum().backward()
    ref_grad = torch.autograd.grad((ref._conv_forward(x, weight, None) - ref._conv_forward(
        x, ref.weight.detach(), None)).pow(2).sum(), values)[0]
    torch.testing.assert_close(adapter.shira_weight.grad, ref_grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("options", [{}, {"padding_idx": 3}, {"scale_grad_by_freq": True, "padding_idx": 0}],
                         ids=["plain", "padding-idx", "freq-scaled"])
@pytest.mark.parametrize("hooked", [False, True], ids=["scattered", "hooked-tap"])
def test_embedding_shira_matches_dense_reference(options, hooked):
    model, ref = _shira_on(lambda: nn.Embedding(40, 6, **options), r=3, hooked=hooked)
    assert isinstance(model.layer, AdapterEmbedding)
    adapter = model.layer.adapters["default"]
    ids = torch.tensor([[3, 5, 5, 0, 39], [1, 3, 7, 5, 2]])
    y = model(ids)
    weight, values = _dense_reference(ref, adapter)
    y_ref = nn.functional.embedding(ids, weight, ref.padding_idx, None, 2.0, ref.scale_grad_by_freq)
    torch.testing.assert_close(y, y_ref, atol=0, rtol=0)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(adapter.shira_weight.grad, values.grad, atol=1e-6, rtol=1e-5)
    # the additive form (a tied table) gives the same delta and value gradient
    adapter.shira_weight.grad = None
    delta = adapter(ids, model.layer.weight)
    torch.testing.assert_close(delta, y_ref.detach() - ref(ids).detach(), atol=1e-6, rtol=1e-5)
    delta.backward(g)
    torch.testing.assert_close(adapter.shira_weight.grad, values.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mask_type", ["random", "struct", "wm", "grad", "snip"])
def test_every_mask_on_convs_and_embeddings(mask_type):
    """K positions index the flattened kernel (out, in/groups * prod(k)) and the table (rows, dim)."""
    model = tiny_convnet(grouped=True)
    config = shirakit.ShiraConfig(r=2, mask_type=mask_type, target_modules=["emb", "c1", "c2", "c3"], random_seed=1)
    ids = inputs(batch=4, length=10)
    if mask_type in ("grad", "snip"):
        config = shirakit.calibrate(model, config, [{"input_ids": ids, "labels": ids}])
    shirakit.inject(model, config)
    for name, layer in adapter_layers(model):
        adapter = layer.adapters["default"]
        idx = adapter.shira_indices.long()
        m, n = layer.weight.shape[0], layer.weight[0].numel()
        assert idx.shape[1] == 2 * (m + n), name
        assert int(idx[0].max()) < m and int(idx[1].max()) < n, name
        flat = idx[0] * n + idx[1]
        assert bool((flat[1:] > flat[:-1]).all()), name  # sorted, unique
    if mask_type == "wm":  # the largest |W| of the flattened kernel
        layer = model.c3
        top = layer.weight.detach().abs().reshape(-1).topk(layer.adapters["default"].shira_weight.numel()).indices
        assert set(top.tolist()) == set(layer.adapters["default"].storage_index().tolist())
    model.train()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_conv_switch_is_bit_exact_and_equals_merge():
    ids = inputs()
    model = tiny_convnet(grouped=True)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    targets = ["emb", "c1", "c2", "c3"]
    for name, seed in (("a", 1), ("b", 2)):
        shirakit.inject(model, shirakit.ShiraConfig(r=2, target_modules=targets, init_weights=False,
                                                    random_seed=seed), name)
    expected = {}
    for name in ("a", "b"):
        shirakit.set_adapter(model, name)
        expected[name] = output(model, ids)
    for name in ("a", "b", "a", None, "b", None):
        shirakit.switch_adapter(model, name)
        with shirakit.disable_adapters(model) if name is None else torch.no_grad():
            got = output(model, ids)
        if name is not None:
            torch.testing.assert_close(got, expected[name], atol=0, rtol=0)
    state = model.state_dict()
    for key, value in base.items():
        prefix, _, leaf = key.rpartition(".")
        assert torch.equal(state.get(key, state.get(f"{prefix}.base_layer.{leaf}")), value), key


def test_training_on_convs_reduces_loss():
    ids = inputs(batch=4, length=12)
    for config in (shirakit.ShiraConfig(r=2, target_modules=["emb", "c1", "c2", "c3"], random_seed=0),
                   shirakit.LoraConfig(r=4, target_modules=["emb", "c1", "c2"])):
        model = tiny_convnet(grouped=isinstance(config, shirakit.ShiraConfig))
        shirakit.inject(model, config)
        losses = lm_training_losses(model, ids, steps=6, lr=2e-2)
        assert losses[-1] < losses[0], (type(config).__name__, losses)


@pytest.mark.parametrize("make", [
    lambda t: shirakit.VeraConfig(r=4, target_modules=t),
    lambda t: shirakit.MissConfig(r=4, target_modules=t),
    lambda t: shirakit.MissConfig(r=4, target_modules=t, init_weights="bat"),
], ids=["vera", "miss", "miss-bat"])
@pytest.mark.parametrize("target", ["c2", "emb"])
def test_vera_and_miss_refuse_siblings_by_name(make, target):
    model = tiny_convnet()
    refusal = rf"{target} \((Conv2d|Embedding)\): \w+ does not adapt (conv|embedding) layers"
    with pytest.raises(TypeError, match=refusal):
        shirakit.inject(model, make([target]))
    assert not any(isinstance(m, shirakit.AdapterLinear) for m in model.modules())  # nothing half-done


def test_lora_refuses_grouped_conv():
    model = tiny_convnet(grouped=True)
    with pytest.raises(ValueError, match=r"c3: LoRA on a grouped conv \(groups=4\)"):
        shirakit.inject(model, shirakit.LoraConfig(r=4, target_modules=["c3"]))


def test_all_linear_leaves_convs_and_embeddings_alone():
    model = tiny_convnet()
    shirakit.inject(model, shirakit.LoraConfig(r=2, target_modules="all-linear"))
    assert {n for n, _ in adapter_layers(model)} == {"head"}  # as PEFT: linear layers only


@pytest.mark.parametrize("method", ["shira", "lora"])
def test_tied_embedding_is_never_written(method):
    """lm_head is tied to embed_tokens: adapting the table keeps the shared tensor untouched."""
    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    shared = model.lm_head.weight
    before = shared.detach().clone()
    version = shared._version
    config = (shirakit.ShiraConfig(r=2, target_modules=["embed_tokens"], init_weights=False, random_seed=2)
              if method == "shira" else shirakit.LoraConfig(r=2, target_modules=["embed_tokens"],
                                                            init_lora_weights=False))
    shirakit.inject(model, config)
    ids = inputs()
    out = output(model, ids)
    assert shared._version == version and torch.equal(shared, before)
    # the reference: an untied copy whose table alone carries the delta
    ref = tiny_llama()
    ref.lm_head.weight = nn.Parameter(before.clone())
    with torch.no_grad():
        ref.model.embed_tokens.weight.copy_(before + shirakit.delta_weights(model, "default")["model.embed_tokens"])
    torch.testing.assert_close(out, output(ref, ids), atol=1e-5, rtol=1e-5)
    model.train()
    output(model, ids).pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert torch.equal(shared, before)


# ---- PEFT: LoRA on convs and embeddings, outputs and files both ways ---------------------------
peft = pytest.importorskip("peft")
PEFT_TARGETS = ["emb", "c1", "c2"]  # c3 is dilated: PEFT's lora_A leaves dilation out (ours follows the layer)


def _peft_config():
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_TARGETS, init_lora_weights=False)


def test_lora_siblings_equal_peft_on_same_weights():
    ids = inputs()
    torch.manual_seed(5)
    pm = peft.get_peft_model(tiny_convnet(), _peft_config()).eval()
    model = tiny_convnet()
    shirakit.inject(model, shirakit.LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_TARGETS))
    theirs = pm.state_dict()
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if ".adapters.default." in key:  # c1.adapters.default.lora_A.weight <- c1.lora_A.default.weight
                layer, leaf = key.split(".adapters.default.")
                name, _, rest = leaf.partition(".")
                value.copy_(theirs[".".join(["base_model.model", layer, name, "default", *([rest] if rest else [])])])
    torch.testing.assert_close(output(model, ids), output(pm, ids), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(output(model, ids), output(tiny_convnet(), ids), atol=1e-4)


def test_peft_sibling_file_loads_into_shirakit(tmp_path):
    ids = inputs()
    torch.manual_seed(6)
    pm = peft.get_peft_model(tiny_convnet(), _peft_config()).eval()
    expected = output(pm, ids)
    pm.save_pretrained(tmp_path)
    model = tiny_convnet()
    shirakit.load_adapter(model, tmp_path)
    torch.testing.assert_close(output(model, ids), expected, atol=1e-6, rtol=1e-6)


def test_shirakit_sibling_file_loads_into_peft(tmp_path):
    ids = inputs()
    model = tiny_convnet()
    shirakit.inject(model, shirakit.LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_TARGETS,
                                               init_lora_weights=False))
    expected = output(model, ids)
    shirakit.save_adapter(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(tiny_convnet(), tmp_path).eval()
    torch.testing.assert_close(output(pm, ids), expected, atol=1e-6, rtol=1e-6)


def test_batched_switch_matches_per_layer_and_sees_outside_writes(monkeypatch):
    """switch_adapter scatters every plain layer in one call per direction; the model ends exactly
    as per-layer switching leaves it, a layer whose weight was rewritten from outside takes the new
    base, and layers that cannot batch (LoRA) switch on their own."""
    from shirakit.methods.shira.adapter import ShiraAdapter

    calls = []
    original = ShiraAdapter.scatter_many.__func__
    monkeypatch.setattr(ShiraAdapter, "scatter_many",
                        classmethod(lambda cls, writes: (calls.append(len(writes)), original(cls, writes))[1]))
    targets = ["emb", "c1", "c2", "c3"]
    models = []
    for _ in range(2):
        model = tiny_convnet(grouped=True)
        for name, seed in (("a", 1), ("b", 2)):
            shirakit.inject(model, shirakit.ShiraConfig(r=2, target_modules=targets, init_weights=False,
                                                        random_seed=seed), name)
        shirakit.inject(model, shirakit.LoraConfig(r=2, target_modules=["head"], init_lora_weights=False), "l")
        models.append(model)
    batched, single = models
    for name in ("a", "b", "l", "a", None, "b"):
        calls.clear()
        shirakit.switch_adapter(batched, name)
        for _, layer in adapter_layers(single):  # the per-layer path
            layer.switch([] if name is None else [name])
            layer.set_active([] if name is None else [name])
        single.shirakit.active = [] if name is None else [name]
        for (_, x), (_, y) in zip(adapter_layers(batched), adapter_layers(single)):
            assert x.merged == y.merged and x.active == y.active
            assert torch.equal(x.weight, y.weight)
        if name in ("a", "b"):
            assert calls and all(n == 4 for n in calls)  # the four SHiRA layers, one call per direction
    with torch.no_grad():
        batched.c2.weight.mul_(2)  # outside write while "b" is merged: taken as the new base
    rewritten = batched.c2.weight.detach().clone()
    with pytest.warns(UserWarning, match="overwritten from outside"):
        shirakit.switch_adapter(batched, "a")
    a = batched.c2.adapters["a"]
    got = batched.c2.weight.detach().reshape(-1)
    idx = a.storage_index()
    assert torch.equal(got[idx], rewritten.reshape(-1)[idx] + a.shira_weight.detach())
    shirakit.switch_adapter(batched, None)
    assert torch.equal(batched.c2.weight, rewritten)  # bit-exact back to the base it took
