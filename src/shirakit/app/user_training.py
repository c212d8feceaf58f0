"""Train and evaluate an adapter on prepared rows (see :mod:`shirakit.app.user_data`) on any device.

Rows are ``{"input_ids": [...], "labels": [...] or int}``. A batch pads ``input_ids`` on the right
with the tokenizer's pad id (attention mask 0 there) and token labels with -100, so padding never
counts in the loss. Causal LM and SFT: the model's own shifted next-token loss; the metric is
perplexity = exp(mean loss over every labelled token of the evaluation set). Classification:
cross-entropy over the logits; the metric is accuracy.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .training import History, training_loop
from .user_data import IGNORE_INDEX

LM_TASKS = ("causal-lm", "sft")


def collate(rows: list[dict], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded tensors on ``device``: input_ids, attention_mask, labels."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    token_labels = isinstance(rows[0]["labels"], list)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long) if token_labels else None
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[i, :n] = torch.tensor(row["input_ids"])
        mask[i, :n] = 1
        if token_labels:
            labels[i, :n] = torch.tensor(row["labels"])
    if not token_labels:
        labels = torch.tensor([r["labels"] for r in rows], dtype=torch.long)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def _rows(table) -> list[dict]:
    return [{"input_ids": ids, "labels": labels} for ids, labels in zip(table["input_ids"], table["labels"])]


def loss_of(model: nn.Module, batch: dict, task: str) -> torch.Tensor:
    if task in LM_TASKS:
        return model(**batch).loss
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return nn.functional.cross_entropy(logits.float(), batch["labels"])


@torch.no_grad()
def evaluate(model: nn.Module, table, task: str, pad_id: int, device: torch.device, batch_size: int) -> float:
    """Perplexity (causal-lm, sft) or accuracy (classification) on the prepared ``table``."""
    was_training = model.training
    model.eval()
    rows = _rows(table)
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start : start + batch_size], pad_id, device)
        if task in LM_TASKS:
            tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # a label is predicted from the token before
            total += model(**batch).loss.float().item() * tokens
            count += tokens
        else:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            total += int((logits.argmax(-1) == batch["labels"]).sum())
            count += len(batch["labels"])
    model.train(was_training)
    if count == 0:
        raise ValueError("the evaluation data has no labelled token")
    return math.exp(total / count) if task in LM_TASKS else total / count


def metric_name(task: str) -> str:
    return "perplexity" if task in LM_TASKS else "accuracy"


def fit(model: nn.Module, train_table, eval_table, *, task: str, pad_id: int, device: torch.device, lr: float,
        epochs: int, max_steps: int | None, batch_size: int, grad_accum: int, seed: int, progress: bool = True,
        on_epoch=None, history: History | None = None) -> History:
    """Train the model's active adapter on ``train_table``; evaluate on ``eval_table`` after each epoch.

    Batches are drawn in a fresh seeded order each epoch; a resumed run (``history`` given) seeds
    its order with the steps already done, so it does not replay the first batches.
    """
    rows = _rows(train_table)
    generator = torch.Generator().manual_seed(seed + (history.steps[-1] if history and history.steps else 0))

    def epoch_batches():
        order = torch.randperm(len(rows), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            yield collate([rows[i] for i in order[start : start + batch_size]], pad_id, device)

    return training_loop(model, epoch_batches, lambda batch: loss_of(model, batch, task),
                  lambda: evaluate(model, eval_table, task, pad_id, device, batch_size),
                  lr=lr, epochs=epochs, micro_batches=math.ceil(len(rows) / batch_size), max_steps=max_steps,
                  desc=f"train {task}", metric_name=metric_name(task), progress=progress, grad_accum=grad_accum,
                  on_epoch=on_epoch, history=history)
