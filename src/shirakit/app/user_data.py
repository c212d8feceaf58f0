"""Your own data for ``shirakit train``, read and prepared with Hugging Face ``datasets``.

- :func:`load_table`: a local JSON Lines / JSON, CSV, Parquet or plain-text file, a folder of
  such files, or a folder written by ``Dataset.save_to_disk``, as one ``datasets.Dataset``.
- :func:`split`: a held-out fraction (or count), seeded, with ``Dataset.train_test_split``.
- Three preparations, each a batched ``Dataset.map``; every row becomes ``input_ids`` and ``labels``:
  - :func:`causal_lm`: tokenize the text column, join the documents with EOS and cut the stream into
    blocks of ``seq_len`` tokens (packing; the remainder shorter than a block is dropped);
    labels = input_ids.
  - :func:`sft`: render each conversation (a column of ``[{"role", "content"}, ...]``) with the
    tokenizer's chat template; labels are the token ids of the assistant turns and -100 elsewhere,
    so the loss is computed on assistant tokens only.
  - :func:`classification`: tokenize the text column (truncated to ``seq_len``); labels are class
    indices into the sorted label names of the training data.

Every error names the file and the column it is about and is a ``DataError`` (a ``ValueError``).
"""

from __future__ import annotations

from pathlib import Path

from ..core.extras import require

IGNORE_INDEX = -100  # labels with this value add nothing to the loss (PyTorch's cross_entropy default)

# file suffix -> the ``datasets`` builder that reads it
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text", ".text": "text"}


class DataError(ValueError):
    """The data cannot be used as asked (missing file, missing column, wrong shape of rows)."""


def _builder_of(path: Path) -> tuple[str, list[str]]:
    """(builder, files) for a file or a folder of files of one kind."""
    if path.is_file():
        builder = BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"{path}: unknown file type {path.suffix!r}; expected one of {sorted(BUILDERS)}")
        return builder, [str(path)]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in BUILDERS)
    kinds = {BUILDERS[p.suffix.lower()] for p in files}
    if len(kinds) != 1:
        found = sorted({p.suffix for p in files}) or "no data files"
        raise DataError(f"{path}: expected a saved dataset or data files of one kind ({sorted(BUILDERS)}), "
                        f"found {found}")
    return kinds.pop(), [str(p) for p in files]


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file())


def check_source(path: str | Path) -> Path:
    """The data path, checked without reading it: exists and is of a kind :func:`load_table` reads."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if not is_saved_dataset(path):
        _builder_of(path)
    return path


def load_table(path: str | Path):
    """One ``datasets.Dataset`` from a local file or folder (see the module docstring)."""
    datasets = require("datasets", "reading your own data (shirakit train --data)")

    path = check_source(path)
    datasets.disable_progress_bars()
    try:
        if is_saved_dataset(path):
            table = datasets.load_from_disk(str(path))
            if isinstance(table, datasets.DatasetDict):
                if "train" not in table:
                    raise DataError(f"{path}: a saved DatasetDict without a 'train' split (has {list(table)})")
                table = table["train"]
            return table
        builder, files = _builder_of(path)
        return datasets.load_dataset(builder, data_files=files, split="train")
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types for a malformed file; name the file
        raise DataError(f"{path}: could not be read as {path.suffix or 'a dataset'}: {exc}") from exc


def split(table, eval_split: float, seed: int):
    """(train, eval): ``eval_split`` < 1 is a fraction of the rows, >= 1 a row count."""
    size = int(eval_split) if eval_split >= 1 else eval_split
    if len(table) < 2:
        raise DataError(f"cannot hold out evaluation rows from {len(table)} row(s); pass --eval-data")
    if isinstance(size, int) and size >= len(table):
        raise DataError(f"--eval-split {size} leaves no training rows out of {len(table)}")
    parts = table.train_test_split(test_size=size, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def require_column(table, column: str, flag: str, where: str) -> None:
    if column not in table.column_names:
        raise DataError(f"{where}: no column {column!r} (set {flag}); the columns are {table.column_names}")


# ---- causal LM: tokenize and pack ---------------------------------------------------------------
def causal_lm(table, tokenizer, text_column: str, seq_len: int, where: str):
    """Blocks of ``seq_len`` tokens packed from the documents, EOS between documents."""
    require_column(table, text_column, "--text-column", where)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def pack(batch):
        stream: list[int] = []
        for text in batch[text_column]:
            if text:
                stream += tokenizer(str(text), add_special_tokens=False)["input_ids"] + eos
        blocks = [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
        return {"input_ids": blocks, "labels": blocks}

    # one batch of many rows packs across document boundaries; batches are packed independently
    out = table.map(pack, batched=True, batch_size=1000, remove_columns=table.column_names)
    if len(out) == 0:
        raise DataError(f"{where}: fewer than {seq_len} tokens of text in column {text_column!r} "
                        f"(one block of --seq-len); lower --seq-len or add data")
    return out


# ---- SFT: chat template, loss on assistant tokens ----------------------------------------------------
def _render(tokenizer, messages, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def chat_segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_assistant) pieces, in order.

    The assistant turn i is the text between the rendering of messages[:i] with the generation
    prompt and the rendering of messages[:i+1]; a template whose renderings are not prefixes of
    one another (some drop earlier reasoning) is refused, since the split would be wrong.
    """
    pieces, done = [], ""
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        full = _render(tokenizer, messages[: i + 1])
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise DataError("the tokenizer's chat template does not render a conversation as a prefix of "
                            "its continuation; cannot tell the assistant tokens apart")
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    rest = _render(tokenizer, messages)[len(done):]
    return pieces + ([(rest, False)] if rest else [])


def sft(table, tokenizer, messages_column: str, seq_len: int, where: str):
    """Token ids of each rendered conversation (cut at ``seq_len``); labels only on assistant turns."""
    require_column(table, messages_column, "--messages-column", where)
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("--task sft needs a tokenizer with a chat template; this one has none "
                        "(use --task causal-lm on a text column instead)")

    def encode(batch):
        ids_out, labels_out = [], []
        for messages in batch[messages_column]:
            if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
                raise DataError(f"{where}: column {messages_column!r} must hold lists of "
                                '{"role": ..., "content": ...} messages')
            ids, labels = [], []
            for text, is_assistant in chat_segments(tokenizer, messages):
                piece = tokenizer(text, add_special_tokens=False)["input_ids"]
                ids += piece
                labels += piece if is_assistant else [IGNORE_INDEX] * len(piece)
            ids_out.append(ids[:seq_len])
            labels_out.append(labels[:seq_len])
        return {"input_ids": ids_out, "labels": labels_out}

    out = table.map(encode, batched=True, remove_columns=table.column_names)
    out = out.filter(lambda row: any(label != IGNORE_INDEX for label in row["labels"]))
    if len(out) == 0:
        raise DataError(f"{where}: no conversation has an assistant turn within --seq-len {seq_len} tokens")
    return out


# ---- classification ---------------------------------------------------------------------------------
def label_names(table, label_column: str, where: str) -> list[str]:
    """The sorted distinct labels of the training data, as strings (the classes, in index order)."""
    require_column(table, label_column, "--label-column", where)
    values = set(table.unique(label_column))
    if None in values:
        raise DataError(f"{where}: column {label_column!r} has empty labels")
    if len(values) < 2:
        raise DataError(f"{where}: column {label_column!r} has {len(values)} distinct label(s); need at least 2")
    numeric = all(isinstance(v, int) for v in values)
    return [str(v) for v in sorted(values, key=(int if numeric else str))]


def classification(table, tokenizer, text_column: str, label_column: str, labels: list[str], seq_len: int,
                   where: str):
    """Token ids (truncated to ``seq_len``) and the label index of each row."""
    require_column(table, text_column, "--text-column", where)
    require_column(table, label_column, "--label-column", where)
    index = {name: i for i, name in enumerate(labels)}
    unknown = sorted({str(v) for v in table.unique(label_column)} - set(index))
    if unknown:
        raise DataError(f"{where}: labels {unknown[:5]} are not among the training labels {labels}")

    def encode(batch):
        ids = tokenizer([str(t) for t in batch[text_column]], truncation=True, max_length=seq_len)["input_ids"]
        return {"input_ids": ids, "labels": [index[str(v)] for v in batch[label_column]]}

    return table.map(encode, batched=True, remove_columns=table.column_names)
