"""The training loop every task shares (``training_loop``), and the demo's packaged-model tasks.

Sequence classification: MiniLM + an adapter + the classification head (trained and saved per
adapter through ``modules_to_save``). Several tasks can share one model: each task owns a slice
of the head's outputs (``label_offset``) so one base model can hold every task's adapters.
Causal LM: SmolLM2-135M on Shakespeare, perplexity before and after.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from .. import methods  # noqa: F401  (registers the methods)
from ..core.extras import require
from ..core.registry import method_for_name
from .data import DECODER_TARGETS, ENCODER_TARGETS, TextDataset, minilm_dir  # noqa: F401  (targets re-exported)


def adapter_config(method: str, r: int, targets, modules_to_save=None, mask: str = "random", seed: int = 0):
    """The config for ``method`` (a registered name) at rank ``r`` (the method's
    :meth:`~shirakit.core.config.AdapterConfig.recipe`); ``mask`` only for methods with a
    ``mask_type`` field, where SHiRA and LoRA at the same r train the same count."""
    config_class = method_for_name(method).config_class
    if has_masks(config_class):
        return config_class.recipe(r, targets, modules_to_save, seed=seed, mask_type=mask)
    if mask != "random":
        raise ValueError(f"mask {mask!r}: method {method!r} has no masks (a mask_type field)")
    return config_class.recipe(r, targets, modules_to_save, seed=seed)


def has_masks(config_class) -> bool:
    """Does the method choose positions by a named mask (a ``mask_type`` field)?"""
    return any(f.name == "mask_type" for f in fields(config_class))


@dataclass
class Task:
    """A classification dataset placed at ``label_offset`` in a model's output logits."""

    data: TextDataset
    label_offset: int = 0

    @property
    def label_slice(self) -> slice:
        return slice(self.label_offset, self.label_offset + len(self.data.labels))


@dataclass
class History:
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    epoch_loss: list[float] = field(default_factory=list)
    epoch_metric: list[float] = field(default_factory=list)
    metric_name: str = "accuracy"
    seconds: float = 0.0


def _batches(rows, batch_size: int, rng: random.Random):
    order = list(range(len(rows)))
    rng.shuffle(order)
    for start in range(0, len(order), batch_size):
        yield [rows[i] for i in order[start : start + batch_size]]


def _encode(tokenizer, texts, seq_len: int):
    return tokenizer(texts, truncation=True, max_length=seq_len, padding=True, return_tensors="pt")


@torch.no_grad()
def accuracy(model: nn.Module, tokenizer, task: Task, seq_len: int, batch_size: int = 64) -> float:
    """Test accuracy, argmax over the task's own slice of the logits."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(task.data.test), batch_size):
        rows = task.data.test[start : start + batch_size]
        logits = model(**_encode(tokenizer, [t for t, _ in rows], seq_len)).logits[:, task.label_slice]
        correct += int((logits.argmax(-1) == torch.tensor([y for _, y in rows])).sum())
    model.train(was_training)
    return correct / len(task.data.test)


def _optimizer_steps(micro_batches: int, grad_accum: int) -> int:
    return math.ceil(micro_batches / grad_accum)


def training_loop(model: nn.Module, epoch_batches, loss_of, evaluate, *, lr: float, epochs: int, micro_batches: int,
           max_steps: int | None, desc: str, metric_name: str, progress: bool, grad_accum: int = 1,
           on_epoch=None, history: History | None = None) -> History:
    """The loop every task shares: AdamW on the trainable parameters, curves, a metric per epoch.

    One optimizer step = ``grad_accum`` micro-batches (the loss of each scaled by 1/grad_accum, so the
    gradient is the mean over the step's micro-batches). ``max_steps`` (optimizer steps) wins over
    ``epochs`` and runs as many epochs as it takes. ``history`` continues a resumed run: its steps
    count toward ``max_steps``. ``on_epoch(history)`` runs after each epoch's evaluation (a checkpoint).
    """
    tqdm = require("tqdm.auto", "the progress bar").tqdm

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    history = history or History(metric_name=metric_name)
    per_epoch = _optimizer_steps(micro_batches, grad_accum)
    total = max_steps if max_steps else per_epoch * epochs
    step = history.steps[-1] if history.steps else 0
    start = time.perf_counter() - history.seconds
    bar = tqdm(total=total, initial=step, desc=desc, disable=not progress, leave=False)
    while step < total:
        model.train()
        losses, pending = [], 0
        for micro, batch in enumerate(epoch_batches()):
            loss = loss_of(batch)
            (loss / grad_accum).backward()
            losses.append(loss.item())
            pending += 1
            if pending < grad_accum and micro + 1 < micro_batches:
                continue
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step, pending = step + 1, 0
            history.steps.append(step)
            history.loss.append(sum(losses[-grad_accum:]) / len(losses[-grad_accum:]))
            bar.update(1)
            bar.set_postfix(loss=f"{history.loss[-1]:.3f}")
            if step >= total:
                break
        optimizer.zero_grad(set_to_none=True)  # a partial accumulation cut by max_steps is dropped
        if not losses:
            raise ValueError("the training data gave no batch")
        history.epoch_loss.append(sum(losses) / len(losses))
        history.epoch_metric.append(evaluate())
        history.seconds = time.perf_counter() - start
        if progress:
            bar.write(f"  epoch {len(history.epoch_loss)}: loss {history.epoch_loss[-1]:.4f}  "
                      f"eval {metric_name} {history.epoch_metric[-1]:.3f}")
        if on_epoch is not None:
            on_epoch(history)
    bar.close()
    model.eval()
    return history


def train_classifier(
    model: nn.Module, tokenizer, task: Task, *, lr: float, epochs: int, batch_size: int, seq_len: int,
    max_steps: int | None = None, seed: int = 0, progress: bool = True,
) -> History:
    """Train the model's active adapter (and its head copy) on ``task``; returns the curves."""
    rng = random.Random(seed)

    def loss_of(rows):
        logits = model(**_encode(tokenizer, [t for t, _ in rows], seq_len)).logits[:, task.label_slice]
        return nn.functional.cross_entropy(logits, torch.tensor([y for _, y in rows]))

    return training_loop(model, lambda: _batches(task.data.train, batch_size, rng), loss_of,
                  lambda: accuracy(model, tokenizer, task, seq_len), lr=lr, epochs=epochs,
                  micro_batches=math.ceil(len(task.data.train) / batch_size), max_steps=max_steps,
                  desc=f"train {task.data.name}", metric_name="accuracy", progress=progress)


def load_classifier(num_labels: int, seed: int = 0):
    """MiniLM with a fresh classification head (seeded), and its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, logging

    torch.manual_seed(seed)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the head is new by design; don't warn about it
    try:
        model = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=num_labels)
    finally:
        logging.set_verbosity(verbosity)
    return model.eval(), AutoTokenizer.from_pretrained(minilm_dir())


# ---- causal LM --------------------------------------------------------------------------------
def lm_blocks(tokenizer, text: str, seq_len: int, count: int, seed: int) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    starts = random.Random(seed).sample(range(0, len(ids) - seq_len - 1), count)
    return torch.stack([ids[s : s + seq_len] for s in starts])


@torch.no_grad()
def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> float:
    model.eval()
    losses = [model(input_ids=blocks[i : i + batch_size], labels=blocks[i : i + batch_size]).loss.item()
              for i in range(0, len(blocks), batch_size)]
    return math.exp(sum(losses) / len(losses))


def train_causal_lm(model, train_blocks: torch.Tensor, test_blocks: torch.Tensor, *, lr: float, epochs: int,
                    batch_size: int, max_steps: int | None = None, seed: int = 0, progress: bool = True) -> History:
    gen = torch.Generator().manual_seed(seed)
    return training_loop(model, lambda: torch.randperm(len(train_blocks), generator=gen).split(batch_size),
                  lambda rows: model(input_ids=train_blocks[rows], labels=train_blocks[rows]).loss,
                  lambda: perplexity(model, test_blocks), lr=lr, epochs=epochs,
                  micro_batches=math.ceil(len(train_blocks) / batch_size), max_steps=max_steps,
                  desc="train causal-lm", metric_name="perplexity", progress=progress)


def plot_history(histories: dict[str, History], path: str | Path, title: str = "") -> Path:
    """Loss per step and the per-epoch metric, one line per run, as a PNG."""
    matplotlib = require("matplotlib", "the figures")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    for label, h in histories.items():
        ax_loss.plot(h.steps, h.loss, label=label, alpha=0.8)
        ax_metric.plot(range(1, len(h.epoch_metric) + 1), h.epoch_metric, marker="o", label=label)
    ax_loss.set(xlabel="step", ylabel="training loss", title=title or "training loss")
    metric = next(iter(histories.values())).metric_name if histories else "metric"
    ax_metric.set(xlabel="epoch", ylabel=f"test {metric}", title=f"test {metric} per epoch")
    ax_loss.legend()
    ax_metric.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
