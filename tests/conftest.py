"""Fixtures several test files share, one block per subject (helpers that are plain functions live
in tests/models.py, tests/serving.py, tests/checks.py)."""

from __future__ import annotations

import os as _os
from pathlib import Path

import pytest

# ---- device (gpu26): SHIRAKIT_TEST_DEVICE picks where device-generic tests run -----------------
# Default cpu; "cuda" runs them on the GPU (and skips them, with the reason, where there is none).
# Kept as one self-contained block so other shared fixtures can sit beside it.

# Triton's interpreter runs the kernels on CPU tensors (tests/test_triton_kernels.py). triton.jit
# reads TRITON_INTERPRET when it decorates, and torch imports triton.language with torch._dynamo,
# so it is set here, before any test module imports torch, for CPU runs only.
if _os.environ.get("SHIRAKIT_TEST_DEVICE", "cpu").startswith("cpu"):
    _os.environ.setdefault("TRITON_INTERPRET", "1")

import torch as _torch  # noqa: E402


@pytest.fixture
def device() -> _torch.device:
    """The torch device of device-generic tests: ``SHIRAKIT_TEST_DEVICE`` (default ``cpu``)."""
    name = _os.environ.get("SHIRAKIT_TEST_DEVICE", "cpu")
    found = _torch.device(name)
    if found.type == "cuda" and not _torch.cuda.is_available():
        pytest.skip(f"SHIRAKIT_TEST_DEVICE={name} but torch {_torch.__version__} sees no CUDA device here")
    if found.type not in ("cpu", "cuda"):
        raise ValueError(f"SHIRAKIT_TEST_DEVICE must name a cpu or cuda device; found {name!r}")
    return found
# ---- end device ---------------------------------------------------------------------------------

# ---- saved adapter folders ------------------------------------------------------------------------
@pytest.fixture
def save_adapter_folder(tmp_path):
    """``save(config, model_name="llama", folder="adapter") -> Path``: the adapter ``config`` makes on
    a fresh tiny model (tests/models.py), saved in PEFT's layout under ``tmp_path / folder``."""
    import shirakit
    from tests.models import MODELS

    def save(config, model_name: str = "llama", folder: str = "adapter") -> Path:
        model = MODELS[model_name]()
        shirakit.inject(model, config)
        return shirakit.save_adapter(model, tmp_path / folder)

    return save


# ---- a served tiny model and running servers --------------------------------------------------------
@pytest.fixture(scope="module")
def served_folders(tmp_path_factory) -> tuple[Path, dict[str, Path], Path]:
    """(model folder, adapter name -> folder, root): a tiny Llama saved as a Hugging Face folder and
    8 randomized adapters cycling through every method (tests/serving.py)."""
    from tests.serving import save_adapters, save_tiny_lm

    root = tmp_path_factory.mktemp("served")
    model_dir = save_tiny_lm(root / "tiny-llama")
    return model_dir, save_adapters(model_dir, root / "adapters", 8), root


@pytest.fixture
def tiny_server():
    """``start(model_dir, adapters, **engine_args)``: a server on 127.0.0.1 (a free port) over the
    tiny model; every server started is stopped when the test ends, passed or failed."""
    from tests.serving import start_tiny_server

    running = []

    def start(model_dir: Path, adapters: dict[str, Path], **engine_args):
        server = start_tiny_server(model_dir, adapters, **engine_args)
        running.append(server)
        return server

    yield start
    for server in running:
        server.stop()
