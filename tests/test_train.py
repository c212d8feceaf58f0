"""The demo's training loop on a tiny model (the packaged data paths run in the demo itself)."""

from __future__ import annotations

import torch

import shirakit
from shirakit.app import training
from tests.models import tiny_llama


def test_causal_lm_loop_trains_and_plots(tmp_path):
    model = tiny_llama()
    shirakit.inject(model, shirakit.ShiraConfig(r=2, target_modules=["q_proj", "v_proj"], random_seed=0))
    blocks = torch.randint(1, 97, (12, 16), generator=torch.Generator().manual_seed(0))
    before = training.perplexity(model, blocks[:4])
    history = training.train_causal_lm(model, blocks, blocks[:4], lr=3e-2, epochs=3, batch_size=4, progress=False)
    assert len(history.steps) == 9 and len(history.epoch_metric) == 3
    assert history.epoch_metric[-1] < before  # the adapter learned the (memorizable) blocks
    assert not model.training
    png = training.plot_history({"shira": history}, tmp_path / "curves.png")
    assert png.stat().st_size > 1000


def test_max_steps_caps_training():
    model = tiny_llama()
    shirakit.inject(model, shirakit.LoraConfig(r=2, target_modules=["q_proj"]))
    blocks = torch.randint(1, 97, (12, 16))
    history = training.train_causal_lm(model, blocks, blocks[:4], lr=1e-2, epochs=5, batch_size=4, max_steps=4,
                                    progress=False)
    assert history.steps == [1, 2, 3, 4]
