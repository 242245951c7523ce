"""KV selection rules, one per module: each a ``KVRule`` whose capabilities are attributes.

``RULES`` maps ``kv.selection`` names to ready instances (what the CLI and configs name).
"""

from __future__ import annotations

from .base import Block, KVRule
from .h2o import HeavyHitters
from .knorm import KeyNorm
from .quest import Quest
from .snapkv import SnapKV
from .tova import Tova
from .window import Window

RULES: dict[str, KVRule] = {r.name: r for r in (Window(), KeyNorm(), HeavyHitters(), Tova(), SnapKV(), Quest())}

__all__ = ["Block", "KVRule", "RULES"]
