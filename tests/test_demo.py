"""``shirakit demo`` end to end, on a tiny BERT and synthetic texts in place of MiniLM and the packaged
corpora: every step of the README's main command runs (train, save, switch, fuse, orthogonality,
figures). A previous round broke its fusion step without any test noticing."""

from __future__ import annotations

import random

import pytest

from shirakit.app import data, demo, training
from shirakit.cli import main
from tests.folders import WORDS, tokenizer


def _texts(labels: list[str], count: int, seed: int) -> data.TextDataset:
    """Texts whose label is which word they repeat (learnable), mixed with random filler."""
    rng = random.Random(seed)
    cue = {i: WORDS[i] for i in range(len(labels))}
    rows = [(" ".join([cue[k % len(labels)]] * 3 + rng.choices(WORDS, k=5)), k % len(labels)) for k in range(count)]
    return data.TextDataset(f"synthetic-{seed}", labels, rows[: count // 2], rows[count // 2:])


def _tiny_classifier(num_labels: int, seed: int = 0):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    tok = tokenizer()
    torch.manual_seed(seed)
    config = BertConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=len(tok), max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                        num_labels=num_labels)
    return BertForSequenceClassification(config).eval(), tok


@pytest.fixture
def tiny_demo(monkeypatch):
    monkeypatch.setattr(data, "bbc_news", lambda test_size, seed, **_: _texts(["a", "b", "c"], 24, seed=1))
    monkeypatch.setattr(data, "tweet_sentiment", lambda test_size, seed, **_: _texts(["neg", "pos"], 24, seed=2))
    monkeypatch.setattr(training, "load_classifier", _tiny_classifier)


def test_demo_runs_every_step(tiny_demo, tmp_path, capsys):
    result = demo.run(tmp_path / "out", steps=3, r=2, seq_len=12, batch_size=4, test_size=12)
    names = [f"{m}-{t}" for m in demo.METHODS for t in ("bbc", "tweets")]
    assert sorted(result["results"]) == sorted(names)
    for name in names:
        assert 0.0 <= result["results"][name]["accuracy"] <= 1.0
        assert result["results"][name]["trainable"] > 0
        assert (tmp_path / "out" / "adapters" / name / "adapter_config.json").is_file()
    assert all(ms > 0 for ms in result["switch_ms"].values())
    assert sorted(result["fusion"]) == sorted((m, t) for m in demo.METHODS for t in ("bbc", "tweets"))
    for alone, fused in result["fusion"].values():
        assert 0.0 <= alone <= 1.0 and 0.0 <= fused <= 1.0
    assert [row[0] for row in result["orthogonality"]] == list(demo.METHODS)
    for figure in ["training_curves.png", "concept_loss.png", "awor_shira.png", "awor_lora.png"]:
        assert (tmp_path / "out" / figure).stat().st_size > 0
    out = capsys.readouterr().out
    assert "concept loss" in out and "figures and adapters written to" in out


def test_demo_command(tiny_demo, tmp_path, capsys):
    """The CLI entry (``shirakit demo``) passes its flags through and rewrites its own folder."""
    out_dir = tmp_path / "demo_out"
    for _ in range(2):
        main(["demo", "--out", str(out_dir), "--steps", "2", "--r", "2", "--seq-len", "12", "--batch-size", "4",
              "--test-size", "12"])
    assert (out_dir / "adapters" / "shira-bbc").is_dir()
    assert "2 steps of 4 x 12 tokens per adapter, r=2" in capsys.readouterr().out
