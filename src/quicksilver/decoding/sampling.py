"""How a sequence picks its next token: greedy, or sampled with its own generator.

Warping uses transformers' public logits processors (temperature, top-k, top-p). Each
sequence has its own ``Sampler`` (and so its own random stream): a sequence's tokens never
depend on the other sequences of its batch, so a batched request equals the request alone.
"""

from __future__ import annotations

import math

import torch

from ..errors import QuicksilverError
from ..kernels import argmax

# Below this temperature sampling is greedy: logits divided by it overflow to inf (1e-40 did, as
# 1e-300 would), and the distribution is one-hot to float precision long before.
GREEDY_BELOW = 1e-5
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, seed: int | None = None) -> None:
    """A one-line ``QuicksilverError`` for settings no sampler can run."""
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not math.isfinite(temperature) or temperature < 0:
        raise QuicksilverError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise QuicksilverError(f"top-k must be an integer >= 1, got {top_k}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise QuicksilverError(f"top-p must be in (0, 1], got {top_p}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
        raise QuicksilverError(f"seed must be an integer in [-2^63, 2^64), got {seed}")


def make_probs(temperature: float, top_k: int | None = None, top_p: float | None = None):
    """logits (N, V) -> the sampling distribution (N, V) after temperature, top-k and top-p."""
    from transformers.generation.logits_process import (
        LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
    )

    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k is not None:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    return lambda logits: torch.softmax(warpers(None, logits.float()), dim=-1)


class Sampler:
    """One sequence's sampling: greedy at temperature 0 (or below ``GREEDY_BELOW``), else its own
    generator seeded with ``seed`` (None: 0).

    Attributes: ``greedy``; ``generator`` (None when greedy); ``probs(logits (N, V)) -> (N, V)``.
    """

    def __init__(self, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int | None = None):
        check_sampling(temperature, top_k, top_p, seed)
        self.greedy = temperature < GREEDY_BELOW
        self.generator = None
        self.probs = None
        if not self.greedy:
            self.probs = make_probs(temperature, top_k, top_p)
            self.generator = torch.Generator()
            self.generator.manual_seed(0 if seed is None else seed)

    def sample(self, logits: torch.Tensor) -> int:
        """The next token from one row of logits (V,) or (1, V)."""
        if self.greedy:
            return int(argmax(logits.reshape(-1)))
        return int(torch.multinomial(self.probs(logits.reshape(1, -1))[0].cpu(), 1, generator=self.generator))


def make_sampler(temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int | None = None):
    """A function (logits (N, V)) -> next tokens (N,), every row with one generator; greedy at temperature 0."""
    s = Sampler(temperature, top_k, top_p, seed)
    if s.greedy:
        return argmax

    def sample(logits):
        return torch.multinomial(s.probs(logits).cpu(), 1, generator=s.generator).squeeze(1).to(logits.device)

    return sample
