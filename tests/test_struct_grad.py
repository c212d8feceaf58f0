"""SHiRA's value gradient by dense products for structured masks (methods/shira/struct_grad.py):
the same values as the sampled kernel and a float64 reference, and taken only where the mask has the structure."""

from __future__ import annotations

import pytest
import torch

import shirakit
from shirakit.core.state import adapter_layers
from shirakit.methods.shira import cpu_sddmm, struct_grad
from shirakit.methods.shira.masks import random_mask, struct_indices, struct_stride
from shirakit.methods.shira.sparse import SparsePattern, sampled_value_grad, value_grad
from tests.models import MODELS, TARGETS, inputs, output


def _struct_positions(m: int, n: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    flat = struct_indices(m, n, r * (m + n))
    return flat // n, flat % n


def _reference(g: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    g2, x2 = g.reshape(-1, g.shape[-1]).double(), x.reshape(-1, x.shape[-1]).double()
    return (g2.T @ x2)[rows.long(), cols.long()]


def _inputs(tokens: int, m: int, n: int, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, m, generator=gen).to(dtype), torch.randn(tokens, n, generator=gen).to(dtype)


# m != n both ways, strides that divide neither side, r = 1 (no lattice: diagonal + fill), a fill
# spanning several rows, and the benchmark's SmolLM2 k/v shape
SHAPES = [(37, 53, 1), (37, 53, 3), (53, 37, 2), (40, 40, 2), (7, 100, 1), (100, 7, 2), (64, 23, 4),
          (192, 576, 16), (300, 110, 5)]


@pytest.mark.parametrize("m, n, r", SHAPES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_struct_masks_take_the_dense_path_and_match_float64(m, n, r, index_dtype):
    rows, cols = _struct_positions(m, n, r)
    plan = struct_grad.find_structure(rows.to(index_dtype), cols.to(index_dtype), (m, n))
    assert plan is not None
    assert plan.rows.numel() + plan.cols.numel() > 0 or plan.diag is not None
    g, x = _inputs(45, m, n, seed=m * n + r)
    got = plan.value_grad(g, x)
    assert got.dtype == torch.float32 and got.shape == rows.shape
    torch.testing.assert_close(got.double(), _reference(g, x, rows, cols), atol=2e-4, rtol=1e-5)


def test_shapes_cover_strides_that_divide_neither_side_and_overlaps():
    """The SHAPES above exercise what the brief asks for: a stride dividing neither m nor n, rows
    and columns crossing (overlaps counted once) and the diagonal crossing the lattice."""
    strides = {(m, n, r): struct_stride(m, n, r * (m + n)) for m, n, r in SHAPES}
    assert any(f is not None and m % f and n % f for (m, n, _), f in strides.items())
    assert any(f is None for f in strides.values())  # r = 1: no lines, diagonal + fill
    m, n, r = 37, 53, 3
    rows, cols = _struct_positions(m, n, r)
    plan = struct_grad.find_structure(rows, cols, (m, n))
    crossing = set(plan.rows.tolist()) & set(plan.cols.tolist())
    assert crossing  # e.g. (0, 0): on a full row, a full column and the diagonal, computed once


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m, n", [(96, 260), (260, 96)])
def test_equals_the_sampled_kernel_with_leading_dims_and_threads(m, n, threads):
    rows, cols = _struct_positions(m, n, 6)
    pattern = SparsePattern(rows.int(), cols.int(), m, n)
    assert pattern.structure() is not None
    gen = torch.Generator().manual_seed(3)
    g, x = torch.randn(2, 33, m, generator=gen), torch.randn(2, 33, n, generator=gen)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dense = value_grad(g, x, pattern.tensors(), pattern.structure())
        sampled = sampled_value_grad(g, x, *pattern.tensors())
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(dense, sampled, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(dense.double(), _reference(g, x, rows, cols), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_other_dtypes(dtype):
    m, n = 50, 70
    rows, cols = _struct_positions(m, n, 3)
    plan = struct_grad.find_structure(rows, cols, (m, n))
    g, x = _inputs(20, m, n, dtype)
    got = plan.value_grad(g, x)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)  # as the sampled path
    atol = 1e-10 if dtype == torch.float64 else 1e-4  # half inputs are exact in fp32, summed in fp32
    torch.testing.assert_close(got.double(), _reference(g, x, rows, cols), atol=atol, rtol=1e-6)


@pytest.mark.parametrize("m, n, r", [(256, 704, 4), (704, 256, 8), (1024, 1024, 16)])
def test_random_masks_do_not_take_the_path(m, n, r):
    layer = torch.nn.Linear(n, m, bias=False)
    flat = random_mask(layer, r, torch.Generator().manual_seed(0))
    assert struct_grad.find_structure(flat // n, flat % n, (m, n)) is None
    assert SparsePattern(flat // n, flat % n, m, n).structure() is None


def test_a_large_rest_goes_to_the_sampled_kernel_and_a_small_one_is_gathered():
    m, n = 120, 90
    half_column = torch.arange(60) * n + 7  # column 7 in half the rows: dense enough
    lines = torch.cat([torch.arange(n) + 5 * n, torch.arange(n) + 77 * n, half_column])  # rows 5 and 77
    gen = torch.Generator().manual_seed(1)
    scattered = torch.randperm(m * n, generator=gen)[:120]
    flat = torch.unique(torch.cat([lines, scattered]))
    rows, cols = flat // n, flat % n
    plan = struct_grad.find_structure(rows, cols, (m, n))
    assert plan is not None and plan.rows.tolist() == [5, 77] and plan.cols.tolist() == [7]
    assert 0 < plan.rest_rows.numel() and plan.rest_by_kernel
    g, x = _inputs(25, m, n)
    calls = []

    def kernel(g2, x2, r, c, crow):
        calls.append(r.numel())
        assert torch.equal(crow[1:] - crow[:-1], torch.bincount(r, minlength=m))
        return cpu_sddmm.value_grad(g2, x2, r, c) if cpu_sddmm.usable(g2, x2) else _reference(g2, x2, r, c).float()

    by_kernel = plan.value_grad(g, x, rest_kernel=kernel)
    gathered = plan.value_grad(g, x)  # no kernel given: gathers
    assert calls == [plan.rest_rows.numel()]
    for got in (by_kernel, gathered):
        torch.testing.assert_close(got.double(), _reference(g, x, rows, cols), atol=1e-4, rtol=1e-5)


def test_empty_and_unstructured_edge_cases():
    assert struct_grad.find_structure(torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64),
                                      (4, 4)) is None
    rows, cols = _struct_positions(30, 20, 2)
    plan = struct_grad.find_structure(rows, cols, (30, 20))
    got = plan.value_grad(torch.zeros(0, 30), torch.zeros(0, 20))  # no tokens: zeros
    assert got.shape == rows.shape and not got.any()


# ---- in a model ---------------------------------------------------------------------------------
def _grads(model, ids) -> list[torch.Tensor]:
    output(model, ids).float().pow(2).mean().backward()
    return [layer.adapters["default"].shira_weight.grad.clone() for _, layer in adapter_layers(model)]


def _struct_model(model_name: str, dtype=torch.float32):
    model = MODELS[model_name](dtype)
    shirakit.inject(model, shirakit.ShiraConfig(r=3, mask_type="struct", target_modules=TARGETS[model_name],
                                                init_weights=False, random_seed=2))
    return model.train()


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])  # gpt2: Conv1D, the weight stored (in, out)
def test_model_gradients_equal_the_sampled_path(model_name, monkeypatch):
    model = _struct_model(model_name)
    taken = []
    real = struct_grad.StructPlan.value_grad
    monkeypatch.setattr(struct_grad.StructPlan, "value_grad",
                        lambda self, *a, **k: taken.append(1) or real(self, *a, **k))
    dense = _grads(model, inputs())
    layers = len(dense)
    assert layers > 0 and len(taken) == layers  # every layer took the dense path
    model.zero_grad()
    monkeypatch.setenv("SHIRAKIT_STRUCT_GRAD", "0")
    sampled = _grads(model, inputs())
    assert len(taken) == layers  # the switch turns it off
    for a, b in zip(dense, sampled):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_a_loaded_adapter_with_the_layout_takes_the_path_and_new_indices_drop_it(tmp_path):
    """Found from the indices, not the config: a file saved with a struct mask under another
    mask_type name still takes it; indices written in place make the pattern (and it) anew."""
    model = _struct_model("llama")
    for _, layer in adapter_layers(model):
        layer.adapters["default"].config.mask_type = "random"  # as a file that does not say
    shirakit.save_adapter(model, tmp_path / "a")
    loaded = shirakit.load_adapter(MODELS["llama"](), tmp_path / "a").train()
    adapters = [layer.adapters["default"] for _, layer in adapter_layers(loaded)]
    assert adapters and all(a.pattern().structure() is not None for a in adapters)
    adapter = adapters[0]
    m, n = adapter.geometry.out_features, adapter.geometry.in_features
    flat = random_mask(torch.nn.Linear(n, m), adapter.config.r, torch.Generator().manual_seed(5)).sort().values
    with torch.no_grad():
        adapter.shira_indices.copy_(torch.stack([flat // n, flat % n]))
    assert adapter.pattern().structure() is None
