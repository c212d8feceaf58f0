"""An adapter folder is two files, written as one: ``adapter_config.json`` + ``adapter_model.safetensors``.

Each file is replaced atomically (temp file, fsync, rename), but two renames are not one: a kill
between them would leave new weights beside the old config (with LoRA, silently the wrong alpha).
So the pair is bound and the save is made recoverable:

- the weights' safetensors metadata carries ``shirakit_config_sha256``, the SHA-256 of the exact
  config bytes saved with them (PEFT ignores metadata, so both files stay PEFT's format);
- a save writes both temp files first, then renames the weights, then the config. Until the
  config's rename the new config waits beside them as ``.adapter_config.json.<random>.tmp``.

On reading, a config whose digest is not the weights' is looked up among those temp files: the
one that matches is the config of the interrupted save, which is then completed (renamed into
place; if the folder is read-only it is used without renaming). So after a kill at any instant
the folder reads as the old adapter or the new one, never a mix. The next save into the folder
first completes any interrupted save, then removes leftover temp files. A config that matches
neither (edited by hand, or copied from another save) loads with a warning. Files without the
digest (written by PEFT, or by older shirakit) are read as they are. One writer per folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import warnings
from pathlib import Path

from .atomic import fsync_directory, is_stale_temp, write_temp_file

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
BINDING_KEY = "shirakit_config_sha256"
_TEMP_SUFFIX = ".tmp"
_MAX_HEADER = 16 << 20  # bytes of safetensors header read to find the digest (real ones: a few KB)
_MAX_CONFIG = 4 << 20


def digest(config_bytes: bytes) -> str:
    return hashlib.sha256(config_bytes).hexdigest()


def _temp_files(directory: Path, name: str) -> list[Path]:
    try:
        entries = list(directory.iterdir())
    except OSError:
        return []
    prefix = f".{name}."
    return sorted(p for p in entries if p.name.startswith(prefix) and p.name.endswith(_TEMP_SUFFIX))


# ---- writing ------------------------------------------------------------------------------------
def check_save_target(directory: str | Path) -> Path:
    """``directory`` as a Path, if an adapter folder can be made there: it, and every parent of it that exists,
    must be a folder. A file in the way is a FileExistsError naming it (before any work is done)."""
    directory = Path(directory)
    for path in (directory, *directory.parents):
        if path.exists() or path.is_symlink():
            if not path.is_dir():
                kind = "a file" if path.is_file() else "not a folder"
                where = "" if path == directory else f" (a parent of {str(directory)!r})"
                raise FileExistsError(
                    f"cannot save an adapter to {str(directory)!r}: {str(path)!r}{where} exists and is {kind}; an "
                    f"adapter is a folder (adapter_config.json + adapter_model.safetensors): give a folder path")
            break
    return directory


def write_adapter_folder(directory: str | Path, config_bytes: bytes, weights_bytes: bytes) -> None:
    """Commit the pair: weights (carrying ``digest(config_bytes)``) first, the config last."""
    directory = check_save_target(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _finish_interrupted_save(directory)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        for leftover in _temp_files(directory, name):
            if is_stale_temp(leftover, name):
                leftover.unlink(missing_ok=True)
    weights_tmp = write_temp_file(directory / WEIGHTS_NAME, weights_bytes)
    config_tmp = None
    try:
        config_tmp = write_temp_file(directory / CONFIG_NAME, config_bytes)
        os.replace(weights_tmp, directory / WEIGHTS_NAME)
        try:
            os.replace(config_tmp, directory / CONFIG_NAME)
        except FileNotFoundError:  # a concurrent identical save (every FSDP rank) completed ours
            if _config_digest(directory) != digest(config_bytes):
                raise
        fsync_directory(directory)
    except BaseException:
        # Once the new weights are in place (their temp file is gone) their config must survive:
        # it completes the save on the next read or save.
        if os.path.exists(weights_tmp):
            os.unlink(weights_tmp)
            if config_tmp is not None:
                Path(config_tmp).unlink(missing_ok=True)
        raise


# ---- reading ------------------------------------------------------------------------------------
def weights_metadata(path: Path) -> dict | None:
    """The safetensors ``__metadata__`` read from the header alone, or None when the file is absent
    or unreadable (the weights reader reports what is wrong with it)."""
    if not os.path.isfile(path):  # absent, or a FIFO/device (opening a FIFO would block)
        return None
    try:
        with open(path, "rb", buffering=0) as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            if size > _MAX_HEADER:
                return None
            header = json.loads(handle.read(size).decode("utf-8"))
    except (OSError, struct.error, ValueError, RecursionError):
        return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else None


def _bound_digest(directory: Path) -> str | None:
    meta = weights_metadata(directory / WEIGHTS_NAME)
    value = meta.get(BINDING_KEY) if meta else None
    return value if isinstance(value, str) else None


def _matching_temp_config(directory: Path, wanted: str) -> Path | None:
    for candidate in _temp_files(directory, CONFIG_NAME):
        try:
            if candidate.is_file() and candidate.stat().st_size <= _MAX_CONFIG:
                if digest(candidate.read_bytes()) == wanted:
                    return candidate
        except OSError:
            continue
    return None


def _finish_interrupted_save(directory: Path) -> None:
    """If the weights are newer than the config, rename the interrupted save's config into place."""
    wanted = _bound_digest(directory)
    if wanted is None or _config_digest(directory) == wanted:
        return
    pending = _matching_temp_config(directory, wanted)
    if pending is not None:
        try:
            os.replace(pending, directory / CONFIG_NAME)
        except FileNotFoundError:  # its writer is alive and just completed it
            return
        fsync_directory(directory)


def _config_digest(directory: Path) -> str | None:
    path = directory / CONFIG_NAME
    try:
        return digest(path.read_bytes()) if path.is_file() else None
    except OSError:
        return None


def bound_config_bytes(directory: Path, config_bytes: bytes) -> bytes:
    """The config that belongs to the weights in ``directory``: ``config_bytes`` when they match (or
    the weights carry no digest), else the interrupted save's config, which is then put in place."""
    wanted = _bound_digest(directory)
    if wanted is None or digest(config_bytes) == wanted:
        return config_bytes
    pending = _matching_temp_config(directory, wanted)
    if pending is None:
        warnings.warn(
            f"{directory / CONFIG_NAME}: not the config saved with {WEIGHTS_NAME} (its digest differs: "
            "edited since, or copied from another save); loading it as it is", stacklevel=4,
        )
        return config_bytes
    pending_bytes = pending.read_bytes()
    try:  # complete the interrupted save; a read-only folder is read as if it had been completed
        os.replace(pending, directory / CONFIG_NAME)
        fsync_directory(directory)
    except OSError:
        pass
    return pending_bytes
