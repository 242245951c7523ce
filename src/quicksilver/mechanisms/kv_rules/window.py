"""StreamingLLM's position window (Xiao et al. 2023): the sinks and the recent keys, nothing older."""

from __future__ import annotations

from .base import KVRule


class Window(KVRule):
    """No older key is read: ``kv.recent_window`` alone bounds what a query sees (``KVCacheSkipping.visible``)."""

    name = "window"
    selects = False
    evicts = False
