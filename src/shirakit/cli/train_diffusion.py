"""``shirakit train --task text-to-image``: a style or subject adapter on a local diffusers pipeline from a folder of
images (the loop: :func:`shirakit.app.diffusion.train`).

    shirakit train --task text-to-image --model PIPELINE_DIR --data IMAGES_DIR --prompt "a photo in sks style"

``--out`` gets ``adapter/`` (the pipeline layout: ``unet/``, ... one PEFT folder per component; rewritten whole after
each epoch), ``samples/epoch-<k>.png`` after each epoch and ``shirakit_training.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..core.extras import require
from .common import TRAINING_FILE, UsageError, check_out_dir

PIPELINE_FILE = "model_index.json"  # what diffusers' save_pretrained writes at a pipeline's root


def validate(args) -> None:
    """Everything checkable before the pipeline loads."""
    check_out_dir(args.out, overwrite=args.overwrite)
    missing = [flag for flag, value in (("--model", args.model), ("--data", args.data)) if value is None]
    if missing:
        raise UsageError(f"{', '.join(missing)} required for --task text-to-image")
    if not (Path(args.model) / PIPELINE_FILE).is_file():
        raise UsageError(f"--model {args.model}: expected a diffusers pipeline folder holding {PIPELINE_FILE}")
    if not Path(args.data).is_dir():
        raise UsageError(f"--data {args.data}: expected a folder of images for --task text-to-image")
    if args.class_data is not None and not Path(args.class_data).is_dir():
        raise UsageError(f"--class-data {args.class_data}: expected a folder of images")
    if args.mask != "random":
        raise UsageError("--mask: only random masks for --task text-to-image")
    for flag in ("resume", "preset", "eval_data"):
        if getattr(args, flag, None):
            raise UsageError(f"--{flag.replace('_', '-')}: not for --task text-to-image")
    from .models import resolve_device

    args.device_obj = resolve_device(args.device)


def _config(args):
    from ..app.training import adapter_config

    targets = args.targets[0] if len(args.targets) == 1 and args.targets[0] == "all-linear" else args.targets
    return adapter_config(args.method, args.r, targets, mask=getattr(args, "mask", None) or "random", seed=args.seed)


def train(args) -> None:
    validate(args)  # before torch and diffusers load
    import torch

    DiffusionPipeline = require("diffusers", "shirakit train --task text-to-image").DiffusionPipeline

    from ..app.diffusion import train as train_adapter
    from ..integrations import diffusers as sd
    from ..io.atomic import atomic_write_bytes

    torch.manual_seed(args.seed)
    pipe = DiffusionPipeline.from_pretrained(args.model, local_files_only=True).to(args.device_obj)
    pipe.set_progress_bar_config(disable=True)
    out = Path(args.out)
    print(f"pipeline {type(pipe).__name__} from {args.model}; denoiser {sd.denoiser_name(pipe)}")

    def save(history, finished: bool) -> None:
        sd.save_adapter(pipe, out / "adapter", "default")
        record = {"task": "text-to-image", "method": args.method, "r": args.r, "model": str(Path(args.model).resolve()),
                  "data": str(Path(args.data).resolve()), "prompt": args.prompt, "steps": len(history.losses),
                  "loss": history.losses, "epoch_loss": history.epoch_loss, "samples": history.samples,
                  "seconds": round(history.seconds, 2), "finished": finished,
                  "saved_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        atomic_write_bytes(out / TRAINING_FILE, (json.dumps(record, indent=2) + "\n").encode())

    history = train_adapter(
        pipe, args.data, prompt=args.prompt, adapter=_config(args), epochs=args.epochs, max_steps=args.max_steps,
        batch_size=args.batch_size, lr=args.lr, class_images=args.class_data, class_prompt=args.class_prompt,
        prior_loss_weight=args.prior_loss_weight, gradient_checkpointing=not args.no_gradient_checkpointing,
        mixed_precision=args.mixed_precision, samples_dir=None if args.samples == 0 else out / "samples",
        n_samples=max(args.samples, 1), sample_steps=args.sample_steps, seed=args.seed, progress=not args.quiet,
        on_epoch=lambda h: save(h, finished=False))
    save(history, finished=True)
    print(f"loss {history.losses[0]:.4f} -> {history.losses[-1]:.4f} after {len(history.losses)} steps "
          f"({history.seconds:.0f} s); adapter/, samples/ and {TRAINING_FILE} written to {args.out}/")
