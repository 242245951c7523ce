"""SnapKV (Li et al. 2024): keep the keys the latest ``observation`` queries attend to most; compresses prompts only."""

from __future__ import annotations

from .base import LatestQueries


class SnapKV(LatestQueries):
    name = "snapkv"
    compresses_appended = False
