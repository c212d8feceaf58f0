"""The body of ``shirakit train`` once its arguments are checked: data, model, adapter, loop, files.

Order: tokenizer, then the data (read, split, prepared; a data error still exits 2 with nothing
loaded), then the model. The adapter, its curves and ``shirakit_training.json`` are written to
``--out`` after every epoch, so an interrupted run keeps its last finished epoch.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from pathlib import Path

from .common import TRAINING_FILE, UsageError, training_record


def _prepare(table, tokenizer, args, labels, where: str):
    from ..app import user_data

    if args.task == "causal-lm":
        out = user_data.causal_lm(table, tokenizer, args.text_column, args.seq_len, where)
    elif args.task == "sft":
        out = user_data.sft(table, tokenizer, args.messages_column, args.seq_len, where)
    else:
        out = user_data.classification(table, tokenizer, args.text_column, args.label_column, labels, args.seq_len,
                                      where)
    return out


def _cap(table, rows: int | None, seed: int):
    return table.shuffle(seed=seed).select(range(rows)) if rows and rows < len(table) else table


def load_data(args, tokenizer, labels: list[str] | None = None):
    """(train rows, eval rows, class labels or None), prepared; any problem is a UsageError."""
    from ..app import data, user_data

    try:
        table = data.preset_table(args.preset) if args.data is None else user_data.load_table(args.data)
        where = args.data or f"preset {args.preset}"
        if args.eval_data:
            train_table, eval_table = table, user_data.load_table(args.eval_data)
        else:
            train_table, eval_table = user_data.split(table, args.eval_split, args.seed)
        if args.task == "classification" and labels is None:
            labels = user_data.label_names(train_table, args.label_column, where)
        train_rows = _prepare(train_table, tokenizer, args, labels, where)
        eval_rows = _prepare(eval_table, tokenizer, args, labels, args.eval_data or f"{where} (held-out part)")
    except user_data.DataError as exc:
        raise UsageError(str(exc)) from None
    return _cap(train_rows, args.train_rows, args.seed), _cap(eval_rows, args.eval_rows, args.seed), labels


def _adapter_config(args, base_name: str):
    from ..app import training

    targets = args.targets[0] if args.targets == ["all-linear"] else args.targets
    config = training.adapter_config(args.method, args.r, targets, mask=args.mask, seed=args.seed)
    task_type = "SEQ_CLS" if args.task == "classification" else "CAUSAL_LM"  # SEQ_CLS also trains the head
    return dataclasses.replace(config, task_type=task_type, base_model_name_or_path=base_name)


def _calibrated(model, config, train_rows, args, pad_id):
    """SHiRA's grad/snip masks from the first training batches (the base model's gradients)."""
    import shirakit

    from ..app import user_training

    rows = [{"input_ids": i, "labels": y} for i, y in zip(train_rows["input_ids"], train_rows["labels"])]
    batches = [user_training.collate(rows[s : s + args.batch_size], pad_id, args.device_obj)
               for s in range(0, len(rows), args.batch_size)][: args.calibration_batches]
    return shirakit.calibrate(model, config, batches, lambda m, b: user_training.loss_of(m, b, args.task),
                              max_batches=len(batches))


def _model_with_adapter(args, folder: Path, base_name: str, labels, train_rows, tokenizer):
    import shirakit

    from .models import load_model

    model = load_model(folder, args.task, args.dtype_obj, labels, tokenizer.pad_token_id).to(args.device_obj)
    if args.resume:
        return shirakit.load_adapter(model, args.resume, is_trainable=True)
    config = _adapter_config(args, base_name)
    if args.mask in ("grad", "snip"):
        config = _calibrated(model, config, train_rows, args, tokenizer.pad_token_id)
    return shirakit.inject(model, config)


def _check_resume(args) -> tuple[dict, object]:
    """The earlier run's record and History; refused when it was a different model, task or method."""
    from ..app.training import History

    record = training_record(Path(args.resume))
    for key in ("task", "method", "model", "preset", "data"):
        if record.get(key) != (getattr(args, key) if key != "model" else args.model_resolved):
            raise UsageError(f"--resume {args.resume}: that run has {key}={record.get(key)!r}, this one "
                             f"{getattr(args, key, None)!r}")
    history = History(metric_name=record["metric"], steps=record["steps"], loss=record["loss"],
                      epoch_loss=record["epoch_loss"], epoch_metric=record["epoch_metric"], seconds=record["seconds"])
    return record, history


def _record(args, labels, history, before: float, extra: dict) -> dict:
    import torch
    import transformers

    skip = {"func", "device_obj", "dtype_obj", "model_resolved", "overwrite", "config", "quiet"}
    settings = {k: v for k, v in vars(args).items() if k not in skip}
    return {
        **settings, "model": args.model_resolved, "labels": labels, "device_used": str(args.device_obj),
        "dtype_used": str(args.dtype_obj).removeprefix("torch."), "metric": history.metric_name,
        "metric_before": before, "metric_after": history.epoch_metric[-1] if history.epoch_metric else None,
        "epoch_loss": history.epoch_loss, "epoch_metric": history.epoch_metric, "steps": history.steps,
        "loss": history.loss, "seconds": history.seconds,
        "software": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "saved_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), **extra,
    }


def save_run(model, args, record: dict, history) -> None:
    import shirakit

    from ..app.training import plot_history
    from ..io.atomic import atomic_write_bytes

    out = Path(args.out)
    shirakit.save_adapter(model, out)
    title = f"{args.method} r={args.r} on {args.preset or Path(args.data).name} ({args.task})"
    plot_history({args.method: history}, out / "training_curves.png", title)
    atomic_write_bytes(out / TRAINING_FILE, (json.dumps(record, indent=2) + "\n").encode())


def train(args) -> None:
    import torch

    import shirakit

    from ..app import data, user_training
    from .models import load_tokenizer, packaged_name

    torch.manual_seed(args.seed)
    for key in ("data", "eval_data"):  # the record must find them again from any folder
        if getattr(args, key):
            setattr(args, key, str(Path(getattr(args, key)).resolve()))
    folder = Path(args.model) if args.model else data.preset_model(args.preset)
    args.model_resolved = str(folder.resolve())
    base_name = packaged_name(folder) or args.model_resolved  # a hub id, never a path inside the environment
    record, history = _check_resume(args) if args.resume else ({}, None)
    tokenizer = load_tokenizer(folder)
    train_rows, eval_rows, labels = load_data(args, tokenizer, record.get("labels"))
    print(f"data: {len(train_rows)} training rows, {len(eval_rows)} evaluation rows ({args.task}, "
          f"seq-len {args.seq_len}){'; labels ' + ', '.join(labels) if labels else ''}")
    model = _model_with_adapter(args, folder, base_name, labels, train_rows, tokenizer)
    shirakit.print_trainable_parameters(model)
    pad, device, metric = tokenizer.pad_token_id, args.device_obj, user_training.metric_name(args.task)
    before = record.get("metric_before")
    if before is None:
        before = user_training.evaluate(model, eval_rows, args.task, pad, device, args.batch_size)
    print(f"device {device}, dtype {str(args.dtype_obj).removeprefix('torch.')}; eval {metric} before: {before:.4g}")
    save = lambda h, **extra: save_run(model, args, _record(args, labels, h, before, extra), h)  # noqa: E731
    history = user_training.fit(model, train_rows, eval_rows, task=args.task, pad_id=pad, device=device, lr=args.lr,
                           epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                           grad_accum=args.grad_accum, seed=args.seed, progress=not args.quiet,
                           on_epoch=lambda h: save(h, finished=False), history=history)
    save(history, finished=True)
    print(f"eval {metric}: {before:.4g} -> {history.epoch_metric[-1]:.4g} after {history.steps[-1]} steps "
          f"({history.seconds:.0f} s of training)")
    print(f"adapter, training_curves.png and {TRAINING_FILE} written to {args.out}/")
