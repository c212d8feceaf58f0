"""Fixtures several test files share, one block per subject (helpers that are plain functions live
in tests/models.py, tests/serving.py, tests/checks.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


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
