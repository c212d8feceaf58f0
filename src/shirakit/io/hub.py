"""Adapters by Hugging Face repo id, from the local hub cache only (never a download).

``load_adapter(model, "org/name")`` and ``shirakit serve --adapters org/name`` find an adapter that
``huggingface-cli download org/name`` (or ``snapshot_download``, or a previous ``from_pretrained``) put in the
local cache: ``<cache>/models--org--name/snapshots/<commit>/``, the commit read from ``refs/main``; ``org/name@REV``
takes another branch or tag (``refs/REV``) or a commit hash (``--revision`` of ``huggingface-cli download``).
The cache is ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else
``~/.cache/huggingface/hub`` (huggingface_hub's own order), read when the call is made.

A local path always wins: a name is looked up in the cache only when no file or folder of that name exists.
"""

from __future__ import annotations

import os
from pathlib import Path


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache folder, from the environment as it is now (see the module docstring)."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.path.expandvars(os.path.expanduser(os.environ[variable])))
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return Path(os.path.expandvars(os.path.expanduser(home))) / "hub"


def is_repo_id(text: str) -> bool:
    """Could ``text`` be a Hugging Face repo id (``name`` or ``org/name``)? huggingface_hub's own rule."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") > 1:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def split_revision(text: str) -> tuple[str, str | None]:
    """``"org/name@rev"`` -> ``("org/name", "rev")``; without ``@`` the revision is None (``main``)."""
    repo_id, at, revision = text.rpartition("@")
    return (repo_id, revision) if at and repo_id and revision else (text, None)


def resolve_adapter_source(source: str | Path) -> Path:
    """The folder ``source`` names: a local path as it is (a local path always wins), else the snapshot of the
    repo id ``source`` (``org/name`` or ``org/name@REV``) in the local hub cache. FileNotFoundError names the path
    and the cache entry looked for when neither exists."""
    path = Path(source)
    if path.exists() or not isinstance(source, str):
        return path
    repo_id, revision = split_revision(source)
    if not is_repo_id(repo_id):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    entry = cache / ("models--" + repo_id.replace("/", "--"))
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=str(cache), local_files_only=True))
    except LocalEntryNotFoundError:
        wanted = f"refs/{revision or 'main'}" + (" (or a snapshot of that commit)" if revision else "")
        download = f"huggingface-cli download {repo_id}" + (f" --revision {revision}" if revision else "")
        raise FileNotFoundError(
            f"{source!r}: no such local folder, and no snapshot of the Hugging Face repo {repo_id!r} in the local hub "
            f"cache (looked for {entry}/{wanted} and the snapshot it names; cache from HF_HUB_CACHE / HF_HOME). "
            f"shirakit never downloads: run `{download}` first, or give a folder") from None
