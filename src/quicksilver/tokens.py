"""Token-id validation, shared by the engine's public call and the decoding core's request checks."""

from __future__ import annotations

import torch

from .errors import QuicksilverError


def token_ids(x, vocab: int, what: str = "input_ids") -> torch.Tensor:
    """``x`` (a tensor, or a list of ints or of such lists) as a long tensor of ids in [0, vocab).

    Anything else raises ``QuicksilverError`` saying what was wrong; the shape is the caller's to check.
    """
    try:
        t = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError):
        raise QuicksilverError(f"{what} must be token ids: a list of ints or an integer tensor") from None
    if t.numel() == 0:
        return t.long()
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise QuicksilverError(f"{what} must be token ids (integers), got {t.dtype}")
    low, high = int(t.min()), int(t.max())
    if low < 0 or high >= vocab:
        raise QuicksilverError(f"{what} must lie in [0, {vocab}) (the vocabulary), got {low if low < 0 else high}")
    return t.long()
