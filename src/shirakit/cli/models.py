"""Finding, placing and loading base models for the CLI: devices, dtypes, packaged models by hub id.

``base_model_name_or_path`` in a saved adapter names a packaged model by its hub id (never by a
path inside this Python environment), and a local folder by its path; :func:`find_base` turns
either back into a folder.
"""

from __future__ import annotations

from pathlib import Path

from .common import UsageError, check_model_dir, training_record

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# packaged model -> (hub id written as base_model_name_or_path, function giving its local folder)
PACKAGED = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


def packaged_dir(name: str) -> Path:
    from ..app import data

    return data.minilm_dir() if name == "minilm" else data.smollm2_dir()


def packaged_name(folder: Path) -> str | None:
    """The hub id of a packaged model folder, or None for the user's own."""
    from ..app import data

    folder = Path(folder).resolve()
    for name, where in (("minilm", data.minilm_dir), ("smollm2", data.smollm2_cache)):
        try:
            if folder == Path(where()).resolve():
                return PACKAGED[name]
        except FileNotFoundError:  # that package is not installed
            continue
    return None


def resolve_device(name: str):
    """``auto``: a CUDA GPU if there is one, else Apple's MPS, else the CPU; an unavailable one is refused."""
    import torch

    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    elif name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available here (torch.cuda.is_available() is False)")
    elif name == "mps" and not mps:
        raise UsageError("--device mps: Apple's MPS backend is not available here")
    return torch.device(name)


def resolve_dtype(name: str, device):
    """``auto``: bfloat16 on a GPU that supports it, float32 otherwise; float16 only on a GPU."""
    import torch

    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name == "float16" and device.type == "cpu":
        raise UsageError("--dtype float16: not for training on the CPU (use float32 or bfloat16)")
    return getattr(torch, name)


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--model {folder}: no usable tokenizer: {exc}") from None
    if tokenizer.pad_token_id is None:  # batches are padded; the padding is masked out of attention and loss
        if tokenizer.eos_token is None:
            raise UsageError(f"--model {folder}: the tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(folder: Path, task: str, dtype, labels: list[str] | None = None, pad_id: int | None = None):
    """The base model for ``task`` (a causal LM, or a sequence classifier with a fresh head of ``labels``)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, logging

    logging.disable_progress_bar()  # a bar per weight-loading is noise in a command's output
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # a new classification head is by design; don't warn about it
    try:
        if task == "classification":
            model = AutoModelForSequenceClassification.from_pretrained(
                folder, num_labels=len(labels), id2label=dict(enumerate(labels)),
                label2id={name: i for i, name in enumerate(labels)}, dtype=dtype)
            if model.config.pad_token_id is None:  # decoder classifiers find the last token by padding
                model.config.pad_token_id = pad_id
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--model {folder}: could not be loaded for --task {task}: {exc}") from None
    finally:
        logging.set_verbosity(verbosity)
    return model.eval()


def find_base(adapter_dir: Path, model_flag: str | None) -> Path:
    """The base model folder of an adapter: --model, else its training record, else its config's
    base_model_name_or_path when that is a local folder or a packaged model's hub id."""
    if model_flag:
        return check_model_dir(model_flag)
    record = training_record(adapter_dir) or {}
    if record.get("model") and Path(record["model"]).is_dir():
        return Path(record["model"])
    from .. import methods  # noqa: F401  (registers the methods read_config needs)
    from ..io.config_file import read_config

    named = read_config(adapter_dir).base_model_name_or_path
    if named and Path(named).is_dir():
        return check_model_dir(named, f"{adapter_dir}: base_model_name_or_path")
    for key, hub_id in PACKAGED.items():
        if named == hub_id:
            return packaged_dir(key)
    raise UsageError(f"{adapter_dir}: its base model {named!r} is not a local folder; pass --model PATH")
