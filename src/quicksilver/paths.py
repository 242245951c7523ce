"""Where QuickSilver keeps what it builds once per machine (model caches, kernel tables, native builds)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$QUICKSILVER_CACHE``, or the user's cache dir (``~/.cache/quicksilver`` on Linux)."""
    env = os.environ.get("QUICKSILVER_CACHE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("quicksilver"))
