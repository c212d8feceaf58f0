"""Building an engine from folders: the model (or the packaged SmolLM2-135M), its tokenizer, the
adapter folders. Shared by the single-process server and the Ray Serve replicas."""

from __future__ import annotations

from pathlib import Path

import torch

from ..io.folder import CONFIG_NAME
from ..io.hub import resolve_adapter_source
from .engine import Engine

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def adapter_folders(directory: str | Path | None) -> dict[str, Path]:
    """``--adapters``: one or more comma-separated sources, each a local folder or a Hugging Face repo id
    (``org/name``, ``org/name@REV``) already in the local hub cache (a local folder of that name wins; nothing is
    downloaded). A source holding ``adapter_config.json`` is one adapter, named by its folder (a repo by its last
    part: ``name``, ``name@REV``);
    otherwise every subfolder of it is one adapter, named by the subfolder."""
    if directory is None:
        return {}
    found: dict[str, Path] = {}
    sources = [directory] if isinstance(directory, Path) else [s.strip() for s in str(directory).split(",")]
    for source in sources:
        try:
            root = resolve_adapter_source(source)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"--adapters {exc}") from None
        if not root.is_dir():
            raise FileNotFoundError(f"--adapters {source}: not a folder")
        if (root / CONFIG_NAME).is_file():
            name = Path(str(source)).name if root == Path(source) else str(source).rsplit("/", 1)[-1]
            entries = {name: root}
        else:
            entries = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")}
        clash = sorted(set(entries) & set(found))
        if clash:
            raise ValueError(f"--adapters {source}: adapter name(s) {clash} already given by an earlier source")
        found.update(entries)
    return found


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_model_dir() -> Path:
    """The packaged SmolLM2-135M (dequantized from its GGUF once, then cached as safetensors)."""
    from shirakit.data import smollm2_dir  # the public path: serve is a client of the public API

    return smollm2_dir()


def load_model(model_dir: str | Path | None, device: torch.device, dtype: str = "auto"):
    """(model, tokenizer, folder): a local causal-LM folder, or the packaged SmolLM2-135M."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir or default_model_dir())
    if not model_dir.is_dir():
        raise FileNotFoundError(f"--model {model_dir}: not a folder")
    if dtype == "auto":  # CPUs run half precision slowly; keep the file's dtype on GPUs
        torch_dtype = "auto" if device.type == "cuda" else torch.float32
    else:
        torch_dtype = DTYPES[dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer, model_dir


def build_engine(model_dir=None, adapters=None, served_model_name=None, device="auto", dtype="auto",
                 max_loaded=8, max_loaded_mb=None, max_batch=32, max_queue=256,
                 fuse_min_steps=None, max_num_batched_tokens=None, max_kv_tokens=None,
                 chunked_prefill=True, chunk_slack="default", packed_weights=True) -> Engine:
    """``chunk_slack``: "default" (the engine's), "off" (chunks by tokens only) or a positive fraction;
    ``packed_weights``: oneDNN on packed weight copies from 8 rows up on CPU (docs/serving.md)."""
    model, tokenizer, folder = load_model(model_dir, resolve_device(device), dtype)
    name = served_model_name or folder.name
    found = adapter_folders(adapters)
    if name in found:
        raise ValueError(f"adapter folder {found[name]} has the served model's name {name!r}; rename one")
    return Engine(model, tokenizer, name, found, max_loaded=max_loaded, max_loaded_mb=max_loaded_mb,
                  max_batch=max_batch, max_queue=max_queue, fuse_min_steps=fuse_min_steps,
                  max_kv_tokens=max_kv_tokens, chunked_prefill=chunked_prefill, packed_weights=packed_weights,
                  **({} if max_num_batched_tokens is None else {"max_num_batched_tokens": max_num_batched_tokens}),
                  **({} if chunk_slack in (None, "default") else {"chunk_slack": None if chunk_slack == "off"
                                                                 else chunk_slack}))
