"""SHiRA's CPU value-gradient kernel (shirakit.methods.shira.cpu_sddmm) against sampled_addmm and a dense reference."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess

import pytest
import torch

import shirakit
from shirakit.core.state import adapter_layers
from shirakit.methods.shira import cpu_sddmm, native_sddmm
from shirakit.methods.shira.sparse import SparsePattern, sampled_value_grad
from tests.models import MODELS, TARGETS, inputs, output

pytestmark = pytest.mark.skipif(not cpu_sddmm.AVAILABLE, reason="numba is not installed")


def _positions(m: int, n: int, k: int, seed: int, empty_rows: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.arange(m * n)
    if empty_rows:  # leave every third row without positions
        allowed = allowed[(allowed // n) % 3 != 0]
    flat = allowed[torch.randperm(allowed.numel(), generator=gen)[:k]].sort().values
    return flat // n, flat % n


def _c_build_problem() -> str | None:
    """Why the C kernels cannot build here, or None where they must (then a failed build is a bug)."""
    compiler = native_sddmm._compiler()
    if compiler is None:
        return "no C compiler"
    if os.environ.get("SHIRAKIT_NATIVE", "1") == "0":
        return "SHIRAKIT_NATIVE=0"
    probe = ("typedef float v4 __attribute__((vector_size(16)));\n"
             "v4 f(v4 a) { return __builtin_shufflevector(a, a, 3, 2, 1, 0); }\n")
    done = subprocess.run([compiler, "-x", "c", "-fsyntax-only", "-"], input=probe, capture_output=True, text=True,
                          timeout=60)
    return None if done.returncode == 0 else "the compiler lacks __builtin_shufflevector (GCC >= 12 or Clang)"


@pytest.fixture(params=["C", "numba"])
def kernels(request, monkeypatch):
    """Each kernel test runs twice: with the C kernels (where a compiler is present) and with numba's."""
    if request.param == "numba":
        monkeypatch.setattr(native_sddmm, "kernels", lambda: None)
    elif native_sddmm.kernels() is None:
        problem = _c_build_problem()
        if problem is None:
            pytest.fail("a C compiler that can build them is present but the C kernels did not build")
        pytest.skip(f"{problem}: numba's kernels only")
    cpu_sddmm.forget_inputs()  # a transpose kept by the other kernels is not reused
    return request.param


def _reference(g: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    g2, x2 = g.reshape(-1, g.shape[-1]).double(), x.reshape(-1, x.shape[-1]).double()
    return (g2.T @ x2)[rows, cols]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tokens", [1, 7, 16, 33, 128, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_dense_reference(tokens, dtype, threads, kernels, monkeypatch):
    monkeypatch.setattr(cpu_sddmm, "_MACS_PER_EXTRA_THREAD", 1)  # these small calls take torch's threads too
    m, n, k = 45, 29, 200
    rows, cols = _positions(m, n, k, seed=tokens, empty_rows=True)
    gen = torch.Generator().manual_seed(tokens)
    g = torch.randn(tokens, m, generator=gen).to(dtype)
    x = torch.randn(tokens, n, generator=gen).to(dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = cpu_sddmm.value_grad(g, x, rows, cols)
    finally:
        torch.set_num_threads(before)
    assert got.dtype == torch.float32 and got.shape == (k,)
    # the inputs are exact in fp32, so the only error is fp32 accumulation over `tokens` terms
    torch.testing.assert_close(got.double(), _reference(g, x, rows, cols), atol=1e-4 * tokens ** 0.5, rtol=1e-5)


def test_default_threads_stay_on_the_caller_for_small_calls_and_spread_big_ones(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    per_thread = cpu_sddmm._MACS_PER_EXTRA_THREAD
    assert cpu_sddmm._default_threads(0) == 1
    assert cpu_sddmm._default_threads(per_thread - 1) == 1
    assert cpu_sddmm._default_threads(per_thread) == 2
    assert cpu_sddmm._default_threads(100 * per_thread) == 4  # never more than torch's
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert cpu_sddmm._default_threads(100 * per_thread) == 1


def test_kernel_matches_sampled_addmm_on_a_llama_sized_layer():
    m, n, tokens = 704, 256, 96
    rows, cols = _positions(m, n, 8 * (m + n), seed=0)
    g, x = torch.randn(2, tokens // 2, m), torch.randn(2, tokens // 2, n)
    pattern = SparsePattern(rows, cols, m, n)
    expected = torch.sparse.sampled_addmm(pattern.csr(), g.reshape(-1, m).T, x.reshape(-1, n), beta=0.0).values()
    torch.testing.assert_close(cpu_sddmm.value_grad(g, x, rows, cols), expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_both_transposes_match_the_reference(threads, kernels):
    """Sources up to cpu_sddmm._TILED_MAX_COLUMNS wide take the tiled transpose, wider ones the
    element-wise one: g is narrow and x wide here, then the other way round; 37 tokens leave a
    partial 16-token block and padding."""
    narrow, wide, tokens = 40, cpu_sddmm._TILED_MAX_COLUMNS + 37, 37
    for m, n in [(narrow, wide), (wide, narrow)]:
        rows, cols = _positions(m, n, 600, seed=m)
        g, x = torch.randn(tokens, m), torch.randn(tokens, n)
        cpu_sddmm.forget_inputs()
        got = cpu_sddmm.value_grad(g, x, rows, cols, threads=threads)
        torch.testing.assert_close(got.double(), _reference(g, x, rows, cols), atol=1e-4 * tokens ** 0.5, rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_int32_positions_give_the_same_values_as_int64(threads, kernels):
    """A pattern may keep its indices as int32 (half the memory): the kernel reads them as they are."""
    m, n, tokens = 300, 2100, 45  # x wider than _TILED_MAX_COLUMNS: both transposes run
    rows, cols = _positions(m, n, 3000, seed=11)
    g, x = torch.randn(tokens, m), torch.randn(tokens, n)
    wide = cpu_sddmm.value_grad(g, x, rows, cols, threads=threads)
    narrow = cpu_sddmm.value_grad(g, x, rows.int(), cols.int(), threads=threads)
    assert torch.equal(wide, narrow)
    torch.testing.assert_close(narrow.double(), _reference(g, x, rows, cols), atol=1e-4 * tokens ** 0.5, rtol=1e-5)
    with pytest.raises(TypeError, match="both int64 or both int32"):
        cpu_sddmm.value_grad(g, x, rows, cols.int())
    with pytest.raises(TypeError, match="both int64 or both int32"):
        cpu_sddmm.value_grad(g, x, rows.short(), cols.short())


def test_kernel_edge_cases(kernels):
    torch.manual_seed(0)
    rows, cols = _positions(8, 6, 10, seed=3)
    no_tokens = cpu_sddmm.value_grad(torch.zeros(0, 8), torch.zeros(0, 6), rows, cols)
    assert torch.equal(no_tokens, torch.zeros(10))
    empty = torch.zeros(0, dtype=torch.int64)
    assert cpu_sddmm.value_grad(torch.randn(4, 8), torch.randn(4, 6), empty, empty).shape == (0,)
    # non-contiguous inputs and positions in no particular order are still right (sorted is only faster)
    g, x = torch.randn(6, 8).T.contiguous().T, torch.randn(11, 6)[::2]
    shuffle = torch.randperm(10)
    got = cpu_sddmm.value_grad(g, x, rows[shuffle].contiguous(), cols[shuffle].contiguous())
    torch.testing.assert_close(got.double(), _reference(g, x, rows[shuffle], cols[shuffle]), atol=1e-5, rtol=1e-5)


def test_c_kernels_fall_back_to_numba_without_a_working_compiler(monkeypatch, tmp_path):
    build = native_sddmm.kernels.__wrapped__  # the build itself, not the process's cached result
    monkeypatch.setattr(native_sddmm, "cache_dirs", lambda: [tmp_path])
    monkeypatch.setenv("SHIRAKIT_NATIVE", "0")
    assert build() is None
    monkeypatch.delenv("SHIRAKIT_NATIVE")
    monkeypatch.setattr(native_sddmm, "_compiler", lambda: None)
    assert build() is None
    monkeypatch.setattr(native_sddmm, "_compiler", lambda: shutil.which("false"))  # a compiler that always fails
    with pytest.warns(RuntimeWarning, match="did not build"):
        assert build() is None
    assert not list(tmp_path.iterdir())  # no half-written library left behind


def test_c_kernels_build_into_the_cache_folder_and_load_from_it(monkeypatch, tmp_path):
    problem = _c_build_problem()
    if problem is not None and problem != "SHIRAKIT_NATIVE=0":
        pytest.skip(problem)
    monkeypatch.setenv("SHIRAKIT_CACHE_DIR", str(tmp_path))
    assert native_sddmm.cache_dirs()[0] == tmp_path
    monkeypatch.setattr(native_sddmm, "cache_dirs", lambda: [tmp_path])  # not the one built for this machine already
    monkeypatch.delenv("SHIRAKIT_NATIVE", raising=False)
    built = native_sddmm.kernels.__wrapped__()
    assert built is not None and [p.suffix for p in tmp_path.iterdir()] == [".so"]
    assert native_sddmm.kernels.__wrapped__() is not None  # loaded from the cache: still one file
    assert len(list(tmp_path.iterdir())) == 1


def test_c_kernels_never_load_from_a_folder_others_can_write(monkeypatch, tmp_path):
    """A shared library runs code as it loads: one planted in a folder anyone may write (a shared
    temp dir) is neither loaded nor written beside; the build goes to the next folder, kept private."""
    if native_sddmm._compiler() is None or not hasattr(os, "getuid"):
        pytest.skip("no C compiler, or no POSIX file owners")
    monkeypatch.delenv("SHIRAKIT_NATIVE", raising=False)
    shared, private = tmp_path / "shared", tmp_path / "private"
    monkeypatch.setattr(native_sddmm, "cache_dirs", lambda: [shared])
    assert native_sddmm.kernels.__wrapped__() is not None
    (planted,) = shared.iterdir()
    planted.unlink()  # a new file: the one just loaded stays mapped in this process untouched
    planted.write_bytes(b"not a library: loading this would fail, running a real one would run its code")
    shared.chmod(0o777)
    monkeypatch.setattr(native_sddmm, "cache_dirs", lambda: [shared, private])
    assert native_sddmm.kernels.__wrapped__() is not None  # built afresh, not the planted file
    (built,) = private.iterdir()
    assert built.name == planted.name and not built.stat().st_mode & 0o077
    assert [p.name for p in shared.iterdir()] == [planted.name]  # nothing written into the shared folder


def test_torch_path_is_used_where_the_kernel_does_not_apply(monkeypatch):
    rows, cols = _positions(12, 10, 30, seed=4)
    pattern = SparsePattern(rows, cols, 12, 10)
    g, x = torch.randn(5, 12, dtype=torch.float64), torch.randn(5, 10, dtype=torch.float64)
    assert not cpu_sddmm.usable(g, x)  # fp64 stays on sampled_addmm
    torch.testing.assert_close(sampled_value_grad(g, x, *pattern.tensors()), _reference(g, x, rows, cols))
    monkeypatch.setattr(cpu_sddmm, "AVAILABLE", False)  # as without numba
    g, x = g.float(), x.float()
    assert not cpu_sddmm.usable(g, x)
    torch.testing.assert_close(sampled_value_grad(g, x, *pattern.tensors()).double(), _reference(g, x, rows, cols),
                               atol=1e-5, rtol=1e-5)


def _shira_grads(model_name: str, dtype: torch.dtype) -> list[torch.Tensor]:
    model = MODELS[model_name](dtype)
    shirakit.inject(model, shirakit.ShiraConfig(r=2, target_modules=TARGETS[model_name], init_weights=False,
                                                random_seed=5))
    model.train()
    output(model, inputs()).float().pow(2).mean().backward()
    return [layer.adapters["default"].shira_weight.grad for _, layer in adapter_layers(model)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("model_name", ["llama", "gpt2"])  # gpt2: Conv1D, the weight stored (in, out)
def test_shira_gradients_same_with_kernel_and_sampled_addmm(model_name, dtype, monkeypatch):
    with_kernel = _shira_grads(model_name, dtype)
    monkeypatch.setattr(cpu_sddmm, "AVAILABLE", False)
    with_torch = _shira_grads(model_name, dtype)
    assert len(with_kernel) == len(with_torch) > 0
    for a, b in zip(with_kernel, with_torch):
        assert a.dtype == b.dtype == torch.float32  # half models keep fp32 adapter values
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def _kernel_in_child(queue) -> None:
    torch.set_num_threads(1)  # as a DataLoader worker does: torch's own OpenMP pool is not fork-safe
    rows, cols = _positions(30, 20, 50, seed=6)
    g, x = torch.randn(40, 30), torch.randn(40, 20)
    got = cpu_sddmm.value_grad(g, x, rows, cols, threads=2)  # the kernel's pool, two workers
    queue.put(bool(torch.allclose(got.double(), _reference(g, x, rows, cols), atol=1e-4)))


def test_kernel_works_in_a_forked_child():
    """A DataLoader worker is a fork: the parent's pool threads do not exist there; the child gets its own."""
    rows, cols = _positions(30, 20, 50, seed=6)
    cpu_sddmm.value_grad(torch.randn(40, 30), torch.randn(40, 20), rows, cols, threads=2)  # the parent's pool is up
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_kernel_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("the kernel hung in a forked child")
    assert child.exitcode == 0 and queue.get(timeout=5)


def test_kept_input_transpose_is_reused_only_for_the_same_unchanged_input():
    """q, k and v share their input's transpose; an in-place write, or another tensor, is never served stale."""
    rows, cols = _positions(40, 24, 120, seed=7)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(33, 24, generator=gen)
    grads = [torch.randn(33, 40, generator=gen) for _ in range(3)]
    for g in grads:  # the second and third reuse the first's transpose of x
        torch.testing.assert_close(cpu_sddmm.value_grad(g, x, rows, cols).double(), _reference(g, x, rows, cols),
                                   atol=1e-4, rtol=1e-5)
    with torch.no_grad():
        x[3:5].mul_(-2.0)  # through a view: the version counter is shared
    torch.testing.assert_close(cpu_sddmm.value_grad(grads[0], x, rows, cols).double(),
                               _reference(grads[0], x, rows, cols), atol=1e-4, rtol=1e-5)
    other = x.clone()  # same shape, same values, other memory
    other[0] += 1.0
    torch.testing.assert_close(cpu_sddmm.value_grad(grads[0], other, rows, cols).double(),
                               _reference(grads[0], other, rows, cols), atol=1e-4, rtol=1e-5)
    cpu_sddmm.forget_inputs()
    torch.testing.assert_close(cpu_sddmm.value_grad(grads[1], x, rows, cols).double(),
                               _reference(grads[1], x, rows, cols), atol=1e-4, rtol=1e-5)


def test_int32_pattern_gives_the_int64_results_on_every_path(monkeypatch):
    """SHiRA's pattern holds views of its int32 indices: the numba kernel (fp32), torch's
    sampled_addmm (fp64, and fp32 without numba; its int32 CSR would be wrong, so it converts per
    call) and the sparse products of the additive path must give exactly what int64 ones give."""
    m, n = 40, 70
    rows, cols = _positions(m, n, 300, seed=7)
    wide, narrow = SparsePattern(rows, cols, m, n), SparsePattern(rows.int(), cols.int(), m, n)
    assert narrow.rows.dtype == torch.int32 and narrow.crow.dtype == torch.int64
    for dtype in (torch.float32, torch.float64):
        g, x = torch.randn(9, m, dtype=dtype), torch.randn(9, n, dtype=dtype)
        assert torch.equal(sampled_value_grad(g, x, *narrow.tensors()), sampled_value_grad(g, x, *wide.tensors()))
    values = torch.randn(300)
    x2, g2 = torch.randn(5, n), torch.randn(5, m)
    assert torch.equal(narrow.product(values, x2), wide.product(values, x2))
    assert torch.equal(narrow.product(values, g2, transpose=True), wide.product(values, g2, transpose=True))
    monkeypatch.setattr(cpu_sddmm, "AVAILABLE", False)  # fp32 on sampled_addmm
    g, x = torch.randn(9, m), torch.randn(9, n)
    assert torch.equal(sampled_value_grad(g, x, *narrow.tensors()), sampled_value_grad(g, x, *wide.tensors()))
    with pytest.raises(TypeError, match="both int32 or both int64"):
        SparsePattern(rows, cols.int(), m, n)


@pytest.mark.parametrize("index", [torch.int64, torch.int32])
def test_c_kernel_threads_give_bit_identical_values(index, monkeypatch):
    """Each value is one thread's dot in the same order: 1 or 2 OpenMP threads, or the Python pool
    (where the kernels may not use OpenMP), give the same bits; g and x leave 16 x 16 blocks partial."""
    if native_sddmm.kernels() is None:
        pytest.skip("no C kernels here")
    m, n, tokens = 203, 131, 77
    rows, cols = _positions(m, n, 4000, seed=21)
    rows, cols = rows.to(index), cols.to(index)
    g, x = torch.randn(tokens, m), torch.randn(tokens, n)
    results = []
    for threads in (1, 2):
        cpu_sddmm.forget_inputs()
        results.append(cpu_sddmm.value_grad(g, x, rows, cols, threads=threads))
        results.append(cpu_sddmm.value_grad(g, x, rows, cols, threads=threads))  # x's transpose kept
    monkeypatch.setattr(native_sddmm, "openmp_here", lambda native: False)  # the Python pool's threads
    cpu_sddmm.forget_inputs()
    results.append(cpu_sddmm.value_grad(g, x, rows, cols, threads=2))
    for got in results[1:]:
        assert torch.equal(got, results[0])
    torch.testing.assert_close(results[0].double(), _reference(g, x, rows.long(), cols.long()),
                               atol=1e-4 * tokens ** 0.5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_value_grad_calls_the_kernel_as_the_custom_op_does(dtype):
    """sparse.value_grad skips the custom op's dispatch in eager CPU calls: the same values."""
    from shirakit.methods.shira.sparse import value_grad

    rows, cols = _positions(40, 24, 300, seed=8)
    pattern = SparsePattern(rows.int(), cols.int(), 40, 24)
    g, x = torch.randn(2, 9, 40).to(dtype), torch.randn(2, 9, 24).to(dtype)
    cpu_sddmm.forget_inputs()
    eager = value_grad(g, x, pattern.tensors())
    cpu_sddmm.forget_inputs()
    assert torch.equal(eager, sampled_value_grad(g, x, *pattern.tensors()))


def test_one_openmp_runtime_reads_the_process_maps(monkeypatch, tmp_path):
    """The kernels take OpenMP threads only with one OpenMP runtime mapped (torch's): a second one
    would spin against the first one's workers."""
    lines = ["7f00-7f01 r-xp 0 08:01 1 /site-packages/torch/lib/libgomp.so.1",
             "7f02-7f03 r--p 0 08:01 1 /site-packages/torch/lib/libgomp.so.1",
             "7f04-7f05 r-xp 0 08:01 2 /usr/lib/libc.so.6"]
    maps = tmp_path / "maps"
    real = native_sddmm.Path

    def fake_path(name):
        return maps if name == "/proc/self/maps" else real(name)

    monkeypatch.setattr(native_sddmm, "Path", fake_path)
    maps.write_text("\n".join(lines) + "\n")
    assert native_sddmm._one_openmp_runtime()
    maps.write_text("\n".join(lines + ["7f06-7f07 r-xp 0 08:01 3 /opt/intel/lib/libiomp5.so"]) + "\n")
    assert not native_sddmm._one_openmp_runtime()
