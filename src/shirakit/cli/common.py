"""What every subcommand shares: a parser whose errors are one line, argument checks, the training record.

Checks run before any model loads; each raises :class:`UsageError` (exit status 2) naming the
argument or the folder it is about. Nothing here imports torch (``shirakit --help`` stays fast).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

TRAINING_FILE = "shirakit_training.json"


class UsageError(Exception):
    """A bad argument or input: printed as one line, exit status 2, no traceback."""


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option that has a default shows it in --help, also options without a help text
    (argparse's formatter skips those); a ``None`` default is left out (the help says what it means)."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        if (not action.option_strings or action.default is None or action.default is argparse.SUPPRESS
                or "%(default)" in text):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"

    def _format_action(self, action) -> str:
        if action.help is None and self._get_help_string(action):
            action = copy.copy(action)
            action.help = self._get_help_string(action)
        return super()._format_action(action)


class Parser(argparse.ArgumentParser):
    """argparse with defaults in --help and one-line errors (argparse prints the whole usage)."""

    def __init__(self, *args, populate=None, **kwargs) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)
        self._populate = populate  # adds the arguments on first parse (a subcommand with heavy imports)

    def parse_known_args(self, args=None, namespace=None):
        if self._populate is not None:
            populate, self._populate = self._populate, None
            populate(self)
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


# ---- argument types (argparse names the flag in its error) -------------------------------------------------
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, found {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, found {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number > 0, found {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, found {text}")
    return value


def eval_split(text: str) -> float:
    """A fraction in (0, 1) or a whole row count >= 1."""
    value = positive_float(text)
    if value >= 1 and value != int(value):
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1) or a row count, found {text}")
    return value


# ---- paths ---------------------------------------------------------------------------------------------
def check_out_dir(path: str | Path, flag: str = "--out", overwrite: bool = False) -> Path:
    """A folder we may write: not an existing file, inside a writable folder; an existing adapter
    there is kept unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path}: is an existing file, expected a folder")
    if path.is_dir() and (path / "adapter_config.json").exists() and not overwrite:
        raise UsageError(f"{flag} {path}: already holds an adapter; pass --overwrite to replace it, "
                         "or --resume to continue it")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: cannot write in {existing}")
    return path


def check_file_out(path: str | Path, flag: str) -> Path:
    """An output file whose folder exists and is writable."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"{flag} {path}: the folder {folder} does not exist")
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a folder, expected a file name")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: cannot write in {folder}")
    return path


def check_adapter_dir(path: str | Path, what: str = "adapter") -> Path:
    """An adapter folder, or the snapshot of a repo id (org/name) in the local Hugging Face hub cache."""
    from ..io.hub import resolve_adapter_source

    try:
        path = resolve_adapter_source(str(path))
    except FileNotFoundError as exc:
        raise UsageError(f"{what} {exc}") from None
    if not path.is_dir():
        raise UsageError(f"{what} {path}: no such folder")
    if not (path / "adapter_config.json").is_file():
        raise UsageError(f"{what} {path}: no adapter_config.json (not an adapter folder)")
    return path


def check_model_dir(path: str | Path, flag: str = "--model") -> Path:
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"{flag} {path}: no such folder (expected a local Hugging Face model folder)")
    if not (path / "config.json").is_file():
        raise UsageError(f"{flag} {path}: no config.json (expected a local Hugging Face model folder)")
    return path


def training_record(directory: Path) -> dict | None:
    """The ``shirakit train`` record of an adapter folder, or None (PEFT's and other tools' folders)."""
    path = Path(directory) / TRAINING_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: not readable JSON: {exc}") from None
    if not isinstance(record, dict):
        raise UsageError(f"{path}: expected a JSON object")
    return record
