"""``shirakit train``: an adapter from a local Hugging Face model and a local dataset, in one command.

    shirakit train --model PATH --data FILE --task {causal-lm,sft,classification} --method shira ...
    shirakit train --config recipe.yaml [flags that override it]
    shirakit train --preset bbc_news          # the packaged tasks
    shirakit train --task text-to-image --model PIPELINE_DIR --data IMAGES_DIR --prompt "..."   # diffusers

Where a value comes from, weakest first: the flag's default, the preset, the recipe file, the
command line. Every argument is checked before the tokenizer, data or model load; then the data
is read and prepared (errors still exit 2); only then does the model load.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..core.extras import require
from ..core.registry import DEFAULT_METHOD
from .common import (
    TRAINING_FILE,
    UsageError,
    check_adapter_dir,
    check_model_dir,
    check_out_dir,
    eval_split,
    positive_float,
    positive_int,
    training_record,
)
from .models import DEVICES, DTYPES

TASKS = ("causal-lm", "sft", "classification", "text-to-image")
MASKS = ("random", "struct", "wm", "grad", "snip")
PRESETS = ("bbc_news", "tweet_sentiment", "shakespeare")


def register(sub) -> None:
    p = sub.add_parser("train", help="fine-tune an adapter: any local HF model and dataset, or a packaged preset",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--config", metavar="FILE", help="recipe file (.yaml, .yml or .json) holding these flags' values "
                   "by name (batch_size or batch-size); flags given here override it")
    p.add_argument("--preset", choices=PRESETS, help="a packaged model and dataset (sets model, data, task and "
                   "sizes; any flag overrides them)")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", metavar="PATH", help="local Hugging Face model folder (config.json, weights, tokenizer)")
    g.add_argument("--data", metavar="PATH", help="training data: .jsonl/.json, .csv, .parquet, .txt, a folder of "
                   "such files, or a folder saved by datasets' save_to_disk")
    g.add_argument("--task", choices=TASKS, help="causal-lm: next-token loss on a text column, packed in blocks; "
                   "sft: chat-template conversations, loss on assistant tokens; classification: text -> label; "
                   "text-to-image: a style/subject adapter on a diffusers pipeline folder from a folder of images")
    g.add_argument("--text-column", default="text", help="column of text (causal-lm, classification)")
    g.add_argument("--label-column", default="label", help="column of labels (classification)")
    g.add_argument("--messages-column", default="messages", help="column of [{role, content}, ...] (sft)")
    g.add_argument("--eval-data", metavar="PATH", help="evaluation data (same kinds as --data); default: --eval-split")
    g.add_argument("--eval-split", type=eval_split, default=0.1,
                   help="held out of --data when there is no --eval-data: a fraction, or a row count")
    g.add_argument("--train-rows", type=positive_int, help="use at most this many prepared training rows")
    g.add_argument("--eval-rows", type=positive_int, help="use at most this many prepared evaluation rows")
    g = p.add_argument_group("text-to-image (diffusers pipelines)")
    g.add_argument("--prompt", help="the prompt naming the style or subject (text-conditioned pipelines)")
    g.add_argument("--class-data", metavar="DIR", help="images of the class, for prior preservation")
    g.add_argument("--class-prompt", help="the class's prompt (with --class-data)")
    g.add_argument("--prior-loss-weight", type=positive_float, default=1.0)
    g.add_argument("--mixed-precision", choices=("auto", "no", "bf16", "fp16"), default="auto",
                   help="auto: bf16 autocast on a GPU that has it, none on the CPU")
    g.add_argument("--no-gradient-checkpointing", action="store_true")
    g.add_argument("--samples", type=int, default=4, help="sample images written per epoch (0: none)")
    g.add_argument("--sample-steps", type=positive_int, default=20, help="denoising steps of each sample")
    g = p.add_argument_group("adapter")
    g.add_argument("--method", default=DEFAULT_METHOD, metavar="NAME",
                   help=f"a registered adapter method (peft_type, any case; default {DEFAULT_METHOD})")
    g.add_argument("--targets", nargs="+", default=["all-linear"],
                   help="module names (exact or dotted suffix), one regex, or all-linear")
    g.add_argument("--r", type=positive_int, default=8, help="rank (SHiRA: K = r*(in+out) values per layer)")
    g.add_argument("--mask", choices=MASKS, default="random", help="SHiRA mask; grad and snip are calibrated "
                   "on the first --calibration-batches training batches")
    g.add_argument("--calibration-batches", type=positive_int, default=8)
    g = p.add_argument_group("training")
    g.add_argument("--lr", type=positive_float, default=3e-3)
    g.add_argument("--epochs", type=positive_int, default=1)
    g.add_argument("--max-steps", type=positive_int, help="optimizer steps in all; wins over --epochs (as many "
                   "epochs as it takes)")
    g.add_argument("--batch-size", type=positive_int, default=8)
    g.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--seq-len", type=positive_int, default=128, help="tokens per row (causal-lm: per packed block)")
    g.add_argument("--device", choices=DEVICES, default="auto", help="auto: a CUDA GPU, else MPS, else the CPU")
    g.add_argument("--dtype", choices=DTYPES, default="auto", help="base weights' dtype; auto: bfloat16 on a GPU "
                   "that has it, else float32")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("output")
    g.add_argument("--out", default="out/adapter", help="folder for the adapter, its training record and curves")
    g.add_argument("--overwrite", action="store_true", help="replace an adapter already in --out")
    g.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR (an earlier --out) up to "
                   "--max-steps / --epochs; the optimizer restarts")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


# ---- recipe files and presets: turned into flags placed before the command line's ----------------------
def _load_recipe(path: Path) -> dict:
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise UsageError(f"--config {path}: expected a .yaml, .yml or .json file")
    if not path.is_file():
        raise UsageError(f"--config {path}: no such file")
    if suffix != ".json":
        require("yaml", f"--config {path}")
    try:
        text = path.read_text()
        if suffix == ".json":
            recipe = json.loads(text)
        else:
            import yaml

            recipe = yaml.safe_load(text)
    except Exception as exc:  # OSError, json's ValueError, yaml.YAMLError: all mean "cannot use this file"
        raise UsageError(f"--config {path}: not readable {suffix[1:].upper()}: {str(exc).splitlines()[0]}") from None
    if recipe is None:
        return {}
    if not isinstance(recipe, dict):
        raise UsageError(f"--config {path}: expected a mapping of flag names to values, found {type(recipe).__name__}")
    return recipe


def _as_flags(values: dict, parser: argparse.ArgumentParser, source: str) -> list[str]:
    """``{"batch_size": 8, "targets": [...], "quiet": true}`` as ``--batch-size 8 --targets ... --quiet``."""
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    tokens: list[str] = []
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        action = actions.get(dest)
        if action is None or dest in ("config", "help"):
            known = sorted(d for d in actions if d not in ("config", "help"))
            raise UsageError(f"{source}: unknown field {key!r}; the fields are {', '.join(known)}")
        flag = action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise UsageError(f"{source}: field {key!r} expects true or false, found {value!r}")
            tokens += [flag] if value else []
        elif isinstance(value, list):
            if action.nargs != "+":
                raise UsageError(f"{source}: field {key!r} expects one value, found a list")
            tokens += [flag, *(str(v) for v in value)]
        elif value is not None:
            tokens += [flag, str(value)]
    return tokens


def expand(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """``train`` arguments with the preset's and the recipe's values turned into leading flags."""
    from ..app.data import PRESETS as PRESET_VALUES

    early = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    early.add_argument("--config")
    early.add_argument("--preset")
    known, _ = early.parse_known_args(argv)
    recipe = _load_recipe(Path(known.config)) if known.config else {}
    preset = known.preset or recipe.get("preset")
    if preset is not None and preset not in PRESET_VALUES:
        raise UsageError(f"--preset {preset!r}: expected one of {', '.join(PRESET_VALUES)}")
    front = _as_flags(PRESET_VALUES[preset], parser, f"preset {preset}") if preset else []
    return front + _as_flags(recipe, parser, f"--config {known.config}") + argv


def _check_method(name: str, mask: str) -> None:
    """--method names a registered method (the registry, not a list here); --mask needs one with masks."""
    from ..app.training import has_masks
    from ..core.registry import method_for_name

    try:
        method = method_for_name(name)
    except ValueError as exc:
        raise UsageError(f"--method {name!r}: {exc}") from None
    if mask != "random" and not has_masks(method.config_class):
        raise UsageError(f"--mask {mask}: --method {name} has no masks (a mask_type field)")


# ---- checks before anything loads -------------------------------------------------------------------------
def validate(args) -> None:
    """Every check that needs no model, tokenizer or data read; the output folder first."""
    from ..app.user_data import DataError, check_source

    resuming_in_place = args.resume and Path(args.resume).resolve() == Path(args.out).resolve()
    check_out_dir(args.out, overwrite=args.overwrite or resuming_in_place)
    if args.preset is None:
        missing = [flag for flag, value in (("--model", args.model), ("--data", args.data), ("--task", args.task))
                   if value is None]
        if missing:
            raise UsageError(f"{', '.join(missing)} required (or --preset {{{','.join(PRESETS)}}})")
        check_model_dir(args.model)
    elif args.model:
        check_model_dir(args.model)
    for flag, path in (("--data", args.data), ("--eval-data", args.eval_data)):
        if path is not None:
            try:
                check_source(path)
            except DataError as exc:
                raise UsageError(f"{flag} {exc}") from None
    _check_method(args.method, args.mask)
    if args.resume:
        check_adapter_dir(args.resume, "--resume")
        if training_record(Path(args.resume)) is None:
            raise UsageError(f"--resume {args.resume}: no {TRAINING_FILE} (only runs of shirakit train resume)")
    from .models import resolve_device, resolve_dtype

    args.device_obj = resolve_device(args.device)
    args.dtype_obj = resolve_dtype(args.dtype, args.device_obj)


def run(args) -> None:
    if args.task == "text-to-image":
        from . import train_diffusion

        train_diffusion.train(args)
        return
    validate(args)
    from . import train_run

    try:
        train_run.train(args)
    except KeyboardInterrupt:
        print("\ninterrupted: the last finished epoch is saved in --out", file=sys.stderr)
        raise
