"""Measured trials of calibration: a configuration on fixed windows of one corpus split, journaled.

``TrialRunner`` measures configurations against the stock model on the same windows (serially,
or as Ray tasks through ``parallel.map_calls``), keeps every trial in a resumable journal keyed
by what its numbers depend on, and ``WorstDomainRunner`` binds several splits at once (the worst
one counts). The search over levels that uses them is ``calibrate``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .config import MECHANISMS, Config
from .errors import QuicksilverError
from .results_io import code_fingerprint

OBJECTIVES = ("flops", "bitflops", "time", "decode-time")
TIMED = ("time", "decode-time")  # objectives whose trials rerun the stock model interleaved
# The decode-time objective: greedy generation on this many calibration prompts of this many tokens.
DECODE_PROMPTS, DECODE_PROMPT_TOKENS, DECODE_NEW_TOKENS = 4, 48, 32


def config_key(config: Config) -> str:
    """A canonical key for a config's settings (its name and provenance ignored)."""
    data = config.to_dict()
    return json.dumps({k: data[k] for k in MECHANISMS if data[k]["enabled"]}, sort_keys=True)


def acting_config(config: Config, window: int) -> Config:
    """The config as it acts on ``window``-token contexts: position-window KV skipping whose sinks
    and recent window cover the context drops no key, so its section is turned off (the engine then
    attends like the stock model, and a halted token's K/V are propagated either way). A trial
    of such a config is measured, and journaled, as this one."""
    kv = config.kv
    if kv.enabled and not kv.rule.selects and kv.recent_window is not None and window < kv.sink_tokens + kv.recent_window + 1:
        return Config.from_dict({**config.to_dict(), "kv": {"enabled": False}, "name": "custom", "calibration": None})
    return config


@dataclass
class Trial:
    """One measured configuration on the calibration windows (sums over all scored tokens)."""

    key: str
    nll: float
    count: int
    flops: int
    bit_flops: float
    seconds: float
    base_seconds: float | None = None  # the stock model, interleaved (time objective only)


@dataclass
class Baseline:
    nll: float
    count: int
    flops: int
    seconds: float


class TrialRunner:
    """Measures configs on fixed calibration windows, with a resumable journal."""

    def __init__(self, model, tokenizer, ids: torch.Tensor, window: int, bos_id: int | None, corpus: str,
                 objective: str, context: dict, journal: Path | None, ray: str | None = None, read_only: bool = False):
        from .evaluate import StockRunner, score_windows
        from .models import ModelSource

        self.ray = ray  # a Ray address: prefetch() measures trials as Ray tasks
        self.source = ModelSource(context["model"], context["dtype"], context["device"]).keep((model, tokenizer))

        self.model, self.tokenizer, self.ids, self.window, self.bos_id = model, tokenizer, ids, window, bos_id
        self.corpus, self.objective = corpus, objective
        self.device = next(model.parameters()).device
        if objective == "decode-time":  # its seconds are generation seconds: never shared with other objectives' trials
            context = {**context, "timing": "decode"}
        context = {**context, "code": code_fingerprint()}  # trials of other code are never resumed
        self.context = hashlib.sha256(json.dumps(context, sort_keys=True).encode()).hexdigest()[:16]
        self.journal = journal
        self.trials: dict[str, Trial] = {}
        self.resumed = 0
        self.baseline: Baseline | None = None
        if journal is not None and journal.is_file():
            for line in journal.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by an interruption
                if entry.get("context") != self.context:
                    continue
                if "trial" in entry:
                    self.trials[entry["trial"]["key"]] = Trial(**entry["trial"])
                elif "baseline" in entry and objective not in TIMED:  # timed objectives re-time the stock model
                    self.baseline = Baseline(**entry["baseline"])
            self.resumed = len(self.trials)
        self.read_only = read_only  # only what the journal holds: nothing is measured (``known`` answers)
        if self.baseline is None and not read_only:
            # The stock model's totals are deterministic: measured once per context, then read
            # back from the journal (a search run in chunks does not pay for it each time).
            base = score_windows([StockRunner(model)], ids, window, window - 1, bos_id, self.device, warmup=objective == "time")[0]
            self.baseline = Baseline(base.nll, base.count, base.flops, base.seconds)
            if journal is not None and objective not in TIMED:
                with open(journal, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"context": self.context, "baseline": asdict(self.baseline)}) + "\n")

    def _known(self, key: str) -> Trial | None:
        known = self.trials.get(key)
        return known if known is not None and (self.objective not in TIMED or known.base_seconds is not None) else None

    def _record(self, trial: Trial) -> None:
        self.trials[trial.key] = trial
        if self.journal is not None:
            with open(self.journal, "a", encoding="utf-8") as f:
                f.write(json.dumps({"context": self.context, "trial": asdict(trial)}) + "\n")

    def known(self, config: Config) -> Trial | None:
        """The journaled trial of ``config`` (the stock totals for an all-off config), or None."""
        config = acting_config(config, self.window)
        if config.is_off and self.baseline is not None:
            b = self.baseline
            return Trial(config_key(config), b.nll, b.count, b.flops, float(b.flops), b.seconds, b.seconds)
        return self._known(config_key(config)) if self.baseline is not None else None

    def measure(self, config: Config) -> Trial:
        if self.read_only:
            raise QuicksilverError("this trial runner only reads its journal")
        config = acting_config(config, self.window)
        key = config_key(config)
        known = self._known(key)
        if known is not None:
            return known
        trial = self._run([config])[0]
        self._record(trial)
        return trial

    def prefetch(self, configs: list[Config]) -> None:
        """With Ray, measure the configs not yet known as parallel tasks (journaled in order); serially, nothing."""
        if self.ray is None:
            return  # measure() runs each when the search reaches it
        todo = [c for c in dict((config_key(c), c) for c in configs).values() if self._known(config_key(c)) is None]
        for trial in self._run(todo):
            self._record(trial)

    def _run(self, configs: list[Config]) -> list[Trial]:
        from .parallel import map_calls

        b = self.baseline
        calls = [(self.source, self.ids, self.window, self.bos_id, self.corpus, self.objective, c.to_dict()) for c in configs
                 if not c.is_off]
        measured = iter(map_calls(measure_trial, calls, self.ray, self.device.type == "cuda"))
        return [Trial(config_key(c), b.nll, b.count, b.flops, float(b.flops), b.seconds, b.seconds) if c.is_off else next(measured)
                for c in configs]

    def cost(self, trial: Trial) -> float:
        """Relative perplexity increase against the stock model."""
        return math.exp(trial.nll / trial.count - self.baseline.nll / self.baseline.count) - 1.0

    def gain(self, trial: Trial) -> float:
        """Fraction of the objective saved: FLOPs, bit-weighted FLOPs, or wall-clock time."""
        if self.objective == "flops":
            return 1.0 - trial.flops / self.baseline.flops
        if self.objective == "bitflops":
            return 1.0 - trial.bit_flops / self.baseline.flops
        return 1.0 - trial.seconds / trial.base_seconds


class WorstDomainRunner:
    """Several corpora's TrialRunners as one: cost is the worst corpus's, saving the pooled one.

    ``measure`` returns one Trial per corpus; ``cost`` is the largest relative perplexity
    increase among them (so a point fits only if it fits on every corpus) and ``gain`` the
    fraction of the objective saved over all corpora together.
    """

    def __init__(self, runners: dict[str, TrialRunner]):
        self.runners = runners
        self.worst = {name: 0 for name in runners}  # how often each corpus was the worst, to measure it first

    def measure(self, config: Config) -> dict[str, Trial]:
        return {name: r.measure(config) for name, r in self.runners.items()}

    def measure_within(self, config: Config, target: float) -> dict[str, Trial]:
        """Like ``measure``, but stop at the first corpus above ``target``: the point cannot fit,
        so the others need not be measured (its cost is then a lower bound, still above target).
        The corpus that was the worst most often is measured first."""
        trials = {}
        for name in sorted(self.runners, key=lambda n: -self.worst[n]):
            trials[name] = self.runners[name].measure(config)
            if self.runners[name].cost(trials[name]) > target:
                break
        costs = self.costs(trials)
        self.worst[max(costs, key=costs.get)] += 1
        return trials

    def costs(self, trials: dict[str, Trial]) -> dict[str, float]:
        return {name: self.runners[name].cost(t) for name, t in trials.items()}

    def cost(self, trials: dict[str, Trial]) -> float:
        return max(self.costs(trials).values())

    def gain(self, trials: dict[str, Trial]) -> float:
        spent = base = 0.0
        for name, t in trials.items():
            r = self.runners[name]
            if r.objective == "flops":
                spent, base = spent + t.flops, base + r.baseline.flops
            elif r.objective == "bitflops":
                spent, base = spent + t.bit_flops, base + r.baseline.flops
            else:
                spent, base = spent + t.seconds, base + t.base_seconds
        return 1.0 - spent / base

    @property
    def resumed(self) -> int:
        return sum(r.resumed for r in self.runners.values())


def measure_trial(source, ids: torch.Tensor, window: int, bos_id: int | None, corpus: str, objective: str,
                  config: dict) -> Trial:
    """One config on the calibration windows (the stock model interleaved for the time objectives).

    A plain function of picklable arguments: ``TrialRunner`` calls it here or as a Ray task.
    """
    from .evaluate import EngineRunner, StockRunner, make_engine, run_ledger, score_windows

    model, tokenizer = source.load()
    cfg = Config.from_dict(config)
    engine = make_engine(model, tokenizer, cfg, corpus)
    runners = [EngineRunner(engine)]
    if objective == "decode-time":  # quality teacher-forced; time from generation against HF generate
        run = score_windows(runners, ids, window, window - 1, bos_id, source.device, warmup=False)[0]
        seconds, base_seconds = decode_seconds(model, tokenizer, engine, ids, source.device)
        return Trial(config_key(cfg), run.nll, run.count, run.flops, float(run_ledger(run).as_dict()["bit_weighted_flops"]),
                     seconds, base_seconds)
    if objective == "time":
        runners.insert(0, StockRunner(model))
    totals = score_windows(runners, ids, window, window - 1, bos_id, source.device, warmup=objective == "time")
    run = totals[-1]
    return Trial(config_key(cfg), run.nll, run.count, run.flops, float(run_ledger(run).as_dict()["bit_weighted_flops"]),
                 run.seconds, totals[0].seconds if objective == "time" else None)


def decode_seconds(model, tokenizer, engine, ids: torch.Tensor, device) -> tuple[float, float]:
    """Seconds of greedy generation on fixed calibration prompts: the engine and HF ``generate``,
    alternating prompt by prompt after a warm-up; both produce exactly the same number of tokens."""
    import time

    from .decoding import generate

    step = max((ids.numel() - DECODE_PROMPT_TOKENS) // DECODE_PROMPTS, 1)
    prompts = [ids[i * step : i * step + DECODE_PROMPT_TOKENS].to(device) for i in range(DECODE_PROMPTS)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    hf = lambda p, n: model.generate(p[None], max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad)  # noqa: E731
    ours = lambda p, n: generate(engine, p, n)  # noqa: E731
    hf(prompts[0], 2), ours(prompts[0], 2)
    totals = [0.0, 0.0]
    for i, p in enumerate(prompts):
        for j in ((0, 1) if i % 2 == 0 else (1, 0)):
            t0 = time.perf_counter()
            (ours if j == 0 else hf)(p, DECODE_NEW_TOKENS)
            totals[j] += time.perf_counter() - t0
    return totals[0], totals[1]


def split_runner(hf_model, tokenizer, model: str, corpus: str, split: str, window: int, max_tokens: int | None, bos: bool,
                 device, journal: str | Path | None, objective: str = "flops", ray: str | None = None,
                 read_only: bool = False) -> TrialRunner:
    """A TrialRunner on one split of an offline corpus (the stock model's totals from the journal when there)."""
    from .corpora import load_corpus
    from .evaluate import tokenize_documents

    ids = tokenize_documents(tokenizer, load_corpus(corpus, split).documents, max_tokens)
    # What a trial's numbers depend on (not the levels: a trial is keyed by its own settings).
    context = {"model": model, "corpus": corpus, "window": window, "tokens": int(ids.numel()),
               "dtype": str(hf_model.dtype).removeprefix("torch."), "device": str(device)}
    if split != "calibration":
        context["split"] = split
    return TrialRunner(hf_model, tokenizer, ids, window, tokenizer.bos_token_id if bos else None, corpus, objective,
                       context, Path(journal) if journal else None, ray, read_only)


def _ledger_check(runner: TrialRunner, trial: Trial, budget: float) -> dict:
    """A test split's line from the engine alone against the stock model's journaled totals (no timing)."""
    b = runner.baseline
    cost = runner.cost(trial)
    return {
        "tokens": trial.count,
        "perplexity": math.exp(trial.nll / trial.count),
        "baseline_perplexity": math.exp(b.nll / b.count),
        "relative_delta_perplexity": cost,
        "flop_reduction": 1.0 - trial.flops / b.flops,
        "bit_weighted_flop_reduction": 1.0 - trial.bit_flops / b.flops,
        "speedup": None,
        "within_budget": cost <= budget,
    }
