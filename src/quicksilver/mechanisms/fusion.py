"""Contextual Token Fusion: a near-duplicate token joins an earlier token's path.

The paper (QuickSilver, arXiv 2506.22396, Sec. 3.3) merges redundant tokens so the
sequence shrinks. Made causal here: at ``layer``, a token whose state has cosine
similarity >= ``threshold`` with one of the ``window`` tokens before it joins that
token's group (the group's earliest, never-fused token is its representative). From then
on the member is not computed and writes no K/V; the representative's K/V stand for the
group, and a query adds log(n) to the representative's score, n counting the
representative and the members at or before the query (ToMe's proportional attention,
Bolya et al. 2023), so no query learns of later tokens. At the head the member's state is
its own plus the representative's later update (``output="delta"``) or the
representative's state (``output="copy"``). Merging only with earlier tokens keeps
perplexity honest. Fusion is a prefill mechanism: ``generate`` runs with it off.

Why similarity alone is not enough (docs/results/fusion_why.md): on SmolLM2 the states
that pass a cosine threshold at layer 12 are nearly all repeats of the same token id (a
repeated identifier, a comma, an indentation run), and a fused member then predicts what
followed its representative: "parent" + "pos" after an earlier "start" + "pos" predicts
":". That cost +11% perplexity on Python source. ``prefix`` (default 2) therefore asks
the rows before the pair to match as well (row i-j against row r-j, j = 1..prefix), so
a token only joins an earlier one that repeats its context too; the check reads only
earlier rows and costs no extra dot products (they lie on the same diagonal). With it
fusion rarely fires on this model, and saves almost nothing: see the ``fusion`` preset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import check_choice, check_range

OUTPUTS = ("delta", "copy")


@dataclass
class ContextualTokenFusion:
    """Settings of Contextual Token Fusion.

    Parameters
    ----------
    enabled : bool, default False
    layer : int, default 12
        Fusion is decided after this many layers; members skip every later layer.
    threshold : float, default 0.95
        Cosine similarity at or above which a token joins an earlier one.
    window : int, default 1
        How many preceding tokens are candidates (1: the predecessor only).
    output : {"delta", "copy"}, default "delta"
        The member's final state: own state + the representative's later update, or a copy.
    protect_first : int, default 4
        The first positions are never fused (BOS and attention sinks).
    prefix : int, default 2
        The rows just before the token and before its candidate must match too: a pair
        (i, r) qualifies only if rows i-j and r-j also reach the threshold for every
        j = 1..prefix (0: similarity of the pair alone, the rule before this setting).
    """

    enabled: bool = False
    layer: int = 12
    threshold: float = 0.95
    window: int = 1
    output: str = "delta"
    protect_first: int = 4
    prefix: int = 2

    def __post_init__(self):
        check_range("fusion", "layer", self.layer, 1, integer=True)
        check_range("fusion", "threshold", self.threshold, -1.0, 1.0)
        check_range("fusion", "window", self.window, 1, integer=True)
        check_choice("fusion", "output", self.output, OUTPUTS)
        check_range("fusion", "protect_first", self.protect_first, 0, integer=True)
        check_range("fusion", "prefix", self.prefix, 0, integer=True)

    def check_model(self, n_layers: int) -> None:
        from ..errors import QuicksilverError

        if self.enabled and self.layer >= n_layers:
            raise QuicksilverError(f"fusion.layer={self.layer} is past the model's last layer ({n_layers - 1})")

    def probe_flops(self, rows: int, d_model: int) -> int:
        """Cosine similarity with ``window`` predecessors: a dot product and norms per pair.

        The ``prefix`` check reuses the same pairs (row i-j against row i-back-j lies on the
        same diagonal), so it adds nothing.
        """
        return rows * self.window * 3 * 2 * d_model

    def representatives(self, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Pure rule: the representative row of every row of one sequence; (N, d), (N,) -> (N,).

        A row that is not fused is its own representative. Candidates are the ``window``
        rows before it whose ``prefix`` preceding rows also match theirs (see the class);
        the most similar one at or above the threshold wins, and its own representative is
        taken (groups never chain to a member). Only rows before a row are ever read.
        """
        n = h.shape[0]
        rep = torch.arange(n, device=h.device)
        if n < 2:
            return rep
        unit = torch.nn.functional.normalize(h.float(), dim=-1)
        best_sim = torch.full((n,), -2.0, device=h.device)
        best = rep.clone()
        for back in range(1, min(self.window, n - 1) + 1):
            sim = (unit[back:] * unit[:-back]).sum(-1)  # (n - back,): row i vs row i - back
            similar = sim >= self.threshold
            ok = similar.clone()
            for j in range(1, self.prefix + 1):  # row i - j vs row i - back - j: the same diagonal, j entries earlier
                earlier = torch.zeros_like(similar)
                earlier[j:] = similar[: similar.numel() - j]
                ok &= earlier
            sim = torch.where(ok, sim, torch.full_like(sim, -2.0))
            better = sim > best_sim[back:]
            best_sim[back:] = torch.where(better, sim, best_sim[back:])
            best[back:] = torch.where(better, rep[:-back], best[back:])
        fuse = (best_sim >= self.threshold) & (positions >= self.protect_first)
        for i in fuse.nonzero().squeeze(1).tolist():  # in order, so a candidate's root is known
            rep[i] = rep[int(best[i])]
        return rep
