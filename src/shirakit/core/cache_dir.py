"""shirakit's one cache folder (compiled kernels, the demo's converted model): ``$SHIRAKIT_CACHE_DIR``,
else ``$XDG_CACHE_HOME/shirakit``, else ``~/.cache/shirakit``.

``SHIRAKIT_CACHE`` named the same folder for the demo's data until 0.x; it is still read, with a
warning, for one release (``SHIRAKIT_CACHE_DIR`` wins when both are set).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

CACHE_ENV = "SHIRAKIT_CACHE_DIR"
DEPRECATED_CACHE_ENV = "SHIRAKIT_CACHE"


def cache_dir_from_env() -> Path | None:
    """The folder the environment names, or None when it names none."""
    value = os.environ.get(CACHE_ENV)
    if value:
        return Path(value)
    old = os.environ.get(DEPRECATED_CACHE_ENV)
    if old:
        warnings.warn(f"{DEPRECATED_CACHE_ENV} is deprecated and will be removed in the next release; "
                      f"set {CACHE_ENV} instead (same meaning)", FutureWarning, stacklevel=2)
        return Path(old)
    return None


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "shirakit"


def cache_dir() -> Path:
    """The environment's folder, else the default one."""
    return cache_dir_from_env() or default_cache_dir()
