"""TOVA (Oren et al. 2024): keep the keys the latest query attends to most."""

from __future__ import annotations

from .base import LatestQueries


class Tova(LatestQueries):
    name = "tova"

    def latest(self, observation: int) -> int:
        return 1

    def compress_queries(self, observation: int) -> int:
        return 1
