"""A missing optional package names the extra that installs it (src/shirakit/core/extras.py).

A package is made missing with ``sys.modules[name] = None`` (the import system then raises
ModuleNotFoundError for it, as when it is not installed); the command-line cases run in a fresh
interpreter so nothing imported earlier by other tests hides the import.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shirakit.core.extras import EXTRAS, MissingExtraError, missing_extra, require

ROOT = Path(__file__).resolve().parent.parent


def pyproject_extras() -> dict[str, list[str]]:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def test_every_extra_named_exists_and_brings_the_package():
    extras = pyproject_extras()
    # "eval" (lm-eval) is added by the lm-evaluation-harness work on another branch; nothing else may be missing
    assert {extra for extra, _ in EXTRAS.values()} - set(extras) <= {"eval"}
    for module, (extra, dist) in EXTRAS.items():
        if extra not in extras:
            continue
        wanted = dist.split("[")[0].lower()
        brought = [r.split(";")[0] for r in extras[extra]]  # the extra itself, or one it includes
        names = " ".join(brought).lower()
        included = [r for r in brought if r.startswith("shirakit[")]
        for inc in included:
            for sub in inc[len("shirakit["):-1].split(","):
                names += " " + " ".join(extras[sub]).lower()
        assert wanted in names, f"{module}: the {extra!r} extra does not install {dist}"


@pytest.mark.parametrize("module", ["datasets", "yaml", "gguf", "matplotlib", "fastapi", "ray", "diffusers",
                                    "PIL.Image", "bitsandbytes", "torchao", "vllm", "trl"])
def test_require_names_the_extra(module, monkeypatch):
    top = module.partition(".")[0]
    monkeypatch.setitem(sys.modules, top, None)
    if module != top:
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingExtraError) as info:
        require(module, "the thing")
    extra = EXTRAS[top][0]
    assert str(info.value).startswith(f"the thing needs the {top!r} package")
    assert str(info.value).endswith(f'pip install "shirakit[{extra}]"')
    assert info.value.name == top and info.value.extra == extra
    assert isinstance(info.value, ImportError)  # existing `except ImportError` still catches it


def test_present_module_is_returned_and_unknown_errors_pass_through():
    import json

    assert require("json") is json
    assert missing_extra(ModuleNotFoundError("No module named 'nope'", name="nope")) is None
    assert missing_extra(ValueError("x")) is None
    found = missing_extra(ModuleNotFoundError("No module named 'uvicorn'", name="uvicorn"), "shirakit serve")
    assert found is not None and found.extra == "serve" and "shirakit serve needs the 'uvicorn' package" in str(found)


def test_smollm2_without_gguf_names_the_demo_extra(monkeypatch, tmp_path):
    from shirakit.app.data import smollm2_dir

    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(MissingExtraError, match=r'needs the \'gguf\' package.*pip install "shirakit\[demo\]"'):
        smollm2_dir(tmp_path / "empty-cache")


def run_cli_without(modules: list[str], argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    code = ("import sys\n"
            f"for name in {modules!r}: sys.modules[name] = None\n"
            "from shirakit.cli import main\n"
            f"sys.exit(main({argv!r}))\n")
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("SHIRAKIT_DEBUG", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("shirakit:") or "Traceback" in line
            or "Error" in line]


def test_cli_train_without_datasets_is_one_line_and_status_2(tmp_path):
    from tests.serving import save_tiny_lm

    model = save_tiny_lm(tmp_path / "model")
    (tmp_path / "x.jsonl").write_text('{"text": "hello"}\n')
    done = run_cli_without(["datasets"], ["train", "--model", str(model), "--data", "x.jsonl", "--task", "causal-lm",
                                          "--out", str(tmp_path / "out")], tmp_path)
    assert done.returncode == 2, done.stderr
    assert error_lines(done.stderr) == [
        "shirakit: error: reading your own data (shirakit train --data) needs the 'datasets' package, which the "
        "'train' extra installs: pip install \"shirakit[train]\""], done.stderr


def test_cli_yaml_recipe_without_pyyaml(tmp_path):
    (tmp_path / "r.yaml").write_text("model: x\n")
    done = run_cli_without(["yaml"], ["train", "--config", "r.yaml"], tmp_path)
    assert done.returncode == 2
    assert error_lines(done.stderr) == [
        "shirakit: error: --config r.yaml needs the 'yaml' package (pyyaml), which the 'train' extra installs: "
        "pip install \"shirakit[train]\""], done.stderr


def test_cli_serve_without_fastapi_a_module_level_import(tmp_path):
    from tests.serving import save_tiny_lm

    model = save_tiny_lm(tmp_path / "model")
    done = run_cli_without(["fastapi"], ["serve", "--model", str(model), "--port", "0"], tmp_path)
    assert done.returncode == 2
    assert error_lines(done.stderr) == [
        "shirakit: error: shirakit serve needs the 'fastapi' package, which the 'serve' extra installs: "
        "pip install \"shirakit[serve]\""], done.stderr
