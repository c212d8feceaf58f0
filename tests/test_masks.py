"""The five SHiRA masks (random, struct, wm, grad, snip), custom masks, and the calibration API."""

from __future__ import annotations

import json

import pytest
import torch

import shirakit
from shirakit.core.layer import geometry_of
from shirakit.core.state import adapter_layers
from shirakit.methods.shira.masks import MASKS, _struct_union, struct_indices, struct_stride, top_k_flat
from shirakit.model.calibration import compute_masks, with_masks
from shirakit.model.inject import find_targets
from tests.models import MODELS, TARGETS, inputs

ALL_MASKS = ["random", "struct", "wm", "grad", "snip"]


def _batches(model_name: str, n: int = 3) -> list[dict]:
    out = []
    for i in range(n):
        ids = inputs(seed=10 + i, batch=2, length=8)
        labels = torch.tensor([i % 3, (i + 1) % 3]) if model_name == "bert" else ids
        out.append({"input_ids": ids, "labels": labels})
    return out


def _config(model_name: str, mask_type: str, r: int = 2, **kw) -> shirakit.ShiraConfig:
    return shirakit.ShiraConfig(r=r, mask_type=mask_type, target_modules=TARGETS[model_name], random_seed=7, **kw)


def _injected(model_name: str, mask_type: str, model=None, **kw):
    """A model with one SHiRA adapter using ``mask_type`` (calibrated on fixed batches if needed)."""
    model = model if model is not None else MODELS[model_name]()
    config = _config(model_name, mask_type, **kw)
    if mask_type in ("grad", "snip"):
        config = shirakit.calibrate(model, config, _batches(model_name))
    return shirakit.inject(model, config)


def _flat_indices(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in adapter_layers(model):
        idx = layer.adapters["default"].shira_indices.long()
        out[name] = idx[0] * layer.in_features + idx[1]
    return out


def _brute_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Reference: a full stable descending sort (ties: lower flat index first)."""
    order = torch.sort(scores.reshape(-1), descending=True, stable=True).indices
    return torch.sort(order[:k]).values


# ---- every mask -------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("mask_type", ALL_MASKS)
def test_every_mask_gives_k_unique_in_range_indices(model_name, mask_type):
    model = _injected(model_name, mask_type)
    layers = adapter_layers(model)
    assert layers
    for name, layer in layers:
        m, n = layer.out_features, layer.in_features
        idx = layer.adapters["default"].shira_indices.long()
        assert idx.shape == (2, 2 * (m + n)), name
        assert idx[0].min() >= 0 and idx[0].max() < m and idx[1].min() >= 0 and idx[1].max() < n
        assert torch.unique(idx[0] * n + idx[1]).numel() == idx.shape[1]


def test_mask_type_is_validated_and_random_is_the_default():
    assert shirakit.ShiraConfig().mask_type == "random"
    assert set(ALL_MASKS) <= set(MASKS)
    with pytest.raises(ValueError, match="unknown mask_type 'magnitude'"):
        shirakit.ShiraConfig(mask_type="magnitude")


# ---- struct -----------------------------------------------------------------------------------
SHAPES = [(64, 64, 2), (96, 64, 2), (64, 96, 3), (8, 8, 1), (3, 5, 1), (7, 3, 1), (12, 40, 2), (4, 4, 2), (30, 20, 4)]


@pytest.mark.parametrize("m,n,r", SHAPES)
def test_struct_is_diagonal_plus_lattice_lines_plus_fill(m, n, r):
    k = r * (m + n)
    flat = struct_indices(m, n, k)
    assert flat.numel() == k and torch.unique(flat).numel() == k
    dense = torch.zeros(m * n, dtype=torch.bool)
    dense[flat] = True
    dense = dense.view(m, n)
    d = min(m, n)
    assert dense.diagonal().all() and dense.diagonal().numel() == d  # the whole diagonal
    stride = struct_stride(m, n, k)
    lines = torch.zeros(m, n, dtype=torch.bool)
    lines[torch.arange(d), torch.arange(d)] = True
    if stride is not None:
        assert dense[::stride, :].all() and dense[:, ::stride].all()  # whole rows and whole columns
        lines[::stride, :] = True
        lines[:, ::stride] = True
        # the smallest stride that fits: one less would not
        assert stride == 1 or int(_lines(m, n, stride - 1).sum()) > k
    assert int(lines.sum()) == _struct_union(m, n, stride) <= k
    # the fill: the first free cells in row-major order, off the lattice and off the diagonal
    extra = dense & ~lines
    free = torch.nonzero((~lines).reshape(-1)).squeeze(1)
    assert torch.equal(torch.nonzero(extra.reshape(-1)).squeeze(1), free[: k - int(lines.sum())])


def _lines(m, n, stride):
    lines = torch.zeros(m, n, dtype=torch.bool)
    lines[::stride, :] = True
    lines[:, ::stride] = True
    d = min(m, n)
    lines[torch.arange(d), torch.arange(d)] = True
    return lines


def test_struct_rows_and_columns_are_logical_for_conv1d():
    model = _injected("gpt2", "struct")
    for name, layer in adapter_layers(model):
        m, n = layer.out_features, layer.in_features
        k = 2 * (m + n)
        got = _flat_indices(model)[name]
        assert torch.equal(got, struct_indices(m, n, k)), name


# ---- wm ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_wm_equals_brute_force_top_k_of_abs_weight(model_name):
    reference = MODELS[model_name]()
    model = _injected(model_name, "wm")
    for name, indices in _flat_indices(model).items():
        layer = reference.get_submodule(name)
        geometry = geometry_of(layer)
        scores = geometry.as_out_in(layer.weight.detach()).abs()
        assert torch.equal(indices, _brute_top_k(scores, indices.numel())), name


def test_top_k_breaks_ties_by_lower_flat_index():
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.5], [3.0, 3.0, 2.0, 3.0]])
    assert top_k_flat(scores, 3).tolist() == [1, 2, 4]
    assert top_k_flat(scores, 6).tolist() == [1, 2, 4, 5, 6, 7]
    assert torch.equal(top_k_flat(scores, 6), _brute_top_k(scores, 6))
    with pytest.raises(ValueError, match="nan or inf"):
        top_k_flat(torch.tensor([1.0, float("nan")]), 1)


def test_wm_with_many_ties_is_deterministic():
    model = MODELS["llama"]()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.round(p * 20) / 20)  # coarse values: ties everywhere
    shirakit.inject(model, _config("llama", "wm"))
    for name, indices in _flat_indices(model).items():
        layer = model.get_submodule(name).base_layer
        assert torch.equal(indices, _brute_top_k(layer.weight.detach().abs(), indices.numel())), name


def test_wm_sees_the_base_weight_not_live_adapter_values():
    model = MODELS["llama"]()
    shirakit.inject(model, _config("llama", "random", init_weights=False), "first")
    model(input_ids=inputs())  # scatters "first"'s values into the weights
    shirakit.inject(model, _config("llama", "wm"), "second")
    fresh = _injected("llama", "wm")
    for (name, a), (_, b) in zip(adapter_layers(model), adapter_layers(fresh)):
        assert torch.equal(a.adapters["second"].shira_indices, b.adapters["default"].shira_indices), name


# ---- grad / snip ------------------------------------------------------------------------------
def _dense_accumulated_grads(model_name: str, targets: list[str], batches: list[dict]) -> dict[str, torch.Tensor]:
    """Reference: every target weight trainable at once, .grad summed over the batches."""
    model = MODELS[model_name]()
    for p in model.parameters():
        p.requires_grad_(False)
    for name in targets:
        model.get_submodule(name).weight.requires_grad_(True)
    for batch in batches:
        model(**batch).loss.backward()
    out = {}
    for name in targets:
        layer = model.get_submodule(name)
        geometry = geometry_of(layer)
        out[name] = (geometry.as_out_in(layer.weight.detach()), geometry.as_out_in(layer.weight.grad))
    return out


@pytest.mark.parametrize("model_name", ["bert", "gpt2"])
@pytest.mark.parametrize("mask_type", ["grad", "snip"])
@pytest.mark.parametrize("max_memory_mb", [None, 0.01])  # one pass / one layer per pass
def test_grad_and_snip_equal_dense_brute_force(model_name, mask_type, max_memory_mb):
    batches = _batches(model_name)
    model = MODELS[model_name]()
    config = _config(model_name, mask_type)
    masks = compute_masks(model, config, batches, max_memory_mb=max_memory_mb)
    reference = _dense_accumulated_grads(model_name, find_targets(model, config), batches)
    assert set(masks) == set(reference)
    for name, (weight, grad) in reference.items():
        scores = grad.abs() if mask_type == "grad" else (weight * grad).abs()
        k = masks[name].shape[1]
        n = weight.shape[1]
        assert torch.equal(masks[name][0] * n + masks[name][1], _brute_top_k(scores, k)), name


def test_calibration_respects_max_batches_and_custom_loss():
    batches = _batches("bert", n=4)
    model = MODELS["bert"]()
    config = _config("bert", "grad")
    first_two = compute_masks(model, config, batches, max_batches=2)
    assert all(torch.equal(first_two[k], v) for k, v in compute_masks(model, config, batches[:2]).items())
    generator = iter(batches)  # a one-shot iterator is read once, even when layers need several passes
    assert all(torch.equal(first_two[k], v)
               for k, v in compute_masks(model, config, generator, max_batches=2, max_memory_mb=0.01).items())
    logits_loss = lambda mdl, b: mdl(input_ids=b["input_ids"]).logits.pow(2).sum()
    custom = compute_masks(model, config, batches, loss_fn=logits_loss)
    assert any(not torch.equal(first_two[k], v) for k, v in custom.items())


def test_calibration_leaves_the_model_as_it_found_it():
    model = MODELS["bert"]()
    model.train()
    head = model.classifier.weight
    head.grad = torch.ones_like(head)
    target = model.get_submodule("bert.encoder.layer.0.attention.self.query").weight
    target.grad = torch.full_like(target, 2.0)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    compute_masks(model, _config("bert", "snip"), _batches("bert"), max_memory_mb=0.01)
    assert model.training
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert torch.equal(head.grad, torch.ones_like(head)) and torch.equal(target.grad, torch.full_like(target, 2.0))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_calibration_ignores_dropout_and_existing_adapters():
    """Eval mode during calibration; an adapter already on the model is disabled (masks rank the base)."""
    plain = compute_masks(MODELS["bert"](), _config("bert", "grad"), _batches("bert"))
    model = MODELS["bert"]()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5  # ignored: calibration runs in eval mode
    shirakit.inject(model, _config("bert", "random", init_weights=False), "other")
    model.train()
    model(input_ids=inputs())
    again = compute_masks(model, _config("bert", "grad"), _batches("bert"))
    assert all(torch.equal(plain[k], again[k]) for k in plain)


def test_uncalibrated_grad_and_snip_say_what_to_do():
    for mask_type in ("grad", "snip"):
        with pytest.raises(ValueError, match="needs calibration data.*shirakit.calibrate"):
            shirakit.inject(MODELS["llama"](), _config("llama", mask_type))
    with pytest.raises(ValueError, match="needs calibration batches"):
        compute_masks(MODELS["llama"](), _config("llama", "grad"), None)
    with pytest.raises(ValueError, match="batches are empty"):
        compute_masks(MODELS["llama"](), _config("llama", "grad"), [])
    with pytest.raises(ValueError, match="have 'labels'"):
        compute_masks(MODELS["llama"](), _config("llama", "grad"), [{"input_ids": inputs()}])


def test_layers_off_the_loss_path_are_reported():
    model = MODELS["bert"]()
    config = shirakit.ShiraConfig(r=2, mask_type="grad", target_modules=["query", "pooler.dense"])
    only_mlm = lambda mdl, b: mdl.bert(input_ids=b["input_ids"]).last_hidden_state.pow(2).mean()
    with pytest.raises(ValueError, match=r"pooler\.dense.*received no gradient"):
        compute_masks(model, config, _batches("bert"), loss_fn=only_mlm, max_memory_mb=None)


def test_precomputed_masks_belong_to_the_model_they_were_computed_on():
    model = MODELS["bert"]()
    config = shirakit.calibrate(model, _config("bert", "grad"), _batches("bert"))
    with pytest.raises(ValueError, match="was not calibrated"):
        shirakit.inject(MODELS["bert"](), config)


def test_data_free_masks_from_compute_masks_match_inject():
    for mask_type in ("random", "struct", "wm"):
        masks = compute_masks(MODELS["llama"](), _config("llama", mask_type))
        model = _injected("llama", mask_type)
        for name, layer in adapter_layers(model):
            assert torch.equal(masks[name], layer.adapters["default"].shira_indices.long()), (mask_type, name)


# ---- custom masks ----------------------------------------------------------------------------
def _q_only(mask_fn):
    return shirakit.ShiraConfig(r=2, target_modules=["q_proj"], mask_fn=mask_fn)


def my_mask(layer, r, generator):
    return torch.arange(5)


@pytest.mark.parametrize(
    "mask,match",
    [
        (my_mask, r"layers\.0\.self_attn\.q_proj: mask 'my_mask': expected K = r\*\(in\+out\) = 256 indices, found 5"),
        (lambda layer, r, g: torch.zeros(256, dtype=torch.long), r"duplicated index \(row 0, col 0\)"),
        (lambda layer, r, g: torch.arange(256) + 64 * 64, r"flat index out of range \[0, 4096\)"),
        (lambda layer, r, g: torch.stack([torch.arange(256) % 64 + 1, torch.arange(256) // 64]), "out of range"),
        (lambda layer, r, g: torch.stack([torch.arange(256) % 64, -torch.arange(256) // 64]), "out of range"),
        (lambda layer, r, g: torch.rand(256), "expected integer indices"),
        (lambda layer, r, g: torch.zeros(3, 256, dtype=torch.long), r"shape \(2, K\) or \(K,\)"),
        (lambda layer, r, g: [1, 2, 3], "expected a tensor"),
    ],
)
def test_custom_mask_errors_name_the_layer_and_the_problem(mask, match):
    with pytest.raises((ValueError, TypeError), match=match):
        shirakit.inject(MODELS["llama"](), _q_only(mask))


def test_custom_mask_in_row_col_or_flat_form():
    def diagonal_band(layer, r, generator):
        m, n = layer.out_features, layer.in_features
        k = r * (m + n)
        flat = torch.arange(k)  # first k cells row-major
        return torch.stack([flat // n, flat % n])

    model = shirakit.inject(MODELS["llama"](), _q_only(diagonal_band))
    flat = _flat_indices(model)
    assert all(torch.equal(v, torch.arange(256)) for v in flat.values())
    model = shirakit.inject(MODELS["llama"](), _q_only(lambda layer, r, g: torch.arange(255, -1, -1)))
    assert all(torch.equal(v, torch.arange(256)) for v in _flat_indices(model).values())


# ---- determinism ---------------------------------------------------------------------------
@pytest.mark.parametrize("mask_type", ALL_MASKS)
def test_same_seed_and_data_give_the_same_masks(mask_type):
    one = _flat_indices(_injected("bert", mask_type))
    two = _flat_indices(_injected("bert", mask_type))
    assert one.keys() == two.keys()
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_same_shaped_layers_get_different_random_masks_and_seeds_matter():
    masks = _flat_indices(_injected("bert", "random"))
    query0 = masks["bert.encoder.layer.0.attention.self.query"]
    for other in ["bert.encoder.layer.0.attention.self.value", "bert.encoder.layer.1.attention.self.query",
                  "bert.encoder.layer.0.attention.output.dense"]:
        assert not torch.equal(query0, masks[other]), other
    reseeded = _flat_indices(shirakit.inject(MODELS["bert"](), _config("bert", "random").__class__(
        r=2, target_modules=TARGETS["bert"], random_seed=8)))
    assert not torch.equal(query0, reseeded["bert.encoder.layer.0.attention.self.query"])


def test_different_data_gives_different_grad_masks():
    model = MODELS["bert"]()
    one = compute_masks(model, _config("bert", "grad"), _batches("bert")[:1])
    two = compute_masks(model, _config("bert", "grad"), _batches("bert")[1:2])
    assert any(not torch.equal(one[k], two[k]) for k in one)


# ---- checkpoints -----------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", ["bert", "gpt2"])
@pytest.mark.parametrize("mask_type", ALL_MASKS)
def test_trained_with_each_mask_saves_and_reloads_without_recomputing(tmp_path, monkeypatch, model_name, mask_type):
    model = _injected(model_name, mask_type)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    for batch in _batches(model_name, n=2):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    ids = inputs(seed=99)
    expected = model(input_ids=ids).logits
    shirakit.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["mask_type"] == mask_type

    def forbidden(*args, **kwargs):
        raise AssertionError("mask recomputed at load time")

    for name in list(MASKS):
        monkeypatch.setitem(MASKS, name, forbidden)
    fresh = shirakit.load_adapter(MODELS[model_name](), tmp_path)
    assert shirakit.read_config(tmp_path).mask_type == mask_type
    assert _flat_indices(fresh).keys() == _flat_indices(model).keys()
    assert all(torch.equal(a, _flat_indices(model)[k]) for k, a in _flat_indices(fresh).items())
    torch.testing.assert_close(fresh(input_ids=ids).logits, expected, atol=0, rtol=0)


def test_with_masks_accepts_masks_computed_elsewhere():
    model = MODELS["llama"]()
    config = _config("llama", "struct")
    masks = compute_masks(model, config)
    shifted = with_masks(model, _config("llama", "random"), masks)
    assert shifted.mask_type == "random" and callable(shifted.mask_fn)
    shirakit.inject(model, shifted)
    assert all(torch.equal(masks[n], layer.adapters["default"].shira_indices.long())
               for n, layer in adapter_layers(model))


@pytest.mark.parametrize("mask_type", ["struct", "wm", "snip"])
def test_peft_loads_a_checkpoint_made_with_a_non_random_mask(tmp_path, mask_type):
    peft = pytest.importorskip("peft")
    model = _injected("llama", mask_type, init_weights=False)
    ids = inputs(seed=99)
    expected = model(input_ids=ids).logits
    shirakit.save_adapter(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(MODELS["llama"](), tmp_path)
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-6, rtol=1e-6)
