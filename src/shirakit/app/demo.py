"""``shirakit demo``: the whole story on real packaged data in a few minutes on 2 CPU cores.

1. Train SHiRA and LoRA at equal trainable parameters (same r) on BBC News topics and on tweet
   sentiment, on one MiniLM (each task owns a slice of the classification head's outputs).
2. Switch among the four adapters in fused mode and time it.
3. Fuse each method's two task adapters and measure each task's accuracy alone vs fused
   (concept loss), SHiRA vs LoRA.
4. AWOM / AWOR of each pair; figures in the output directory.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from ..core.extras import require
from ..io.checkpoint import save_adapter
from ..model.control import set_adapter, trainable_parameters
from ..model.fusion import combine_adapters
from ..model.inject import inject
from ..model.metrics import adapter_orthogonality
from ..model.switch import switch_adapter
from . import data, training
from .figures import heatmap

METHODS = ("shira", "lora")


def _table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def _eval_with_head(model, tokenizer, task, body: str, head: str, seq_len: int) -> float:
    """Accuracy with adapter ``body`` in the layers and ``head``'s copy of the classifier."""
    set_adapter(model, body)
    model.classifier.set_active([head])
    return training.accuracy(model, tokenizer, task, seq_len)


def _time_switches(model, names: list[str], repeats: int) -> float:
    times = []
    for i in range(repeats * len(names)):
        start = time.perf_counter()
        switch_adapter(model, names[i % len(names)])
        times.append(time.perf_counter() - start)
    switch_adapter(model, None)
    return 1e3 * statistics.median(times[len(names):])  # the first round reads base values once


def run(out_dir: str | Path = "demo_out", steps: int = 80, r: int = 8, seq_len: int = 64, batch_size: int = 16,
        test_size: int = 300, seed: int = 0, lr: dict | None = None) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lr = lr or {"shira": 3e-3, "lora": 1e-3}
    torch.manual_seed(seed)
    bbc = data.bbc_news(test_size=test_size, seed=seed)
    tweets = data.tweet_sentiment(test_size=test_size, train_size=steps * batch_size, seed=seed)
    tasks = {"bbc": training.Task(bbc, 0), "tweets": training.Task(tweets, len(bbc.labels))}
    model, tokenizer = training.load_classifier(len(bbc.labels) + len(tweets.labels), seed=seed)
    print(f"MiniLM, {len(bbc.labels)} BBC topics + {len(tweets.labels)} tweet sentiments; "
          f"{steps} steps of {batch_size} x {seq_len} tokens per adapter, r={r}")

    results, histories = {}, {}
    for method in METHODS:
        for task_name, task in tasks.items():
            name = f"{method}-{task_name}"
            inject(model, training.adapter_config(method, r, training.ENCODER_TARGETS, ["classifier"], seed=seed),
                            name)
            trainable = trainable_parameters(model)[0]
            history = training.train_classifier(model, tokenizer, task, lr=lr[method], epochs=1, batch_size=batch_size,
                                             seq_len=seq_len, max_steps=steps, seed=seed)
            histories[name] = history
            results[name] = {"accuracy": history.epoch_metric[-1], "seconds": history.seconds, "trainable": trainable}
            save_adapter(model, out / "adapters" / name, name)
            print(f"  {name}: accuracy {history.epoch_metric[-1]:.3f} in {history.seconds:.0f} s")
    print("\nAccuracy at equal trainable parameters (adapter + head)")
    print(_table(["task", "method", "trainable", "test accuracy", "train s"],
                 [[t, m, results[f"{m}-{t}"]["trainable"], results[f"{m}-{t}"]["accuracy"],
                   f"{results[f'{m}-{t}']['seconds']:.0f}"] for t in tasks for m in METHODS]))
    training.plot_history(histories, out / "training_curves.png", "SHiRA vs LoRA")

    print("\nSwitching between the two task adapters in fused mode (median of warm switches)")
    switch_ms = {m: _time_switches(model, [f"{m}-{t}" for t in tasks], repeats=10) for m in METHODS}
    print(_table(["method", "switch ms"], [[m, f"{switch_ms[m]:.2f}"] for m in METHODS]))
    print(f"LoRA switch / SHiRA switch = {switch_ms['lora'] / switch_ms['shira']:.1f}x")

    print("\nFusion: each task's accuracy with its own adapter vs the two adapters fused (concept loss)")
    fusion_rows, fused = [], {}
    for method in METHODS:
        names = [f"{method}-{t}" for t in tasks]
        # each task keeps its own classifier head in the evaluation below (_eval_with_head), so which
        # head copy the fused adapter carries does not matter: keep the first task's
        combine_adapters(model, names, [1.0, 1.0], f"{method}-fused", modules_from=names[0])
        for task_name, task in tasks.items():
            alone = _eval_with_head(model, tokenizer, task, f"{method}-{task_name}", f"{method}-{task_name}", seq_len)
            both = _eval_with_head(model, tokenizer, task, f"{method}-fused", f"{method}-{task_name}", seq_len)
            fused[(method, task_name)] = (alone, both)
            fusion_rows.append([method, task_name, alone, both, alone - both])
    print(_table(["method", "task", "alone", "fused", "concept loss"], fusion_rows))

    print("\nOrthogonality of the two task adapters (SHiRA paper §4.2), mean over layers")
    ortho_rows = []
    for method in METHODS:
        rows = adapter_orthogonality(model, f"{method}-bbc", f"{method}-tweets")
        heatmap(rows, out / f"awor_{method}.png", f"AWOR, {method}: bbc vs tweets")
        ortho_rows.append([method, statistics.mean(r.awom for r in rows), statistics.mean(r.awor for r in rows)])
    print(_table(["method", "AWOM (lower = more orthogonal)", "AWOR (higher = more orthogonal)"], ortho_rows))
    _plot_concept_loss(fused, out / "concept_loss.png")
    print(f"\nfigures and adapters written to {out}/")
    return {"results": results, "switch_ms": switch_ms, "fusion": fused, "orthogonality": ortho_rows}


def _plot_concept_loss(fused: dict, path: Path) -> None:
    matplotlib = require("matplotlib", "the figures")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{m}\n{t}" for m, t in fused]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = torch.arange(len(labels)).numpy()
    ax.bar(x - 0.2, [v[0] for v in fused.values()], 0.4, label="alone")
    ax.bar(x + 0.2, [v[1] for v in fused.values()], 0.4, label="fused")
    ax.set_xticks(x, labels)
    ax.set(ylabel="test accuracy", title="Concept loss: each task alone vs both adapters fused", ylim=(0, 1))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
