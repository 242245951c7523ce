"""Integrations with tools researchers already use; each imports its tool only when used.

``register_lm_eval()`` runs when ``quicksilver`` is imported: it names the lm-eval model
``quicksilver`` in lm-eval's registry as a lazy ``module:Class`` placeholder, so neither
the harness's model code nor ours is imported until lm-eval asks for the model, and
nothing happens at all where lm-eval is not installed.
"""

from __future__ import annotations

import importlib.util
import sys

LM_EVAL_TARGET = "quicksilver.integrations.lm_eval_model:QuickSilverLM"


def register_lm_eval() -> bool:
    """Register the lm-eval model ``quicksilver`` (lazily); False where lm-eval is absent."""
    if importlib.util.find_spec("lm_eval") is None:
        return False
    try:  # both are cheap: a registry and a table of placeholders (no torch, no model code)
        # lm-eval fills its registry with its own models only while the registry is empty:
        # import that table first, or registering ours would hide ``hf`` and the others.
        import lm_eval.models  # noqa: F401
        from lm_eval.api.registry import model_registry
    except ImportError:
        return False
    if "quicksilver" not in model_registry:
        try:
            model_registry.register("quicksilver", target=LM_EVAL_TARGET)
        except (TypeError, ValueError, AttributeError):  # a frozen or foreign registry: leave it alone
            return False
    return True


def lm_eval_main(argv: list[str] | None = None) -> None:
    """``quicksilver-lm-eval``: lm-eval's own command line, with the ``quicksilver`` model registered."""
    if not register_lm_eval():
        sys.stderr.write("error: quicksilver-lm-eval needs lm-evaluation-harness: pip install 'quicksilver[lm-eval]'\n")
        raise SystemExit(2)
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()
