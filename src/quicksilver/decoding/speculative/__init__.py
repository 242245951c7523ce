"""Lossless speculative decoding: cheap drafts from the same frozen model, verified by the engine.

Split by concern: ``sources`` (draft sources behind one interface), ``acceptance`` (greedy and
speculative-sampling acceptance), ``costs`` (measured step costs, draft lengths, which drafts to
verify), ``policy`` (per-sequence adaptation and statistics) and ``drafter`` (the drafting side
of one decode batch). The verify passes themselves are the decode core's (``decoding.batch``):
one forward over [last token, draft...] of every sequence at once, each with its own cache,
rolled back exactly to what was accepted.
"""

from .acceptance import accept_greedy, accept_sampled
from .costs import StepCosts, best_length, choose_drafts, expected_accepted
from .drafter import Drafter
from .sources import Draft, DraftSource, ModelDraft, PromptLookup, draft_config, draft_engine, make_sources, usable_sources

__all__ = ["Draft", "DraftSource", "Drafter", "ModelDraft", "PromptLookup", "StepCosts", "accept_greedy", "accept_sampled",
           "best_length", "choose_drafts", "draft_config", "draft_engine", "expected_accepted", "make_sources", "usable_sources"]
