"""Acceptance rules of speculative decoding: pure functions on tensors.

Greedy: a drafted token is accepted when it is the verifier's argmax, so the output equals
decoding one token at a time. Sampling: speculative sampling (Leviathan et al. 2023; Chen et
al. 2023): accept a drafted token d with probability min(1, p(d)/q(d)), else resample from
max(p - q, 0) normalized, so every emitted token follows the verifier's distribution p. A
deterministic draft (lookup, or greedy model drafts) has q = one-hot.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ...kernels import argmax


def accept_greedy(target_logits: torch.Tensor, draft: Sequence[int]) -> tuple[int, int]:
    """Greedy verification: (number of drafted tokens accepted, the verifier's next token).

    ``target_logits`` (k+1, V): row i is the verifier's prediction after the i-th drafted token
    (row 0: after the last accepted token).
    """
    best = argmax(target_logits).tolist()
    n = 0
    while n < len(draft) and draft[n] == best[n]:
        n += 1
    return n, best[n]


def accept_sampled(p: torch.Tensor, draft: Sequence[int], q: torch.Tensor | None, generator: torch.Generator) -> tuple[int, int]:
    """Speculative sampling: (number of drafted tokens accepted, the next token), exact in distribution.

    Parameters
    ----------
    p : (k+1, V) the verifier's probabilities at each drafted position and one past them.
    draft : k drafted tokens.
    q : (k, V) the draft's probabilities the tokens were sampled from; None: a deterministic
        draft (q is one-hot on the drafted token).
    generator : CPU generator for the uniforms and the resampling.
    """
    k = len(draft)
    p = p.float().cpu()
    u = torch.rand(k, generator=generator) if k else None
    for i, d in enumerate(draft):
        q_d = 1.0 if q is None else float(q[i, d])
        p_d = float(p[i, d])
        if q_d > 0 and float(u[i]) < min(1.0, p_d / q_d):
            continue
        if q is None:
            residual = p[i].clone()
            residual[d] = 0.0
        else:
            residual = (p[i] - q[i].float().cpu()).clamp_min(0.0)
        total = float(residual.sum())
        dist = residual / total if total > 0 else p[i]
        return i, int(torch.multinomial(dist, 1, generator=generator))
    return k, int(torch.multinomial(p[k], 1, generator=generator))
