"""One module per mechanism. Each is a dataclass: its fields are its settings, checked on
construction; its decision rule is a pure function on tensors that can be tested alone."""

from .amq import AdaptiveMatryoshkaQuantization
from .fusion import ContextualTokenFusion
from .halting import DynamicTokenHalting
from .kv_skip import KVCacheSkipping

__all__ = ["AdaptiveMatryoshkaQuantization", "ContextualTokenFusion", "DynamicTokenHalting", "KVCacheSkipping"]
