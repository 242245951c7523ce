"""Per-sequence drafting policy: each sequence keeps, per draft source, decayed counts of accepted
and rejected drafted tokens, the draft length they make pay best, and an off-switch that backs
off (doubling) while drafting does not pay; and statistics of what each source did.
"""

from __future__ import annotations

from dataclasses import dataclass

from .costs import StepCosts, best_length
from .sources import Draft


@dataclass
class SourceStats:
    """What one source did: steps it drafted in, tokens drafted, tokens accepted, tokens emitted by its steps."""

    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0

    def as_dict(self) -> dict:
        return {"steps": self.steps, "drafted": self.drafted, "accepted": self.accepted, "emitted": self.emitted,
                "acceptance_rate": self.accepted / self.drafted if self.drafted else 0.0,
                "tokens_per_step": self.emitted / self.steps if self.steps else 0.0}


@dataclass
class RowPolicy:
    """One sequence's draft length, running acceptance and off-switch for one source."""

    length: int
    acceptance: float = 1.0
    gain: float | None = None  # running estimate of tokens per unit of plain-step time (model drafts)
    off_until: int = 0
    backoff: int = 0
    # Model drafts: decayed counts of drafted tokens the verifier took and of rejections, whose
    # ratio estimates the per-token acceptance the draft length is chosen from (a prior of 4:1).
    taken: float = 4.0
    rejected: float = 1.0


def model_cost(src, d: Draft, verify: StepCosts, sequences: int) -> tuple[float, float] | None:
    """A model draft's (time spent on this sequence this step, one pass's time), in plain steps; None for lookup."""
    if not src.runs_passes:
        return None
    plain = verify.plain_step(sequences)
    # Before both are measured: a draft pass at half a plain step (a low-bit draft's weight bytes).
    r = src.seconds_per_pass / plain if src.seconds_per_pass and plain else 0.5
    return d.passes * r, r


def alpha(pol: RowPolicy) -> float:
    """A sequence's estimated per-token acceptance for one source (decayed counts, ``RowPolicy``)."""
    return pol.taken / (pol.taken + pol.rejected)


def expected_rate(pol: RowPolicy, src, row_cost: float, plain_s: float | None, cfg) -> float:
    """Tokens per unit of time a source promises for a sequence, at its best length (``best_length``)."""
    token_cost = row_cost
    if src.runs_passes:
        token_cost += src.seconds_per_pass / plain_s if src.seconds_per_pass and plain_s else 0.5
    return best_length(pol.taken / (pol.taken + pol.rejected), token_cost, cfg.max_draft)[1]


def adapt(pol: RowPolicy, drafted: int, accepted: int, step: int, cfg, row_cost: float,
           model_cost: tuple[float, float] | None = None) -> None:
    """The draft length that pays best at the measured acceptance and costs; off while drafting does not pay.

    Per-token acceptance is estimated from decayed counts of accepted tokens and rejections.
    ``row_cost``: a verified row, in plain steps (``StepCosts.row_cost``); ``model_cost``: a
    model draft's (this step's draft time, one pass), in plain steps (``model_cost``), None for
    prompt lookup (free to draft) or before it is measured. A model draft is also switched off
    while its realised gain (tokens per unit of time, against 1 for a plain step) is under 1.
    """
    pol.taken = 0.9 * pol.taken + accepted
    pol.rejected = 0.9 * pol.rejected + (1 if accepted < drafted or drafted == 0 else 0)
    alpha = pol.taken / (pol.taken + pol.rejected)
    if drafted:
        pol.acceptance = 0.7 * pol.acceptance + 0.3 * (accepted / drafted)
    token_cost = row_cost + (model_cost[1] if model_cost else 0.0)
    pol.length, rate = best_length(alpha, token_cost, cfg.max_draft)
    off = rate < 1.0 or (drafted and pol.acceptance < cfg.off_below)
    if model_cost is not None:
        now = (accepted + 1) / (1.0 + model_cost[0] + drafted * row_cost)
        pol.gain = now if pol.gain is None else 0.7 * pol.gain + 0.3 * now
        off = off or pol.gain < 1.0
    if off:
        _switch_off(pol, step, cfg)
    elif drafted and accepted == drafted:
        pol.backoff = 0


def _switch_off(pol: RowPolicy, step: int, cfg) -> None:
    pol.backoff = cfg.retry_after if pol.backoff == 0 else 2 * pol.backoff
    pol.off_until = step + pol.backoff
    pol.acceptance, pol.gain = 1.0, None  # a fresh start when it retries
