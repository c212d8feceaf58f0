"""Training adapters on diffusion pipelines: the loop (loss falls, only adapter values change, prior preservation,
samples per epoch), the `shirakit train --task text-to-image` command, and the offline example's small setting."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

import shirakit  # noqa: E402
import shirakit.diffusers as sd  # noqa: E402
from tests.diffusion_tiny import ATTENTION, tiny_pipeline  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def write_images(folder: Path, n: int, colour: tuple[int, int, int]) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image = Image.new("RGB", (40, 36), colour)
        image.putpixel((i, i), (0, 0, 0))
        image.save(folder / f"{i}.png")
    return folder


def test_train_changes_only_adapter_values(tmp_path):
    pipe = tiny_pipeline(tmp_path)
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    images = write_images(tmp_path / "imgs", 4, (200, 30, 30))
    config = shirakit.ShiraConfig(r=2, target_modules=ATTENTION)
    history = sd.train(pipe, images, prompt="a red sks square", adapter=config,
                       adapter_name="style", max_steps=3, batch_size=2, lr=1e-2, samples_dir=tmp_path / "samples",
                       n_samples=1, sample_steps=2, progress=False, class_prompt="a square",
                       class_images=write_images(tmp_path / "cls", 2, (9, 9, 9)))
    assert len(history.losses) == 3 and all(torch.isfinite(torch.tensor(history.losses)))
    assert [Path(p).name for p in history.samples] == ["epoch-1.png", "epoch-2.png"]
    trained = shirakit.adapter_state_dict(pipe.unet, "style")
    assert any(v.abs().sum() > 0 for k, v in trained.items() if k.endswith("shira_weight"))
    sd.switch_adapter(pipe, None)
    sd.unload(pipe)
    assert all(torch.equal(base[k], v) for k, v in pipe.unet.state_dict().items())


def test_train_lowers_the_loss(tmp_path):
    """A few dozen steps on one flat colour: the denoising loss at fixed noise falls."""
    from shirakit.app.diffusion import denoising_loss, load_images

    pipe = tiny_pipeline(tmp_path)
    images = load_images(write_images(tmp_path / "imgs", 4, (10, 200, 10)), 3, 32)
    many = images.repeat(16, 1, 1, 1)  # 64 draws of (noise, t): an estimate steady enough to compare

    def fixed_loss():
        with torch.no_grad():
            return float(denoising_loss(pipe, many, ["green"] * 64, torch.Generator().manual_seed(0)).mean())

    before = fixed_loss()
    sd.train(pipe, images, prompt="green", adapter=shirakit.ShiraConfig(r=4, target_modules="all-linear"),
             max_steps=60, batch_size=4, lr=3e-2, progress=False, gradient_checkpointing=False)
    assert fixed_loss() < 0.9 * before, before


def test_train_errors(tmp_path):
    pipe = tiny_pipeline(tmp_path)
    with pytest.raises(ValueError, match="text-conditioned"):
        sd.train(pipe, torch.zeros(1, 3, 32, 32), adapter=shirakit.ShiraConfig(r=2, target_modules=ATTENTION))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="found none"):
        sd.train(pipe, tmp_path / "empty", prompt="x", adapter=shirakit.ShiraConfig(r=2, target_modules=ATTENTION),
                 adapter_name="b")


def test_cli_text_to_image(tmp_path, capsys):
    from shirakit.cli import main

    pipe = tiny_pipeline(tmp_path)
    pipe.save_pretrained(tmp_path / "pipe", safe_serialization=True)
    images = write_images(tmp_path / "imgs", 4, (30, 30, 200))
    out = tmp_path / "out"
    args = ["train", "--task", "text-to-image", "--model", str(tmp_path / "pipe"), "--data", str(images),
            "--prompt", "a blue sks square", "--targets", *ATTENTION, "--r", "2", "--max-steps", "2",
            "--batch-size", "2", "--samples", "1", "--sample-steps", "2", "--out", str(out), "--quiet"]
    assert main(args) == 0
    assert (out / "adapter" / "unet" / "adapter_config.json").is_file() and (out / "samples" / "epoch-1.png").is_file()
    record = json.loads((out / "shirakit_training.json").read_text())
    assert record["steps"] == 2 and record["finished"] and len(record["loss"]) == 2
    fresh = tiny_pipeline(tmp_path)
    sd.load_adapter(fresh, out / "adapter", "trained")
    assert sd.adapter_names(fresh) == ["trained"]
    bad = ["train", "--task", "text-to-image", "--model", str(images), "--data", str(images), "--out",
           str(tmp_path / "o2")]
    assert main(bad) == 2
    assert "model_index.json" in capsys.readouterr().err


def test_example_small(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import diffusion_styles
    finally:
        sys.path.pop(0)
    result = diffusion_styles.main(["--small", "--out", str(tmp_path)])
    from PIL import Image

    with Image.open(result["grid"]) as grid:
        assert grid.size == (4 * 16 * 4, 4 * 16 * 4)
    assert set(result["colours"]) == {"base", "A", "B", "AB"}
    assert (tmp_path / "style_A" / "unet" / "adapter_config.json").is_file()


def test_benchmark_small(capsys):
    """benchmarks/diffusion_switch.py --small: SDXL's UNet layout, small; both libraries' rows come out."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import diffusion_switch
    finally:
        sys.path.pop(0)
    diffusion_switch.main(["--small", "--threads", "1", "--dtypes", "float32", "--reps", "1"])
    out = capsys.readouterr().out
    row = [line for line in out.splitlines() if line.startswith("| float32 | 1 |")]
    assert row and "x |" in row[-1]
