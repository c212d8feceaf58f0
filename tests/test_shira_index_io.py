"""SHiRA's one-pass index loading (shirakit.methods.shira.index_io) against the reference torch path."""

from __future__ import annotations

import pytest
import torch

from shirakit.core.adapter import LayerGeometry
from shirakit.methods.shira import compact
from shirakit.methods.shira import index_io as shira_index_io
from shirakit.methods.shira.masks import validate_indices

pytestmark = pytest.mark.skipif(not shira_index_io.AVAILABLE, reason="numba is not installed")


def _sorted_pairs(m: int, n: int, k: int, seed: int = 0) -> torch.Tensor:
    flat = torch.randperm(m * n, generator=torch.Generator().manual_seed(seed))[:k].sort().values
    return torch.stack([flat // n, flat % n]).to(torch.int32)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_valid_pairs_fill_the_buffers_as_the_reference_does(fan_in_fan_out, dtype):
    m, n, k = 37, 53, 300
    pairs = _sorted_pairs(m, n, k).to(dtype)
    geometry = LayerGeometry(n, m, fan_in_fan_out=fan_in_fan_out)
    indices, storage = torch.empty(2, k, dtype=torch.int32), torch.empty(k, dtype=torch.int64)
    assert shira_index_io.load_pairs(pairs, m, n, fan_in_fan_out, indices, storage)
    expected, order = validate_indices(pairs, geometry, k, "test")
    assert order is None
    assert torch.equal(indices, expected.to(torch.int32))
    assert torch.equal(storage, geometry.storage_flat_index(expected[0], expected[1]))


@pytest.mark.parametrize("case", ["unsorted", "duplicate", "row out of range", "negative col", "wrong count", "int16"])
def test_anything_unusual_goes_to_the_reference_path(case):
    m, n, k = 20, 30, 50
    pairs = _sorted_pairs(m, n, k).long()
    if case == "unsorted":
        pairs = pairs[:, torch.randperm(k, generator=torch.Generator().manual_seed(1))]
    elif case == "duplicate":
        pairs[:, 10] = pairs[:, 9]
    elif case == "row out of range":
        pairs[0, -1] = m
    elif case == "negative col":
        pairs[1, 0] = -1
    elif case == "wrong count":
        pairs = pairs[:, :-1]
    elif case == "int16":
        pairs = pairs.to(torch.int16)
    out = torch.empty(2, k, dtype=torch.int32)
    assert not shira_index_io.load_pairs(pairs, m, n, False, out, torch.empty(k, dtype=torch.int64))


def _gapped_pairs(m: int, n: int) -> torch.Tensor:
    """Sorted positions with a few gaps >= 65535 (the compact layout's far gaps)."""
    near = torch.arange(0, 4000, 7)
    far = torch.tensor([200_000, 200_001, 400_000, m * n - 1])
    flat = torch.cat([near, far])
    return torch.stack([flat // n, flat % n]).to(torch.int32)


def test_compact_decode_matches_the_reference_decoder():
    m, n = 700, 640
    pairs = _gapped_pairs(m, n)
    packed = compact.encode(pairs, torch.randn(pairs.shape[1]), n)
    assert packed["shira_index_far"].shape[1] >= 2  # the test covers far gaps
    fast = shira_index_io.decode_compact(packed["shira_index_gaps"], packed["shira_index_far"], m, n)
    reference = compact.decode(packed, n, "test")["shira_indices"]
    assert fast is not None and torch.equal(fast.long(), reference) and torch.equal(fast, pairs)


@pytest.mark.parametrize("case", ["zero gap", "past the end", "far out of order"])
def test_compact_decode_leaves_bad_files_to_the_reference_decoder(case):
    m, n = 700, 640
    packed = compact.encode(_gapped_pairs(m, n), torch.randn(_gapped_pairs(m, n).shape[1]), n)
    gaps, far = packed["shira_index_gaps"].clone(), packed["shira_index_far"].clone()
    if case == "zero gap":
        gaps[5] = 0
    elif case == "past the end":
        far[1, -1] += m * n
    else:
        far = far.flip(1)
    assert shira_index_io.decode_compact(gaps, far, m, n) is None
