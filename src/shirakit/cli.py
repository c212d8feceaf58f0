"""The shirakit command: train, eval, switch, fuse, inspect, orthogonality, bench, demo.

Every subcommand has ``--help``. Errors are one clear line on stderr (exit status 2), not a
traceback; ``SHIRAKIT_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

TRAINING_FILE = "shirakit_training.json"


# ---- train / eval -------------------------------------------------------------------------------
def _classification_task(name: str, seed: int, test_size: int, train_size: int | None):
    from . import data, train

    return train.Task(data.TASKS[name](test_size=test_size, train_size=train_size, seed=seed), 0)


def cmd_train(args) -> None:
    import torch

    import shirakit

    from . import data, train

    torch.manual_seed(args.seed)
    out = Path(args.out)
    if args.task == "shakespeare":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = data.smollm2_dir()
        model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
        text = data.shakespeare_text()
        split = int(len(text) * 0.9)
        blocks = train.lm_blocks(tokenizer, text[:split], args.seq_len, args.train_blocks, args.seed)
        test = train.lm_blocks(tokenizer, text[split:], args.seq_len, args.test_blocks, args.seed)
        before = train.perplexity(model, test)
        shirakit.inject(model, train.adapter_config(args.method, args.r, train.DECODER_TARGETS, mask=args.mask,
                                                    seed=args.seed))
        shirakit.print_trainable_parameters(model)
        history = train.train_causal_lm(model, blocks, test, lr=args.lr, epochs=args.epochs,
                                        batch_size=args.batch_size, max_steps=args.max_steps, seed=args.seed)
        summary = {"perplexity_before": before, "perplexity_after": history.epoch_metric[-1]}
        print(f"perplexity on held-out Shakespeare: {before:.2f} -> {history.epoch_metric[-1]:.2f}")
    else:
        task = _classification_task(args.task, args.seed, args.test_size, args.train_size)
        model, tokenizer = train.load_classifier(len(task.data.labels), seed=args.seed)
        shirakit.inject(model, train.adapter_config(args.method, args.r, train.ENCODER_TARGETS, ["classifier"],
                                                    mask=args.mask, seed=args.seed))
        shirakit.print_trainable_parameters(model)
        history = train.train_classifier(model, tokenizer, task, lr=args.lr, epochs=args.epochs,
                                         batch_size=args.batch_size, seq_len=args.seq_len, max_steps=args.max_steps,
                                         seed=args.seed)
        summary = {"accuracy": history.epoch_metric[-1], "labels": task.data.labels}
        print(f"test accuracy: {history.epoch_metric[-1]:.3f}")
    shirakit.save_adapter(model, out)
    train.plot_history({args.method: history}, out / "training_curves.png", f"{args.method} on {args.task}")
    record = {**vars(args), **summary, "epoch_loss": history.epoch_loss, "epoch_metric": history.epoch_metric,
              "seconds": history.seconds}
    record.pop("func", None)
    (out / TRAINING_FILE).write_text(json.dumps(record, indent=2) + "\n")
    print(f"adapter, curves and {TRAINING_FILE} written to {out}/ ({history.seconds:.0f} s of training)")


def _training_record(directory: Path) -> dict:
    path = directory / TRAINING_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; eval needs an adapter made by `shirakit train`")
    return json.loads(path.read_text())


def cmd_eval(args) -> None:
    import shirakit

    from . import data, train

    directory = Path(args.adapter)
    record = _training_record(directory)
    if record["task"] == "shakespeare":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = data.smollm2_dir()
        model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
        text = data.shakespeare_text()
        test = train.lm_blocks(tokenizer, text[int(len(text) * 0.9):], record["seq_len"], record["test_blocks"],
                               record["seed"])
        print(f"base perplexity {train.perplexity(model, test):.2f}")
        shirakit.load_adapter(model, directory)
        print(f"adapter perplexity {train.perplexity(model, test):.2f}")
        return
    task = _classification_task(record["task"], record["seed"], record["test_size"], record["train_size"])
    model, tokenizer = train.load_classifier(len(task.data.labels), seed=record["seed"])
    shirakit.load_adapter(model, directory)
    print(f"{record['task']}: test accuracy {train.accuracy(model, tokenizer, task, record['seq_len']):.3f}")


# ---- switch / fuse / inspect / orthogonality -------------------------------------------------------
def _model_for(directories: list[Path]):
    """The packaged base model the adapters were trained on (read from their training record)."""
    from transformers import AutoModelForCausalLM

    from . import data, train

    record = _training_record(directories[0])
    if record["task"] == "shakespeare":
        return AutoModelForCausalLM.from_pretrained(data.smollm2_dir())
    labels = len(record["labels"])
    return train.load_classifier(labels, seed=record["seed"])[0]


def cmd_switch(args) -> None:
    import shirakit
    from shirakit.switching import switch_adapter

    directories = [Path(d) for d in args.adapters]
    model = _model_for(directories)
    names = [f"a{i}" for i in range(len(directories))]
    start = time.perf_counter()
    for name, directory in zip(names, directories):
        shirakit.load_adapter(model, directory, name)
    print(f"loaded {len(names)} adapters in {1e3 * (time.perf_counter() - start):.1f} ms")
    times = []
    for i in range(args.repeats * len(names)):
        t = time.perf_counter()
        switch_adapter(model, names[i % len(names)])
        times.append(1e3 * (time.perf_counter() - t))
    switch_adapter(model, None)
    print(f"fused-mode switch: median {statistics.median(times):.2f} ms over {len(times)} switches "
          f"(first {times[0]:.2f} ms)")


def cmd_fuse(args) -> None:
    import shirakit
    from shirakit.fusion import combine_adapters

    directories = [Path(d) for d in args.adapters]
    weights = args.weights or [1.0] * len(directories)
    model = _model_for(directories)
    names = [f"a{i}" for i in range(len(directories))]
    for name, directory in zip(names, directories):
        shirakit.load_adapter(model, directory, name)
    combine_adapters(model, names, weights, "fused")
    shirakit.save_adapter(model, args.out, "fused", compact=args.compact)
    record = _training_record(directories[0])
    Path(args.out, TRAINING_FILE).write_text(json.dumps({**record, "fused_from": [str(d) for d in directories],
                                                         "weights": weights}, indent=2) + "\n")
    print(f"fused adapter written to {args.out}/")


def cmd_inspect(args) -> None:
    from .checkpoint import PREFIX, WEIGHTS_NAME, read_weights
    from .compact import FORMAT_KEY
    from .config import read_config

    directory = Path(args.adapter)
    config = read_config(directory)
    path, tensors, metadata = read_weights(directory)
    layers: dict[str, int] = {}
    shared = 0
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            shared += tensor.numel()
            continue
        module, _, leaf = key[len(PREFIX):].rpartition(".")
        if tensor.is_floating_point():
            module = module.removesuffix(".lora_A").removesuffix(".lora_B")
            layers[module] = layers.get(module, 0) + tensor.numel()
    values = sum(layers.values())
    size = (directory / WEIGHTS_NAME).stat().st_size
    with open(directory / WEIGHTS_NAME, "rb") as fh:  # safetensors: 8-byte header length, JSON header, data
        data_bytes = size - 8 - int.from_bytes(fh.read(8), "little")
    print(f"adapter      {directory}")
    print(f"method       {config.peft_type}   format {metadata.get(FORMAT_KEY, 'peft')}")
    fields = {k: v for k, v in config.to_dict().items() if v not in (None, [], {}) and k != "peft_type"}
    print("config       " + ", ".join(f"{k}={v}" for k, v in sorted(fields.items())))
    print(f"layers       {len(layers)} (+ {shared:,} shared values)" if shared else f"layers       {len(layers)}")
    print(f"values       {values:,}")
    print(f"file size    {size:,} bytes; tensor data {data_bytes / max(values, 1):.2f} bytes per value")
    if args.layers:
        for name, count in layers.items():
            print(f"  {name}: {count:,}")


def cmd_orthogonality(args) -> None:
    from .metrics import align_shapes, deltas_from_dir, heatmap, pairwise

    d1, note1 = deltas_from_dir(args.adapter_a)
    d2, note2 = deltas_from_dir(args.adapter_b)
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
    heatmap(rows, args.png)
    print(f"heatmap written to {args.png}")


def cmd_bench(args) -> None:
    script = Path(__file__).resolve().parents[2] / "benchmarks" / f"{args.name}.py"
    if not script.is_file():
        raise FileNotFoundError(f"{script}: benchmarks run from a source checkout (pip install -e .)")
    sys.exit(subprocess.call([sys.executable, str(script), *args.rest]))


def cmd_demo(args) -> None:
    from . import demo

    demo.run(args.out, steps=args.steps, r=args.r, seq_len=args.seq_len, batch_size=args.batch_size,
             test_size=args.test_size, seed=args.seed)


# ---- argument parsing -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shirakit", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune a packaged model on packaged data, offline")
    p.add_argument("--task", choices=["bbc_news", "tweet_sentiment", "shakespeare"], default="bbc_news")
    p.add_argument("--method", choices=["shira", "lora", "vera", "miss"], default="shira")
    p.add_argument("--r", type=int, default=8, help="rank (SHiRA: K = r*(in+out) values per layer)")
    p.add_argument("--mask", default="random", help="SHiRA mask type")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-size", type=int, default=400)
    p.add_argument("--train-size", type=int, default=None, help="cap on training examples")
    p.add_argument("--train-blocks", type=int, default=256, help="causal LM: training blocks of seq-len tokens")
    p.add_argument("--test-blocks", type=int, default=32)
    p.add_argument("--out", default="out/adapter")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate an adapter made by `shirakit train`")
    p.add_argument("adapter")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("switch", help="load adapters and time fused-mode switching among them")
    p.add_argument("adapters", nargs="+")
    p.add_argument("--repeats", type=int, default=10)
    p.set_defaults(func=cmd_switch)

    p = sub.add_parser("fuse", help="combine adapters into one (weighted sum of their deltas)")
    p.add_argument("adapters", nargs="+")
    p.add_argument("--weights", type=float, nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--compact", action="store_true", help="write SHiRA in the compact layout")
    p.set_defaults(func=cmd_fuse)

    p = sub.add_parser("inspect", help="an adapter directory's config, layers, value counts, size, format")
    p.add_argument("adapter")
    p.add_argument("--layers", action="store_true", help="list every layer")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("orthogonality", help="AWOM/AWOR per layer of two adapters, and a PNG heatmap")
    p.add_argument("adapter_a")
    p.add_argument("adapter_b")
    p.add_argument("--png", default="orthogonality.png")
    p.set_defaults(func=cmd_orthogonality)

    p = sub.add_parser("bench", help="run a benchmark script: train_step, switch or mixed_batch")
    p.add_argument("name", choices=["train_step", "switch", "mixed_batch"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark (see its --help)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="SHiRA vs LoRA on two tasks: accuracy, switching, fusion, orthogonality")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--steps", type=int, default=80, help="training steps per adapter")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--test-size", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    from .serve.server import add_arguments  # the serve subcommand lives in shirakit.serve
    from .serve.server import main as serve_main

    p = sub.add_parser("serve", help="OpenAI-compatible server: one base model, many adapters (shirakit[serve])")
    add_arguments(p)
    p.set_defaults(func=serve_main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        args.func(args)
    except (ValueError, KeyError, TypeError, RuntimeError, FileNotFoundError, OSError) as exc:
        if os.environ.get("SHIRAKIT_DEBUG"):
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"shirakit: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
