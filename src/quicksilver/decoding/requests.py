"""The checks every generation request passes before any work: prompts, limits, stop strings."""

from __future__ import annotations

import torch

from ..errors import QuicksilverError
from ..tokens import token_ids


def check_prompts(prompts, max_new_tokens: int, max_positions: int, vocab: int) -> list[torch.Tensor]:
    """The prompts as 1-D id tensors; a one-line error for empty or over-long ones or bad ids."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise QuicksilverError(f"max-new-tokens must be an integer >= 1, got {max_new_tokens}")
    if isinstance(prompts, torch.Tensor):
        prompts = [prompts] if prompts.dim() == 1 else list(prompts)
    rows = [token_ids(p, vocab, "prompts").flatten() for p in prompts]
    if not rows:
        raise QuicksilverError("no prompt given")
    for r in rows:
        if r.numel() == 0:
            raise QuicksilverError("empty prompt: give at least one token")
        if r.numel() + max_new_tokens > max_positions:
            raise QuicksilverError(
                f"prompt of {r.numel()} tokens plus {max_new_tokens} new tokens exceeds the model's context of {max_positions}"
            )
    return rows


def check_request(prompts, max_new_tokens: int, max_positions: int, eos_token_id, stop_strings, tokenizer, vocab: int):
    """The prompts as 1-D tensors and the EOS ids as a set, after the checks every generation path shares."""
    rows = check_prompts(prompts, max_new_tokens, max_positions, vocab)
    if stop_strings and tokenizer is None:
        raise QuicksilverError("stop strings need a tokenizer to decode with")
    return rows, set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
