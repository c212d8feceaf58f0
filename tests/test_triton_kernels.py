"""SHiRA's Triton kernels (methods/shira/triton_kernels.py) against float64 references.

On CPU they run under Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors; slow, so the
sizes are small); with ``SHIRAKIT_TEST_DEVICE=cuda`` the same tests run the compiled kernels.
Tolerances: fp32 outputs 1e-5 relative to the reference's scale (the inputs, whatever their dtype,
are exact in fp32 and the sums are fp32); outputs stored in bf16/fp16 within one rounding of the
fp32 sum on top of that: 2u relative (u = 2^-8 bf16, 2^-11 fp16), since the interpreter casts fp32
to half precision by truncation (error below 2u; compiled Triton rounds to nearest, below u).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install -c constraints.txt -e '.[dev]')")

from shirakit.methods.shira import triton_kernels as tk  # noqa: E402
from shirakit.methods.shira.masks import struct_stride  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
UNIT_ROUNDOFF = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@pytest.fixture(autouse=True)
def _interpreter_on_cpu(device):
    if device.type == "cpu" and not tk._interpreting():
        pytest.skip("CPU tensors need Triton's interpreter: TRITON_INTERPRET=1 before triton is imported "
                    "(tests/conftest.py sets it for CPU runs)")


def _random_positions(m, n, k, seed, empty_rows=()):
    """k distinct positions, sorted row-major, none in ``empty_rows``."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.ones(m, n, dtype=torch.bool)
    allowed[list(empty_rows)] = False
    flat = allowed.flatten().nonzero().flatten()
    flat = flat[torch.randperm(flat.numel(), generator=g)[:k]].sort().values
    return flat // n, flat % n


def _struct_positions(m, n, k):
    """A SHiRA-Struct-like mask: whole rows and columns every f, and the diagonal (sorted, distinct)."""
    f = struct_stride(m, n, k) or max(m, n)
    cells = torch.zeros(m, n, dtype=torch.bool)
    cells[::f] = True
    cells[:, ::f] = True
    d = min(m, n)
    cells[torch.arange(d), torch.arange(d)] = True
    flat = cells.flatten().nonzero().flatten()
    return flat // n, flat % n


MASKS = {
    "random": lambda m, n: _random_positions(m, n, max(1, m * n // 7), 0),
    "empty-rows": lambda m, n: _random_positions(m, n, max(1, m * n // 5), 1, empty_rows=range(0, m, 3)),
    "struct": lambda m, n: _struct_positions(m, n, 2 * (m + n)),
    "k0": lambda m, n: (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)),
}


def _csr(rows, cols, m):
    crow = torch.zeros(m + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(rows, minlength=m).cumsum(0)
    return crow


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("shape", [(37, 19, 23), (5, 70, 3)], ids=["T37-m19-n23", "T5-m70-n3"])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
def test_value_grad_equals_the_float64_sddmm(device, dtype_name, mask, shape, index_dtype):
    dtype = DTYPES[dtype_name]
    tokens, m, n = shape
    rows, cols = MASKS[mask](m, n)
    g = torch.Generator().manual_seed(7)
    grad = torch.randn(tokens, m, generator=g).to(dtype)
    x = torch.randn(tokens, n, generator=g).to(dtype)
    want = (grad.double().T @ x.double())[rows, cols]
    got = tk.value_grad(grad.to(device), x.to(device), rows.to(index_dtype).to(device), cols.to(index_dtype).to(device),
                        block_k=32, block_t=16)
    assert got.dtype == torch.float32 and got.shape == (rows.numel(),) and got.device == device
    scale = want.abs().max().item() if want.numel() else 1.0
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-5 * scale)


def test_value_grad_takes_leading_dims_and_strided_rows(device):
    """(B, T, .) inputs, and a sliced x whose rows are not packed (stride > width)."""
    g = torch.Generator().manual_seed(3)
    grad = torch.randn(2, 9, 11, generator=g)
    wide = torch.randn(2, 9, 20, generator=g)
    x = wide[..., 3:16]
    rows, cols = _random_positions(11, 13, 40, 2)
    want = (grad.reshape(-1, 11).double().T @ x.reshape(-1, 13).double())[rows, cols]
    got = tk.value_grad(grad.to(device), x.to(device), rows.to(device), cols.to(device))
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_value_grad_with_no_tokens_is_zero(device):
    rows, cols = _random_positions(4, 5, 6, 0)
    got = tk.value_grad(torch.zeros(0, 4, device=device), torch.zeros(0, 5, device=device), rows.to(device),
                        cols.to(device))
    assert torch.equal(got.cpu(), torch.zeros(6))


def _dense(rows, cols, values, m, n):
    dense = torch.zeros(m, n, dtype=torch.float64)
    dense[rows, cols] = values.double()
    return dense


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("transpose", [False, True], ids=["x_St", "g_S"])
def test_sparse_product_equals_the_float64_product(device, dtype_name, mask, transpose):
    """The additive path: y = x S^T, and its input gradient g S (S^T's CSR)."""
    dtype = DTYPES[dtype_name]
    m, n, tokens = 21, 13, 19
    rows, cols = MASKS[mask](m, n)
    g = torch.Generator().manual_seed(5)
    values = torch.randn(rows.numel(), generator=g).to(dtype)
    dense = _dense(rows, cols, values, m, n)
    if transpose:  # S^T in CSR: positions (col, row), sorted
        order = torch.argsort(cols * m + rows)
        rows, cols, values, dense, m, n = cols[order], rows[order], values[order], dense.T, n, m
    x = torch.randn(tokens, n, generator=g).to(dtype)
    want = x.double() @ dense.T
    crow = _csr(rows, cols, m)
    got = tk.sparse_product(values.to(device), x.to(device), crow.to(device), cols.int().to(device), m)
    assert got.dtype == dtype and got.shape == (tokens, m)
    scale = max(want.abs().max().item(), 1.0)
    u = UNIT_ROUNDOFF[dtype]
    torch.testing.assert_close(got.double().cpu(), want, rtol=max(2 * u, 1e-5), atol=1e-5 * scale)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_grouped_rows_equal_each_adapter_alone(device, dtype_name):
    """Four CSR matrices end to end (one with K = 0, one with empty rows, one struct), a batch whose
    rows use them in any order or none (-1): y += each row's own x S_a^T, other rows untouched."""
    dtype = DTYPES[dtype_name]
    m, n, batch, tokens = 17, 23, 6, 5
    masks = [MASKS["random"](m, n), MASKS["k0"](m, n), MASKS["empty-rows"](m, n), MASKS["struct"](m, n)]
    g = torch.Generator().manual_seed(11)
    crows, cols_all, vals_all, denses = [], [], [], []
    for rows, cols in masks:
        values = torch.randn(rows.numel(), generator=g).to(dtype)
        crows.append(_csr(rows, cols, m))
        cols_all.append(cols.int())
        vals_all.append(values)
        denses.append(_dense(rows, cols, values, m, n))
    crow_start = torch.tensor([0] + [c.numel() for c in crows[:-1]]).cumsum(0)
    nnz_start = torch.tensor([0] + [c.numel() for c in cols_all[:-1]]).cumsum(0)
    which = torch.tensor([2, -1, 0, 3, 1, 0], dtype=torch.int32)
    x = torch.randn(batch * tokens, n, generator=g).to(dtype)
    y0 = torch.randn(batch * tokens, m, generator=g).to(dtype)
    want = y0.double().clone()
    for b, a in enumerate(which.tolist()):
        if a >= 0:
            sl = slice(b * tokens, (b + 1) * tokens)
            want[sl] += x[sl].double() @ denses[a].T
    y = y0.to(device)
    out = tk.csr_rows(y, x.to(device), torch.cat(crows).to(device), torch.cat(cols_all).to(device),
                      torch.cat(vals_all).to(device), crow_start.to(device), nnz_start.to(device), which.to(device),
                      block_t=4, block_m=8)
    assert out is y
    got = y.cpu()
    untouched = [b for b, a in enumerate(which.tolist()) if a < 0] + [4]  # -1, and the K = 0 adapter
    for b in untouched:
        assert torch.equal(got[b * tokens:(b + 1) * tokens], y0[b * tokens:(b + 1) * tokens])
    u = UNIT_ROUNDOFF[dtype]
    torch.testing.assert_close(got.double(), want, rtol=max(2 * u, 1e-5), atol=1e-5 * want.abs().max().item())


def test_bad_shapes_are_refused_clearly(device):
    with pytest.raises(ValueError, match="same number of tokens"):
        tk.value_grad(torch.zeros(3, 4, device=device), torch.zeros(2, 4, device=device),
                      torch.zeros(1, dtype=torch.long, device=device), torch.zeros(1, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="do not split"):
        tk.csr_rows(torch.zeros(5, 3, device=device), torch.zeros(5, 2, device=device),
                    *[torch.zeros(4, dtype=torch.long, device=device)] * 5, torch.zeros(2, dtype=torch.int32,
                                                                                        device=device))


# ---- the kernels in place: SHiRA's paths pick them by device ------------------------------------

@pytest.fixture
def on_triton(device, monkeypatch):
    """CUDA picks the Triton kernels by itself; on CPU they are forced (under the interpreter)."""
    if device.type == "cpu":
        monkeypatch.setenv("SHIRAKIT_TRITON", "1")
    return device


def _llama_with(targets, seed=5, dtype=torch.float32, tied=False, names=("default",)):
    from transformers import LlamaConfig, LlamaForCausalLM

    import shirakit

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=40, max_position_embeddings=32, tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    for i, name in enumerate(names):
        shirakit.inject(model, shirakit.ShiraConfig(r=2, target_modules=targets, init_weights=False,
                                                    random_seed=seed + i), name)
    return model


def _train_grads(model, ids):
    model.train()
    model(input_ids=ids).logits.float().pow(2).mean().backward()
    return {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("tied", [False, True], ids=["in-weight", "tied-additive"])
def test_shira_training_step_on_the_kernels_equals_the_cpu_path(on_triton, tied):
    """In-weight (value grad) and tied lm_head (additive x S^T, g S, value grad): same gradients."""
    import copy

    targets = ["lm_head", "q_proj"] if tied else ["q_proj", "down_proj"]
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(1))
    ref = _llama_with(targets, tied=tied)
    model = copy.deepcopy(ref).to(on_triton)
    calls = []
    real = tk.value_grad
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tk, "value_grad", lambda *a, **k: calls.append(1) or real(*a, **k))
        got = _train_grads(model, ids.to(on_triton))
    want = _train_grads(ref, ids)
    assert calls, "the Triton value gradient was not used"
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_routed_inference_on_the_grouped_kernel_equals_rows_alone(on_triton):
    import shirakit
    from shirakit.methods.shira import grouped
    from shirakit.model.routing import route

    model = _llama_with("all-linear", names=("a", "b", "c")).to(on_triton)
    names = ["b", "__base__", "a", "c", "a"]
    ids = torch.randint(0, 40, (len(names), 6), generator=torch.Generator().manual_seed(2)).to(on_triton)
    rows = []
    with torch.no_grad():
        for i, name in enumerate(names):
            if name == "__base__":
                with shirakit.disable_adapters(model):
                    rows.append(model(input_ids=ids[i:i + 1]).logits)
            else:
                shirakit.set_adapter(model, name)
                rows.append(model(input_ids=ids[i:i + 1]).logits)
        launches = []
        real = grouped.add_grouped_on_device
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(grouped, "add_grouped_on_device", lambda *a: launches.append(1) or real(*a))
            mp.setattr(grouped, "can_group", lambda y, x: False)  # not the CPU numba kernel
            from shirakit.core.adapter import InWeightAdapter

            mp.setattr(InWeightAdapter, "prefers_weight", lambda self, tokens: False)
            with route(model, names):
                routed = model(input_ids=ids).logits
    assert launches, "the grouped Triton kernel was not used"
    torch.testing.assert_close(routed.cpu(), torch.cat(rows).cpu(), rtol=1e-5, atol=1e-5)
