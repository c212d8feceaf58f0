"""Per-row SHiRA for vLLM's workers without vLLM: ``grouped.pack_rows`` / ``add_packed_rows`` (the
builtin engine's grouped kernel over deltas kept outside shirakit's layers) against a dense float64
reference, rows of several adapters and rows of none in one call."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shirakit.methods.shira import grouped

pytestmark = pytest.mark.skipif(not grouped.AVAILABLE, reason="numba is not importable")


def sparse_delta(m: int, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    positions = torch.randperm(m * n, generator=generator)[:k].sort().values
    return positions, torch.randn(k, generator=generator)


@pytest.mark.parametrize("m", [13, 16])  # a ragged last quad of rows, and none
def test_each_row_gets_its_own_adapters_delta(m):
    n, tokens = 40, 11
    deltas = [sparse_delta(m, n, 3 * (m + n), seed) for seed in range(3)]
    packed = grouped.pack_rows((m, n), deltas)
    x = torch.randn(tokens, n)
    base = torch.randn(tokens, m)
    which = np.array([0, 2, -1, 1, 0, 0, 2, -1, 1, 1, 0], dtype=np.int32)
    y = base.clone()
    grouped.add_packed_rows(packed, which, x, y)
    for t in range(tokens):
        want = base[t].double()
        if which[t] >= 0:
            positions, values = deltas[which[t]]
            dense = torch.zeros(m * n, dtype=torch.float64)
            dense[positions] = values.double()
            want = want + dense.view(m, n) @ x[t].double()
        assert torch.allclose(y[t].double(), want, atol=1e-5), t
    assert torch.equal(y[which < 0], base[which < 0])  # rows of no adapter are untouched


def test_unsorted_positions_and_half_precision_are_refused():
    positions, values = sparse_delta(8, 8, 10, 0)
    with pytest.raises(ValueError, match="sorted"):
        grouped.pack_rows((8, 8), [(positions.flip(0), values)])
    with pytest.raises(ValueError, match="float32 or float64"):
        grouped.pack_rows((8, 8), [(positions, values)], torch.bfloat16)
