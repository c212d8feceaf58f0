"""The shirakit command on tiny adapters (the packaged-model commands are exercised by the demo)."""

from __future__ import annotations

import pytest

import shirakit
from shirakit.cli import main
from tests.models import MODELS, TARGETS


@pytest.fixture
def two_adapters(save_adapter_folder):
    return [save_adapter_folder(shirakit.ShiraConfig(r=2, target_modules=TARGETS["llama"], init_weights=False,
                                                     random_seed=seed), folder=f"a{i}")
            for i, seed in enumerate((1, 2))]


def test_inspect(two_adapters, capsys):
    assert main(["inspect", str(two_adapters[0]), "--layers"]) == 0
    out = capsys.readouterr().out
    assert "method       SHIRA   format peft" in out
    assert "layers       14" in out
    values = shirakit.trainable_parameters(shirakit.load_adapter(MODELS["llama"](), two_adapters[0],
                                                                 is_trainable=True))[0]
    assert f"values       {values:,}" in out


def test_orthogonality_from_files_matches_the_model(two_adapters, tmp_path, capsys):
    png = tmp_path / "heat.png"
    assert main(["orthogonality", str(two_adapters[0]), str(two_adapters[1]), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert png.stat().st_size > 1000
    model = MODELS["llama"]()
    shirakit.load_adapter(model, two_adapters[0], "x")
    shirakit.load_adapter(model, two_adapters[1], "y")
    rows = shirakit.adapter_orthogonality(model, "x", "y")
    mean_awor = sum(r.awor for r in rows) / len(rows)
    assert f"{mean_awor:8.5f}" in out


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("shirakit: error: ") and err.count("\n") == 1
    assert main(["eval", str(tmp_path)]) == 2
    assert "no adapter_config.json (not an adapter folder)" in capsys.readouterr().err


def test_compact_inspect(two_adapters, tmp_path, capsys):
    model = shirakit.load_adapter(MODELS["llama"](), two_adapters[0])
    shirakit.save_adapter(model, tmp_path / "c", compact=True)
    assert main(["inspect", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "format compact-v1" in out
    per_value = float(out.split("tensor data ")[1].split(" bytes per value")[0])
    assert per_value <= 6.0 + 16 * 14 / 3584  # 6 bytes a value, plus 14 (empty) far-gap tables
