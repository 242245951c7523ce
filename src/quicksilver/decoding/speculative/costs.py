"""What drafting costs and yields, measured as the passes run: the verifier's step costs, the
draft length that pays best, and which drafts to verify at a batch.

A plain step's time is fitted as p + q * B (B sequences, one row each); a verify pass's as
a + b * rows + s * B (``StepCosts``, decayed least squares: older passes weigh less). From these
and each sequence's estimated acceptance, ``best_length`` picks the draft length that maximises
expected tokens per unit of time, and ``choose_drafts`` the drafts whose expected tokens pay for
their verified rows and, at a batch, for leaving the pooled one-token step.
"""

from __future__ import annotations

import torch


class _DecayedFit:
    """Decayed least squares of y on (1, x1, x2): sums of the normal equations, older passes weigh less."""

    def __init__(self, decay: float = 0.95):
        self.decay = decay
        self.m = [[0.0] * 3 for _ in range(3)]
        self.v = [0.0] * 3

    def add(self, x1: float, x2: float, y: float) -> None:
        f = (1.0, x1, x2)
        for r in range(3):
            self.v[r] = self.decay * self.v[r] + f[r] * y
            for c in range(3):
                self.m[r][c] = self.decay * self.m[r][c] + f[r] * f[c]

    @property
    def weight(self) -> float:
        return self.m[0][0]

    def mean(self) -> tuple[float, float, float]:
        w = self.m[0][0]
        return self.m[0][1] / w, self.m[0][2] / w, self.v[0] / w

    def varies(self, j: int) -> bool:
        """Whether x_j has varied enough to fit its slope (at least ~5 passes, spread of 1/2 or more)."""
        w = self.m[0][0]
        return w >= 4 and w * self.m[j][j] - self.m[0][j] ** 2 >= 0.5 * w * w

    def predict(self, x1: float, x2: float) -> float | None:
        """y at (x1, x2); slopes only along the inputs that varied, none negative; None until x1 varied."""
        if not self.varies(1):
            return None
        cols = [0, 1] + ([2] if self.varies(2) else [])
        m = torch.tensor([[self.m[r][c] for c in cols] for r in cols], dtype=torch.float64)
        v = torch.tensor([self.v[r] for r in cols], dtype=torch.float64)
        try:
            coef = torch.linalg.solve(m, v).tolist()
        except RuntimeError:  # singular: the inputs moved together
            return None
        if len(coef) == 3:
            coef[2] = max(coef[2], 0.0)
        coef[1] = max(coef[1], 0.0)
        # Refit the intercept through the mean with the (clamped) slopes.
        m1, m2, my = self.mean()
        slopes = coef[1] * (x1 - m1) + (coef[2] * (x2 - m2) if len(coef) == 3 else 0.0)
        return max(my + slopes, 1e-9)


class StepCosts:
    """Measured wall time of the verifier's two kinds of pass, as functions of B, the sequences stepped.

    A step where no sequence has a draft is a plain one-token step: with the caches rows of one
    pool it is the pooled decode step that speculation-off generation takes (one attention call
    per layer for the whole batch); its time is fitted as p + q * B. A step with drafts is a
    ragged verify pass (one attention call per sequence and layer), fitted as
    a + b * rows + s * B. At batch 1 the two cost about the same; at batch 8 on a CPU leaving the
    pooled step cost more than half a step by itself, so drafts must bring that back before
    they are verified (``choose_drafts``). Rows finish at different times, so B moves during a
    generation: until B has varied, the fits assume the cost does not depend on it.
    """

    def __init__(self, prior: float = 0.03):
        self.prior = prior
        self._plain = _DecayedFit()  # x1 = B
        self._verify = _DecayedFit()  # x1 = rows, x2 = B
        self.plain_seen: set[int] = set()  # batch sizes a plain step was measured at

    @staticmethod
    def _clip(guess: float | None, seconds: float, most: float) -> float:
        # Timing noise only ever adds (another process, a first call that measures kernels): one
        # sample counts at most ``most`` times the prediction. Tight for plain steps, whose
        # overestimate would make drafts look better than they are; loose for verify passes,
        # whose fit is rougher and whose overestimate only makes drafting more careful.
        return seconds if guess is None else min(seconds, most * guess)

    @property
    def measured(self) -> tuple[bool, bool]:
        """Whether a plain step and a verify pass have been measured."""
        return self._plain.weight > 0, self._verify.weight > 0

    def add_plain(self, sequences: int, seconds: float) -> None:
        guess = self.plain_step(sequences) if self.measured[0] else None
        self._plain.add(sequences, 0.0, self._clip(guess, seconds, 1.2))
        self.plain_seen.add(sequences)

    def add_verify(self, sequences: int, rows: int, seconds: float) -> None:
        guess = self.verify_time(sequences, rows) if self.measured[1] else None
        self._verify.add(rows, sequences, self._clip(guess, seconds, 3.0))

    def plain_step(self, sequences: int) -> float | None:
        """Seconds of a plain step of ``sequences`` one-row sequences (None before one was measured)."""
        if self._plain.weight == 0:
            return None
        got = self._plain.predict(sequences, 0.0)
        if got is not None:
            return got
        # Measured at one batch size only: a sequence more costs what a verified row does.
        mean_seq, _, mean_y = self._plain.mean()
        a, b = self._verify.predict(1.0, sequences), self._verify.predict(2.0, sequences)
        slope = b - a if a is not None and b is not None else 0.0
        return max(mean_y + slope * (sequences - mean_seq), 1e-9)

    def verify_time(self, sequences: int, rows: int) -> float | None:
        """Seconds of a ragged verify pass of ``rows`` rows over ``sequences`` sequences.

        Until the fit has varied rows: the line through the plain step (a draft-free pass) and
        the mean of the passes measured, which puts all of the extra on the rows, so that small
        drafts look cheap and get tried (and measured) before they are ruled out.
        """
        if self._verify.weight == 0:
            return None
        got = self._verify.predict(rows, sequences)
        if got is not None:
            return got
        plain = self.plain_step(sequences)
        mean_rows, mean_seq, mean_y = self._verify.mean()
        if plain is None:
            return mean_y
        if mean_rows <= mean_seq:
            return plain * (1 + self.prior * (rows - sequences))
        slope = max((mean_y - plain) / (mean_rows - mean_seq), 0.0)
        return plain + slope * (rows - sequences)

    def row_cost(self, sequences: int) -> float:
        """One more verified row, in units of one sequence's share of a plain step."""
        plain = self.plain_step(sequences)
        extra, base = self.verify_time(sequences, sequences + 1), self.verify_time(sequences, sequences)
        if plain is None or extra is None or base is None:
            return self.prior
        return min(max((extra - base) * sequences / plain, 0.002), 1.0)


# A verify pass is taken over the plain step only when it promises this much more: its expected
# tokens come from acceptance estimates that run optimistic (a prior of 4:1, streaks of a row
# that loops) and from costs measured on a shared machine. At batch 1 a drafted row costs a few
# percent of a step, so the margin changes little there; at batch 8 on a CPU a verified row costs
# nearly a sequence's share of a plain step, and the margin keeps marginal drafts out.
VERIFY_MARGIN = 1.1


def choose_drafts(candidates: list[tuple[int, int, float]], sequences: int, costs: StepCosts,
                  pooled: bool) -> list[int]:
    """The sequences whose drafts to verify this step: the subset with the most tokens per second.

    ``candidates``: (sequence, drafted tokens, expected accepted tokens). Drafts are taken in
    order of expected tokens per verified row; each prefix of that order is scored as tokens
    per second of its verify pass, against ``sequences`` tokens per plain step (the pooled
    step when ``pooled``). Until both kinds of pass were measured, the one not yet measured is
    taken: every draft first, then (with a pool) none, and none again at each batch size the
    pooled step has not run at (as rows finish, B falls, and so does a plain step's cost).
    """
    if not candidates:
        return []
    has_plain, has_verify = costs.measured
    if not has_verify:
        return [i for i, _, _ in candidates]
    if pooled and sequences not in costs.plain_seen:  # a batch size new to the pooled step (rows finished)
        return []
    plain = costs.plain_step(sequences)
    if plain is None:
        return []
    order = sorted(candidates, key=lambda c: -c[2] / max(c[1], 1))
    best, best_rate = 0, VERIFY_MARGIN * sequences / plain
    rows, tokens = sequences, float(sequences)
    for m, (_, k, e) in enumerate(order, 1):
        rows += k
        tokens += e
        t = costs.verify_time(sequences, rows)
        if t is not None and tokens / t > best_rate:
            best, best_rate = m, tokens / t
    return [i for i, _, _ in order[:best]]


def expected_accepted(alpha: float, k: int) -> float:
    """Expected accepted tokens of a k-token draft, each accepted with probability ``alpha`` until the first rejection."""
    if alpha >= 1:
        return float(k)
    return alpha * (1.0 - alpha**k) / (1.0 - alpha)


def best_length(alpha: float, token_cost: float, max_draft: int) -> tuple[int, float]:
    """The draft length k that maximises expected tokens per unit of time, and that rate.

    A draft of k tokens, each accepted with probability ``alpha`` until the first rejection,
    yields (1 - alpha^(k+1)) / (1 - alpha) tokens (the verifier adds one) and costs a plain
    step plus ``token_cost`` plain steps per drafted token (its verify row, and its draft pass
    for a model draft). A plain step's rate is 1.
    """
    best, rate = 1, 0.0
    for k in range(1, max_draft + 1):
        tokens = k + 1.0 if alpha >= 1 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)
        now = tokens / (1.0 + k * token_cost)
        if now > rate:
            best, rate = k, now
    return best, rate
