"""``eval``, ``switch``, ``fuse``, ``inspect`` and ``orthogonality`` on any adapter folder.

A folder written by ``shirakit train``, by PEFT or by another tool that writes PEFT's files. The
base model is ``--model``, else the one ``shirakit train`` recorded, else the config's
``base_model_name_or_path`` when it is a local folder or a packaged model's hub id. The task
follows the config's ``task_type``: SEQ_CLS loads a sequence classifier (its head size read from
the adapter's saved head), anything else a causal LM.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from .common import (
    TRAINING_FILE,
    UsageError,
    check_adapter_dir,
    check_file_out,
    check_model_dir,
    check_out_dir,
    positive_int,
    training_record,
)
from .models import DEVICES, DTYPES, find_base


def _base_flags(p) -> None:
    p.add_argument("--model", metavar="PATH", help="base model folder (default: the one the adapter records)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="auto: a CUDA GPU, else MPS, else the CPU")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: bfloat16 on a GPU that has it, else float32")


def register(sub) -> None:
    p = sub.add_parser("eval", help="perplexity (causal LM) or accuracy (classifier) of an adapter, vs its base")
    p.add_argument("adapter", help="adapter folder")
    _base_flags(p)
    p.add_argument("--data", metavar="PATH", help="evaluation data, all of it (default: the held-out data of the "
                   "adapter's training run)")
    p.add_argument("--task", choices=("causal-lm", "sft", "classification"),
                   help="default: the training run's, else from the adapter config's task_type")
    for column, default in (("text", "text"), ("label", "label"), ("messages", "messages")):
        p.add_argument(f"--{column}-column", help=f"default: the training run's, else {default!r}")
    p.add_argument("--seq-len", type=positive_int, help="default: the training run's, else 128")
    p.add_argument("--eval-rows", type=positive_int, help="use at most this many prepared rows")
    p.add_argument("--batch-size", type=positive_int, default=8, help="rows per forward pass")
    p.add_argument("--lm-eval", metavar="TASKS", help="run these lm-evaluation-harness tasks (comma-separated) "
                   "on the adapted model instead, with lm-eval's HF model wrapper (pip install \"shirakit[eval]\")")
    p.add_argument("--include-path", metavar="DIR", action="append",
                   help="with --lm-eval: a folder of your own task YAML files (repeatable)")
    p.add_argument("--limit", type=float, help="with --lm-eval: at most this many documents per task "
                   "(below 1: that fraction of them)")
    p.add_argument("--num-fewshot", type=int, help="with --lm-eval: few-shot examples (default: each task's own)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("switch", help="load adapters and time fused-mode switching among them")
    p.add_argument("adapters", nargs="+", help="adapter folders (one base model)")
    _base_flags(p)
    p.add_argument("--repeats", type=positive_int, default=10, help="rounds over all the adapters")
    p.set_defaults(func=cmd_switch)

    p = sub.add_parser("fuse", help="combine adapters into one (weighted sum of their deltas)")
    p.add_argument("adapters", nargs="+", help="adapter folders, all of one method")
    _base_flags(p)
    p.add_argument("--weights", type=float, nargs="+", help="one per adapter (default: all 1.0)")
    p.add_argument("--modules-from", type=int, metavar="INDEX", help="0-based index of the adapter whose "
                   "modules_to_save (e.g. a classification head) the fused adapter keeps; needed when they differ")
    p.add_argument("--out", required=True, help="folder for the fused adapter")
    p.add_argument("--overwrite", action="store_true", help="replace an adapter already in --out")
    p.add_argument("--compact", action="store_true", help="write SHiRA in the compact layout (shirakit only)")
    p.set_defaults(func=cmd_fuse)

    p = sub.add_parser("inspect", help="an adapter folder's config, layers, value counts, size, format")
    p.add_argument("adapter")
    p.add_argument("--layers", action="store_true", help="list every targeted layer by name with its value count")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("orthogonality", help="AWOM/AWOR per layer of two adapters, and a PNG heatmap")
    p.add_argument("adapter_a")
    p.add_argument("adapter_b")
    p.add_argument("--png", default="orthogonality.png", help="heatmap file (its folder must exist)")
    p.set_defaults(func=cmd_orthogonality)


# ---- the base model of adapter folders ---------------------------------------------------------------
def _head_size(directory: Path) -> int | None:
    """Rows of the saved classification head (a modules_to_save copy named classifier/score), if any."""
    from ..io.checkpoint import PREFIX, read_weights

    _, tensors, _ = read_weights(directory)
    for key, tensor in tensors.items():
        name = key.removeprefix(PREFIX).replace(".modules_to_save", "")
        if name.endswith(("classifier.weight", "score.weight", "classifier.out_proj.weight")) and tensor.dim() == 2:
            return tensor.shape[0]
    return None


def _task_of(directory: Path) -> str:
    from .. import methods  # noqa: F401  (registers the methods read_config needs)
    from ..io.config_file import read_config

    record = training_record(directory) or {}
    if record.get("task"):
        return record["task"]
    return "classification" if read_config(directory).task_type == "SEQ_CLS" else "causal-lm"


def _base_model(directories: list[Path], args):
    """(model on its device, tokenizer, task, class labels or None) for the adapters' base."""
    from .models import find_base, load_model, load_tokenizer, resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    folder = find_base(directories[0], args.model)
    task = getattr(args, "task", None) or _task_of(directories[0])
    labels = (training_record(directories[0]) or {}).get("labels")
    if task == "classification" and not labels:
        size = _head_size(directories[0])
        if size is None:
            raise UsageError(f"{directories[0]}: a classification adapter without a saved head (modules_to_save)")
        labels = [str(i) for i in range(size)]
    tokenizer = load_tokenizer(folder)
    model = load_model(folder, task, dtype, labels, tokenizer.pad_token_id).to(device)
    return model, tokenizer, task, labels, device


# ---- eval -----------------------------------------------------------------------------------------------
def _eval_settings(args, record: dict, task: str) -> argparse.Namespace:
    """The training run's data settings (if any) with this command's flags on top."""
    settings = {"preset": None, "data": None, "eval_data": None, "eval_split": 0.1, "seed": 0, "train_rows": None,
                "eval_rows": None, "text_column": "text", "label_column": "label", "messages_column": "messages",
                "seq_len": 128}
    settings.update({k: v for k, v in record.items() if k in settings})
    settings["task"] = task
    for key in ("text_column", "label_column", "messages_column", "seq_len", "eval_rows"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.data:  # all of it is evaluation data
        settings.update(data=args.data, eval_data=args.data, preset=None)
    return argparse.Namespace(**settings)


def cmd_eval(args) -> None:
    if args.lm_eval:
        return cmd_lm_eval(args)
    for flag in ("include_path", "limit", "num_fewshot"):
        if getattr(args, flag) is not None:
            raise UsageError(f"--{flag.replace('_', '-')} goes with --lm-eval TASKS")
    import shirakit

    from ..app import user_training
    from ..app.user_data import DataError, check_source
    from .train_run import load_data

    directory = check_adapter_dir(args.adapter)
    if args.model:
        check_model_dir(args.model)
    if args.data:
        try:
            check_source(args.data)
        except DataError as exc:
            raise UsageError(f"--data {exc}") from None
    record = training_record(directory) or {}
    if not args.data and not (record.get("data") or record.get("preset")):
        raise UsageError(f"{directory}: no record of its training data ({TRAINING_FILE}); pass --data PATH")
    model, tokenizer, task, labels, device = _base_model([directory], args)
    settings = _eval_settings(args, record, task)
    _, rows, labels = load_data(settings, tokenizer, labels if record.get("labels") else None)
    metric, pad = user_training.metric_name(task), tokenizer.pad_token_id
    print(f"{len(rows)} evaluation rows from {settings.eval_data or settings.data or 'preset ' + settings.preset}")
    if task != "classification":  # a fresh classification head makes the base's accuracy meaningless
        print(f"base     {metric} {user_training.evaluate(model, rows, task, pad, device, args.batch_size):.4g}")
    shirakit.load_adapter(model, directory)
    print(f"adapter  {metric} {user_training.evaluate(model, rows, task, pad, device, args.batch_size):.4g}")


def cmd_lm_eval(args) -> None:
    """``eval ADAPTER --lm-eval TASKS``: lm-evaluation-harness on the adapted model, in process."""
    import shirakit

    from ..integrations import lmeval

    lmeval.require_lm_eval()  # a missing extra: one line naming it, exit 2 (cli/__init__.py)
    directory = check_adapter_dir(args.adapter)
    if args.model:
        check_model_dir(args.model)
    ignored = [f for f in ("data", "task", "text_column", "label_column", "messages_column", "seq_len", "eval_rows")
               if getattr(args, f) is not None]
    if ignored:
        raise UsageError(f"--{ignored[0].replace('_', '-')} does not apply to --lm-eval (the tasks bring their data)")
    tasks = [t.strip() for t in args.lm_eval.split(",")]
    if not all(tasks):
        raise UsageError(f"--lm-eval {args.lm_eval!r}: expected comma-separated task names")
    for path in args.include_path or ():
        if not Path(path).exists():
            raise UsageError(f"--include-path {path}: no such file or folder")
    if args.limit is not None and (args.limit <= 0 or (args.limit >= 1 and args.limit != int(args.limit))):
        raise UsageError(f"--limit {args.limit:g}: expected a document count >= 1 or a fraction in (0, 1)")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UsageError(f"--num-fewshot {args.num_fewshot}: expected 0 or more")
    if _task_of(directory) == "classification":
        raise UsageError(f"{directory}: a classification adapter; --lm-eval evaluates causal LMs")
    args.task = "causal-lm"
    model, tokenizer, _, _, device = _base_model([directory], args)
    shirakit.load_adapter(model, directory)
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    try:
        results = lmeval.evaluate(model, tokenizer, tasks, include_path=args.include_path, limit=limit,
                                  num_fewshot=args.num_fewshot, batch_size=args.batch_size, device=str(device))
    except (KeyError, ValueError, FileNotFoundError) as exc:
        raise UsageError(f"--lm-eval: {exc}") from None
    print(f"lm-eval on {directory} (base {find_base(directory, args.model)})")
    print(lmeval.results_table(results))


# ---- switch / fuse --------------------------------------------------------------------------------------
def _load_all(directories: list[Path], args):
    import shirakit

    model = _base_model(directories, args)[0]
    names = [f"a{i}" for i in range(len(directories))]
    for name, directory in zip(names, directories):
        shirakit.load_adapter(model, directory, name)
    return model, names


def cmd_switch(args) -> None:
    from ..model.switch import switch_adapter

    directories = [check_adapter_dir(d) for d in args.adapters]
    if args.model:
        check_model_dir(args.model)
    start = time.perf_counter()
    model, names = _load_all(directories, args)
    print(f"base model and {len(names)} adapter(s) loaded in {time.perf_counter() - start:.1f} s")
    times = []
    for i in range(args.repeats * len(names)):
        t = time.perf_counter()
        switch_adapter(model, names[i % len(names)])
        times.append(1e3 * (time.perf_counter() - t))
    switch_adapter(model, None)
    warm = times[len(names):] or times
    print(f"fused-mode switch: median {statistics.median(warm):.2f} ms over {len(warm)} warm switches "
          f"(first round, which reads base values: {', '.join(f'{t:.2f}' for t in times[:len(names)])} ms)")


def cmd_fuse(args) -> None:
    import shirakit

    from ..model.fusion import combine_adapters

    directories = [check_adapter_dir(d) for d in args.adapters]
    check_out_dir(args.out, overwrite=args.overwrite)
    if args.model:
        check_model_dir(args.model)
    weights = args.weights or [1.0] * len(directories)
    if len(weights) != len(directories):
        raise UsageError(f"--weights: expected one weight per adapter ({len(directories)}), found {len(weights)}")
    if args.modules_from is not None and not 0 <= args.modules_from < len(directories):
        raise UsageError(f"--modules-from {args.modules_from}: expected an index from 0 to {len(directories) - 1}")
    model, names = _load_all(directories, args)
    keep = names[args.modules_from] if args.modules_from is not None else None
    try:
        combine_adapters(model, names, weights, "fused", modules_from=keep)
    except ValueError as exc:  # the library's words, in the command's terms: folders, not internal names
        message = str(exc).replace("modules_from=", "--modules-from INDEX of")
        for name, directory in zip(names, directories):
            message = message.replace(repr(name), str(directory))
        raise UsageError(message) from None
    shirakit.save_adapter(model, args.out, "fused", compact=args.compact)
    record = training_record(directories[0]) or {}
    fused = {**record, "fused_from": [str(d) for d in directories], "weights": weights,
             "modules_from": str(directories[args.modules_from]) if keep else None}
    from ..io.atomic import atomic_write_bytes

    atomic_write_bytes(Path(args.out) / TRAINING_FILE, (json.dumps(fused, indent=2) + "\n").encode())
    print(f"fused adapter written to {args.out}/")


# ---- inspect / orthogonality ----------------------------------------------------------------------------
def layer_values(tensors: dict) -> tuple[dict[str, int], int]:
    """Trained values per targeted layer (by module name), and the values shared across layers."""
    from ..io.checkpoint import PREFIX

    layers: dict[str, int] = {}
    shared = 0
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            shared += tensor.numel()
            continue
        module = key[len(PREFIX):].rpartition(".")[0]
        if tensor.is_floating_point():
            module = module.removesuffix(".lora_A").removesuffix(".lora_B")
            layers[module] = layers.get(module, 0) + tensor.numel()
    return layers, shared


def cmd_inspect(args) -> None:
    from .. import methods  # noqa: F401  (registers the methods read_config needs)
    from ..io.checkpoint import FORMAT_KEY, WEIGHTS_NAME, read_weights
    from ..io.config_file import read_config

    directory = check_adapter_dir(args.adapter)
    config = read_config(directory)
    _, tensors, metadata = read_weights(directory)
    layers, shared = layer_values(tensors)
    saved = [n for n in layers if any(n == m or n.endswith("." + m) for m in config.modules_to_save or [])]
    values = sum(layers.values())
    size = (directory / WEIGHTS_NAME).stat().st_size
    with open(directory / WEIGHTS_NAME, "rb") as fh:  # safetensors: 8-byte header length, JSON header, data
        data_bytes = size - 8 - int.from_bytes(fh.read(8), "little")
    print(f"adapter      {directory}")
    print(f"method       {config.peft_type}   format {metadata.get(FORMAT_KEY, 'peft')}")
    print(f"base model   {config.base_model_name_or_path}")
    fields = {k: v for k, v in config.to_dict().items()
              if v not in (None, [], {}) and k not in ("peft_type", "base_model_name_or_path")}
    print("config       " + ", ".join(f"{k}={v}" for k, v in sorted(fields.items())))
    adapted = len(layers) - len(saved)
    extra = [f"+ {len(saved)} saved whole"] if saved else []
    extra += [f"+ {shared:,} shared values"] if shared else []
    print(f"layers       {adapted}" + (f" ({'; '.join(extra)})" if extra else ""))
    print(f"values       {values:,}")
    print(f"file size    {size:,} bytes; tensor data {data_bytes / max(values, 1):.2f} bytes per value")
    if args.layers:
        width = max(map(len, layers), default=0)
        for name, count in layers.items():
            print(f"  {name.ljust(width)}  {count:>12,}" + ("  (saved whole)" if name in saved else ""))


def cmd_orthogonality(args) -> None:
    from ..app.figures import heatmap
    from ..io.deltas import deltas_from_dir
    from ..model.metrics import align_shapes, pairwise

    a, b = check_adapter_dir(args.adapter_a), check_adapter_dir(args.adapter_b)
    png = check_file_out(args.png, "--png")
    d1, note1 = deltas_from_dir(a)
    d2, note2 = deltas_from_dir(b)
    align_shapes(d1, d2)
    rows = pairwise(d1, d2)
    width = max(len(r.layer) for r in rows)
    print(f"{'layer'.ljust(width)}  {'AWOM':>12}  {'AWOR':>8}")
    for r in rows:
        print(f"{r.layer.ljust(width)}  {r.awom:12.4e}  {r.awor:8.5f}")
    print(f"{'mean'.ljust(width)}  {statistics.mean(r.awom for r in rows):12.4e}  "
          f"{statistics.mean(r.awor for r in rows):8.5f}")
    if note1 or note2:
        print(f"({note1 or note2})")
    heatmap(rows, png, f"AWOR per layer: {a.name} vs {b.name}")
    print(f"heatmap written to {png}")
