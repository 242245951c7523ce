"""QuickSilver: token-level runtime savings for frozen Hugging Face causal LMs.

Python API::

    from quicksilver import load_model, load_corpus, evaluate_model
    model, tokenizer = load_model("smollm2-135m")
    corpus = load_corpus("wiki", split="test")
    result = evaluate_model("smollm2-135m", "wiki", max_tokens=4096, config="amq")

The engine is ``Engine(model, config)``; ``generate(engine, prompts, ...)`` decodes with it; ``Config`` holds one settings dataclass per
mechanism (``DynamicTokenHalting``, ``KVCacheSkipping``, ``ContextualTokenFusion``,
``AdaptiveMatryoshkaQuantization``) and ``Config.preset(name)`` the presets, each with its
promise (``PresetInfo``).
"""

from .config import Config, PresetInfo
from .corpora import Corpus, load_corpus
from .decoding import GenerationResult, generate
from .engine import Engine
from .errors import QuicksilverError
from .evaluate import evaluate_model, window_plan
from .mechanisms import AdaptiveMatryoshkaQuantization, ContextualTokenFusion, DynamicTokenHalting, KVCacheSkipping
from .models import LoadedModel, load_model
from .integrations import register_lm_eval as _register_lm_eval

_register_lm_eval()  # `quicksilver` becomes an lm-eval model name (a lazy placeholder; no-op without lm-eval)

__all__ = [
    "Config", "Engine", "Corpus", "GenerationResult", "LoadedModel", "PresetInfo", "QuicksilverError", "evaluate_model",
    "generate", "load_corpus", "load_model", "window_plan",
    "AdaptiveMatryoshkaQuantization", "ContextualTokenFusion", "DynamicTokenHalting", "KVCacheSkipping",
]
__version__ = "0.1.0"
