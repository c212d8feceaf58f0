# ---- device (gpu26): SHIRAKIT_TEST_DEVICE picks where device-generic tests run -----------------
# Default cpu; "cuda" runs them on the GPU (and skips them, with the reason, where there is none).
# Kept as one self-contained block so other shared fixtures can sit beside it.
import os as _os

import pytest as _pytest

# Triton's interpreter runs the kernels on CPU tensors (tests/test_triton_kernels.py). triton.jit
# reads TRITON_INTERPRET when it decorates, and torch imports triton.language with torch._dynamo,
# so it is set here, before any test module imports torch, for CPU runs only.
if _os.environ.get("SHIRAKIT_TEST_DEVICE", "cpu").startswith("cpu"):
    _os.environ.setdefault("TRITON_INTERPRET", "1")

import torch as _torch  # noqa: E402


@_pytest.fixture
def device() -> _torch.device:
    """The torch device of device-generic tests: ``SHIRAKIT_TEST_DEVICE`` (default ``cpu``)."""
    name = _os.environ.get("SHIRAKIT_TEST_DEVICE", "cpu")
    found = _torch.device(name)
    if found.type == "cuda" and not _torch.cuda.is_available():
        _pytest.skip(f"SHIRAKIT_TEST_DEVICE={name} but torch {_torch.__version__} sees no CUDA device here")
    if found.type not in ("cpu", "cuda"):
        raise ValueError(f"SHIRAKIT_TEST_DEVICE must name a cpu or cuda device; found {name!r}")
    return found
# ---- end device ---------------------------------------------------------------------------------
