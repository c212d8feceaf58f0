"""SHiRA's sparse work on GPUs, in Triton: the CUDA twins of :mod:`.cpu_sddmm` and :mod:`.grouped`.

Three products, all with fp32 accumulators whatever the inputs' dtype (fp32, bf16, fp16):

- :func:`value_grad`, the value gradient of SHiRA (arXiv 2406.13175) at its K positions,

      out[k] = sum_t g[t, i_k] x[t, j_k]          g (T, m), x (T, n), positions sorted row-major

  a sampled dense-dense product (SDDMM) in K*T multiply-adds. A program takes ``BLOCK_K``
  consecutive positions (sorted row-major, so a few output rows i: the block reads each of
  those rows' gradient columns once per token tile, the repeats hit the same cache lines) and
  runs down the tokens in tiles of ``BLOCK_T``, keeping ``BLOCK_K`` fp32 sums.
- :func:`csr_rows`, ``y[t, i] += sum_{k in row i} v_k x[t, j_k]`` for the rows of a CSR matrix per
  token row, with several CSR matrices laid end to end and a per-batch-row index saying which one
  a row uses (-1: none): every adapter's rows of a layer in one launch, as Punica's SGMV does for
  LoRA (Chen et al. 2023, arXiv 2310.18547), with CSR values in place of the low-rank factors. A
  program takes one batch row's ``BLOCK_T`` tokens and ``BLOCK_M`` output rows, so each value is
  read once per token tile. With a single matrix and every row using it, this is the additive
  product ``y += x S^T`` of tied and quantized weights, and with S^T's CSR its input gradient
  ``dx = g S``.
- the additive path's value gradient is :func:`value_grad` again.

Triton is imported at the first call, never at shirakit's import: CPU users without triton pay
nothing. The kernels are built per value of ``TRITON_INTERPRET`` (read by ``triton.jit`` when it
decorates), so the test suite runs them on CPU tensors under Triton's interpreter. Callers pick
them by the tensor's device (:func:`usable`); ``SHIRAKIT_TRITON=0`` turns them off, and
``SHIRAKIT_TRITON=1`` with ``TRITON_INTERPRET=1`` routes CPU tensors through them (tests only).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import threading

import torch

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_lock = threading.Lock()
_built: dict[str, tuple] = {}


@functools.cache
def available() -> bool:
    """Is triton importable? (looked up without importing it)"""
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def usable(*tensors: torch.Tensor) -> bool:
    """Do these kernels take these tensors? CUDA float tensors (fp32/bf16/fp16) with triton present,
    unless ``SHIRAKIT_TRITON=0``; CPU tensors only when forced (``SHIRAKIT_TRITON=1`` and the
    interpreter on), for the tests. Never under torch.compile (the callers' custom ops hold them)."""
    switch = os.environ.get("SHIRAKIT_TRITON")
    if switch == "0" or not available() or torch.compiler.is_compiling():
        return False
    if not all(t.dtype in _DTYPES for t in tensors):
        return False
    if all(t.device.type == "cuda" for t in tensors):
        return True
    return switch == "1" and _interpreting() and all(t.device.type == "cpu" for t in tensors)


def _kernels() -> tuple:
    """(sddmm kernel, csr-rows kernel), jitted at the first call for this TRITON_INTERPRET value."""
    key = "interpret" if _interpreting() else "compiled"
    with _lock:
        if key not in _built:
            _built[key] = _build()
        return _built[key]


def _build() -> tuple:
    """A fresh copy of :mod:`._triton_impl` (``triton.jit`` reads TRITON_INTERPRET as it decorates)."""
    import importlib.util
    import sys

    source = importlib.util.find_spec(f"{__package__}._triton_impl")
    name = f"{source.name}{'_interpreted' if _interpreting() else ''}"  # one module per mode
    if name not in sys.modules:  # the interpreter finds a kernel's globals through sys.modules
        spec = importlib.util.spec_from_file_location(name, source.origin)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    module = sys.modules[name]
    return module.sddmm_kernel, module.csr_rows_kernel


def _rows_2d(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def value_grad(grad_out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
               block_k: int = 64, block_t: int = 32) -> torch.Tensor:
    """(K,) fp32: out[k] = sum_t grad_out[t, rows[k]] * x[t, cols[k]] over all leading dims.

    ``rows``/``cols``: int32 or int64, on the inputs' device, sorted row-major for speed (any order
    is correct). Inputs fp32/bf16/fp16, read as they are and multiplied in fp32."""
    g2, x2 = _rows_2d(grad_out.detach()), _rows_2d(x.detach())
    if g2.shape[0] != x2.shape[0]:
        raise ValueError(f"value_grad: grad_out and x must have the same number of tokens; found "
                         f"{g2.shape[0]} and {x2.shape[0]}")
    if rows.shape != cols.shape or rows.dim() != 1:
        raise ValueError(f"value_grad: rows and cols must be 1-D of one length; found {tuple(rows.shape)} "
                         f"and {tuple(cols.shape)}")
    count = rows.numel()
    out = torch.empty(count, dtype=torch.float32, device=g2.device)
    if count == 0:
        return out
    if g2.shape[0] == 0:
        return out.zero_()
    sddmm, _ = _kernels()
    grid = (-(-count // block_k),)
    sddmm[grid](g2, x2, rows.contiguous(), cols.contiguous(), out, count, g2.shape[0], g2.stride(0), x2.stride(0),
                BLOCK_K=block_k, BLOCK_T=block_t)
    return out


def csr_rows(y: torch.Tensor, x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, vals: torch.Tensor,
             crow_start: torch.Tensor, nnz_start: torch.Tensor, which: torch.Tensor,
             block_t: int = 16, block_m: int = 32) -> torch.Tensor:
    """In place: ``y[b, t, i] += sum_{k in row i of matrix which[b]} vals[k] * x[b, t, col[k]]``.

    ``y`` (B*T, m) and ``x`` (B*T, n), rows of batch row b at b*T .. b*T + T - 1 (T = rows / B, B =
    ``which``'s length). Matrices laid end to end: matrix a's m + 1 row offsets at
    ``crow[crow_start[a]:]`` count from ``nnz_start[a]`` into ``col``/``vals``; ``which[b] = -1``
    leaves that row alone. Sums in fp32, one rounding into y's dtype. Returns ``y``."""
    if y.dim() != 2 or x.dim() != 2 or y.shape[0] != x.shape[0] or y.stride(-1) != 1:
        raise ValueError(f"csr_rows takes y (rows, m) with unit column stride and x (rows, n); found "
                         f"{tuple(y.shape)} stride {y.stride()} and {tuple(x.shape)}")
    batch = which.numel()
    if batch == 0 or y.shape[0] == 0 or y.shape[1] == 0:
        return y
    if y.shape[0] % batch:
        raise ValueError(f"csr_rows: {y.shape[0]} token rows do not split into {batch} batch rows")
    x = x if x.stride(-1) == 1 else x.contiguous()
    tokens, n_rows = y.shape[0] // batch, y.shape[1]
    _, kernel = _kernels()
    grid = (batch, -(-tokens // block_t), -(-n_rows // block_m))
    kernel[grid](x, y, crow, col, vals, crow_start, nnz_start, which, tokens, n_rows, x.stride(0), y.stride(0),
                 BLOCK_T=block_t, BLOCK_M=block_m)
    return y


def sparse_product(values: torch.Tensor, x2: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                   n_rows: int) -> torch.Tensor:
    """``x2 S^T`` (T, n_rows) for one CSR matrix S (``crow``, ``col``, ``values`` already scaled), in
    ``values``' dtype with fp32 sums: the additive path's forward, and with S^T's CSR its ``g S``."""
    device = x2.device
    out = torch.zeros(x2.shape[0], n_rows, dtype=values.dtype, device=device)
    if x2.shape[0] == 0:
        return out
    zero = torch.zeros(1, dtype=torch.int64, device=device)
    return csr_rows(out, x2, crow, col, values, zero, zero, zero.int(), block_t=16)
