"""The drafting side of the decode core: which sequences get a draft, from which source, how
long, and whether it is verified; and what each source did.

Every step, each sequence of the batch may get a draft of a few tokens from one draft source.
Drafting adapts per sequence and source, by measured costs: a plain step's time and a verify
pass's time are fitted while the passes run (``StepCosts``), a model draft's pass is timed, and
each sequence keeps decayed counts of accepted and rejected drafted tokens (``policy``). From
these the draft length that maximises expected tokens per unit of time is chosen; where no
length beats a plain step, or a model draft's realised gain falls under 1, the source is
switched off for that sequence for a while (doubling each time). At a batch, a draft is
verified only where its expected tokens pay for its verified rows and for leaving the pooled
one-token step (``choose_drafts``). The decode core (``decoding.batch``) runs the passes and
accepts; it reports back through ``timed``, ``accepted`` and ``after_pass``.
"""

from __future__ import annotations

from .costs import StepCosts, choose_drafts, expected_accepted
from .policy import RowPolicy, SourceStats, adapt, alpha, expected_rate, model_cost
from .sources import Draft, DraftSource

NO_DRAFT = Draft([])


class Drafter:
    """Drafts for the sequences of one decode batch (``sources`` in the configured order).

    Parameters
    ----------
    sources : the draft sources (``sources.make_sources``)
    cfg : the engine's ``SpeculativeDecoding`` settings
    """

    def __init__(self, sources: list[DraftSource], cfg):
        self.sources, self.cfg = sources, cfg
        self.by_name = {s.name: s for s in sources}
        self.policy: dict[int, dict[str, RowPolicy]] = {}  # sequence id -> source -> its policy
        self.stats = {s.name: SourceStats() for s in sources}
        self.plain = SourceStats()  # steps where a sequence had no draft
        self.costs = StepCosts()
        self.step = 0
        self.declined_run, self.probe_after = 0, cfg.retry_after
        self.realized = None  # running gain of the verify passes at a batch: their tokens per second against a plain step's
        # Engine passes by kind, drafts made but not verified, rows verified without a draft beside others' drafts.
        self.passes = {"plain": 0, "verify": 0, "declined": 0, "mixed_rows": 0}
        self._row_cost = 0.0  # a verified row, in plain steps, as this step estimated it

    def _policy(self, seq) -> dict[str, RowPolicy]:
        pol = self.policy.get(seq.id)
        if pol is None:
            first = min(self.cfg.initial_draft, self.cfg.max_draft)
            pol = self.policy[seq.id] = {s.name: RowPolicy(first) for s in self.sources}
        return pol

    def propose(self, seqs: list, pooled: bool) -> dict[int, tuple[str, Draft]]:
        """Drafts to verify this step: sequence index -> (source name, draft).

        Each sequence asks its sources best expected rate first (ties: in the configured order);
        a source with nothing to propose passes it on to the next. Then, at a batch, only the
        drafts whose expected tokens pay for their rows and for leaving the pooled step are kept.
        """
        self.step += 1
        step, cfg, B = self.step, self.cfg, len(seqs)
        self._row_cost = row_cost = self.costs.row_cost(B)
        plain_s = self.costs.plain_step(B)
        drafts: dict[int, tuple[str, Draft]] = {}
        queue = {}
        for i, seq in enumerate(seqs):
            room = seq.max_new_tokens - len(seq.tokens) - 1  # the verifier adds one token of its own
            if room > 0:
                pol = self._policy(seq)
                ranked = [(-expected_rate(pol[src.name], src, row_cost, plain_s, cfg), n, src)
                          for n, src in enumerate(self.sources) if pol[src.name].off_until <= step]
                queue[i] = [(src, room) for *_, src in sorted(ranked, key=lambda x: x[:2])]
        while queue:
            for src in self.sources:
                asking = [(i, min(self.policy[seqs[i].id][src.name].length, room))
                          for i, q in queue.items() for s_, room in q[:1] if s_ is src]
                if not asking:
                    continue
                who = [seqs[i] for i, _ in asking]
                samplers = None if all(s.sampler.greedy for s in who) else [s.sampler for s in who]
                proposals = src.propose([s.id for s in who], [s.context for s in who], [k for _, k in asking],
                                        [s.cache for s in who], samplers)
                for (i, _), d in zip(asking, proposals):
                    if d.tokens:
                        drafts[i] = (src.name, d)
                    elif d.passes:  # a model draft that spent passes and proposed nothing: a cost with no gain
                        adapt(self.policy[seqs[i].id][src.name], 0, 0, step, cfg, row_cost, model_cost(src, d, self.costs, B))
                    queue[i] = [] if d.tokens else queue[i][1:]
            queue = {i: q for i, q in queue.items() if q}
        # One sequence: the per-sequence policy already weighs the draft against a plain step by
        # the same measured costs (``adapt``), and a declined draft leaves its acceptance estimate
        # stale (lookup's matches come in bursts), so every draft is verified.
        keep = list(drafts) if B == 1 else choose_drafts(
            [(i, len(d.tokens), expected_accepted(alpha(self.policy[seqs[i].id][name]), len(d.tokens)))
             for i, (name, d) in drafts.items()], B, self.costs, pooled)
        if B > 1 and self.realized is not None and self.realized < 1.0:
            keep = []  # the passes chosen by expectation have not paid in fact: plain steps (and probes)
        if drafts and not keep:
            # Declining rests on measurements that only verify passes renew (one slow pass, and
            # drafting would stay off for good): after a run of declined steps, verify the
            # likeliest draft anyway (a pass of few rows), the run doubling each time.
            self.declined_run += 1
            if self.declined_run >= self.probe_after:
                keep = [max(drafts, key=lambda i: alpha(self.policy[seqs[i].id][drafts[i][0]]))]
                self.declined_run, self.probe_after = 0, 2 * self.probe_after
        elif keep:
            self.declined_run = 0
        self.passes["declined"] += len(drafts) - len(keep)
        return {i: drafts[i] for i in keep}

    def timed(self, sequences: int, rows: int, drafted: int, seconds: float, pooled: bool) -> None:
        """One pass of the verifier over ``rows`` rows of ``sequences`` sequences, ``drafted`` of them with a draft."""
        self.passes["verify" if drafted else "plain"] += 1
        self.passes["mixed_rows"] += sequences - drafted if drafted else 0
        if drafted:
            self.costs.add_verify(sequences, rows, seconds)
        else:
            self.costs.add_plain(sequences, seconds)
            if not pooled:  # a plain step is a ragged pass without drafts: one more point of the same fit
                self.costs.add_verify(sequences, rows, seconds)

    def accepted(self, seq, name: str | None, d: Draft, n: int, emitted: int, sequences: int) -> None:
        """Sequence ``seq`` took ``n`` of its ``name`` draft ``d`` and emitted ``emitted`` tokens this step."""
        s = self.stats[name] if name else self.plain
        s.steps += 1
        s.drafted += len(d.tokens)
        s.accepted += n
        s.emitted += emitted
        if name:
            src = self.by_name[name]
            adapt(self.policy[seq.id][name], len(d.tokens), n, self.step, self.cfg, self._row_cost,
                  model_cost(src, d, self.costs, sequences))
            src.update(seq.id, n)

    def after_pass(self, drafted: bool, sequences: int, emitted: int, seconds: float) -> None:
        """The realized gain of a verify pass at a batch: its tokens per second against a plain step's."""
        plain_s = self.costs.plain_step(sequences)
        if drafted and sequences > 1 and plain_s:
            gain = (emitted / seconds) / (sequences / plain_s)
            self.realized = gain if self.realized is None else 0.7 * self.realized + 0.3 * gain

    def forget(self, seq) -> None:
        """``seq`` left the batch (finished or cancelled)."""
        self.policy.pop(seq.id, None)
        for src in self.sources:
            src.forget(seq.id)

    def summary(self) -> dict:
        """What speculation did: verify steps, tokens per step, per source and overall acceptance, passes by kind."""
        plain, stats = self.plain, self.stats
        verify_steps = plain.steps + sum(s.steps for s in stats.values())
        emitted = plain.emitted + sum(s.emitted for s in stats.values())
        drafted = sum(s.drafted for s in stats.values())
        accepted = sum(s.accepted for s in stats.values())
        return {
            "verify_steps": verify_steps,
            "tokens_per_step": emitted / verify_steps if verify_steps else 0.0,
            "drafted": drafted, "accepted": accepted,
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "sources": {name: s.as_dict() for name, s in stats.items()},
            "undrafted_steps": plain.steps,
            "plain_passes": self.passes["plain"], "verify_passes": self.passes["verify"],
            "declined_drafts": self.passes["declined"], "undrafted_rows_in_verify": self.passes["mixed_rows"],
            "draft_flops": sum(s.ledger.total_flops for s in self.sources if s.runs_passes),
        }
