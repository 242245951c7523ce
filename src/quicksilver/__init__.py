"""QuickSilver: token-level runtime savings for frozen Hugging Face causal LMs.

Python API::

    from quicksilver import load_model, load_corpus, evaluate_model
    model, tokenizer = load_model("smollm2-135m")
    corpus = load_corpus("wiki", split="test")
    result = evaluate_model("smollm2-135m", "wiki", max_tokens=4096)
"""

from .config import Config
from .corpora import Corpus, load_corpus
from .engine import Engine
from .errors import QuicksilverError
from .evaluate import evaluate_model, window_plan
from .models import load_model
from .integrations import register_lm_eval as _register_lm_eval

_register_lm_eval()  # `quicksilver` becomes an lm-eval model name (a lazy placeholder; no-op without lm-eval)

__all__ = ["Config", "Engine", "Corpus", "QuicksilverError", "evaluate_model", "load_corpus", "load_model", "window_plan"]
__version__ = "0.1.0"
