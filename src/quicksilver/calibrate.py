"""Calibration to a quality budget: the cheapest configuration whose perplexity stays within it.

The paper sets its thresholds by hand. ``calibrate`` takes a budget (relative perplexity
increase, e.g. 1%) and searches the mechanisms' settings on the corpus's *calibration*
split, then checks the chosen configuration on the *test* split it never saw.

The search, every trial measured (never predicted) before it is accepted:

1. grid: each mechanism alone at each of its levels (``mechanism_levels``), mildest first,
   up to the first level that breaks the budget;
2. combine: every combination of levels is predicted from the grid (costs add, savings
   compose multiplicatively); the best predicted ones that fit are measured, best first;
3. refine: from the best measured point, move each mechanism one level up or down and
   keep the best move that still fits, until no move helps.

With several corpora (``corpus=["wiki", "news", "code"]``) every trial is measured on
each corpus's calibration split and the budget binds the *worst* of them: a config is
accepted only if it keeps the budget on every calibration split; the saving is the
objective summed over all of them. A point stops being measured at the first corpus that
breaks the budget (the corpus that was the worst most often goes first).

Search trials run the engine alone on the calibration windows and compare with the stock
model's totals measured once (FLOPs and perplexity are deterministic); with
``objective="time"`` each trial also reruns the stock model interleaved, so the speedup
compares like with like; ``objective="decode-time"`` keeps the teacher-forced perplexity
budget but times greedy generation on fixed calibration prompts against HF ``generate``. Every trial is appended to a journal (JSON lines) as it
finishes, so an interrupted search resumes where it stopped.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .config import MECHANISMS, Config
from .errors import QuicksilverError
from .trials import (  # noqa: F401  (the trial runners are part of calibrate's API, as before the split)
    OBJECTIVES, TIMED, Baseline, Trial, TrialRunner, WorstDomainRunner, _ledger_check, acting_config, config_key,
    decode_seconds, measure_trial, split_runner,
)

DEFAULT_MARGIN = 0.25

# Settings every level of a mechanism shares; the levels differ in the knob after them.
HALTING_BASE = {"min_layer": 10, "patience": 3, "tail_layers": 5, "skip": "mlp"}
FUSION_BASE = {"window": 4, "output": "delta"}
AMQ_BASE = {"decision_layer": 8, "group_size": 32}
# Static depth reduction (the halting baseline): the MLPs that cost least when every token
# skips them, cheapest first (docs/results/layer_map.md, calibration split).
STATIC_MLP_ORDER = (12, 11, 17, 5)


def mechanism_levels(window: int, objective: str = "flops") -> dict[str, list[tuple[str, dict]]]:
    """Each mechanism's settings from mildest to most aggressive, as (label, section settings).

    Level 0 (off) is implicit. KV windows are fractions of the context ``window``: a recent
    window at least as long as the context skips nothing. Wall-clock objectives also try
    AMQ's fastest-kernel level: int8 per output channel everywhere, the LM head included.
    """
    kv = []
    for num, den in ((3, 4), (1, 2), (3, 8), (1, 4), (3, 16), (1, 8), (1, 16)):
        w = max(window * num // den, 16)
        if w < window and all(w != s["recent_window"] for _, s in kv):
            kv.append((f"sinks 4 + recent {w}", {"sink_tokens": 4, "recent_window": w}))
    return {
        "halting": [(f"drift < {t}", {**HALTING_BASE, "threshold": t}) for t in (0.13, 0.16)],
        "kv": kv,
        "fusion": [(f"layer {layer}, cos >= {t}", {**FUSION_BASE, "layer": layer, "threshold": t})
                   for layer, t in ((24, 0.95), (20, 0.92), (16, 0.92), (12, 0.92))],
        "amq": ([("int8 per channel + int8 head", {"decision_layer": 8, "head_bits": 8})] if objective in TIMED else [])
        + [("int8 everywhere", {**AMQ_BASE})]
        + [(f"int4 below drift {t}", {**AMQ_BASE, "int4_below": t}) for t in (0.15, 0.2, 0.25, 0.3)],
    }


def baseline_levels() -> dict[str, list[tuple[str, dict]]]:
    """The matched baselines: static depth reduction and uniform quantization.

    The third, attention sinks + a recent window (StreamingLLM), is KV skipping's own policy:
    its rows are the KV rows (``mechanism_levels(window)["kv"]``).
    """
    static = [
        (f"every token skips MLP {', '.join(map(str, STATIC_MLP_ORDER[:n]))}",
         {"halting": {"enabled": True, "threshold": 2.0, "min_layer": 1, "patience": 1, "tail_layers": 1, "skip": "mlp",
                      "skippable_layers": sorted(STATIC_MLP_ORDER[:n])}})
        for n in range(1, len(STATIC_MLP_ORDER) + 1)
    ]
    quant = [
        ("uniform int8 (int8 kernel, SmoothQuant 0.65)", {"amq": {"enabled": True, "uniform_bits": 8, "smoothing": 0.65, "activation_quant": True}}),
        ("uniform int4 (group 32)", {"amq": {"enabled": True, "uniform_bits": 4, "group_size": 32}}),
    ]
    return {"static depth reduction": static, "uniform quantization": quant}


def point_config(point: dict[str, int], levels: dict[str, list[tuple[str, dict]]], name: str = "custom") -> Config:
    """The Config of a point: mechanism -> level (0 off, i the i-th entry of its levels)."""
    data: dict = {"name": name}
    for mech, level in point.items():
        if level:
            data[mech] = {"enabled": True, **levels[mech][level - 1][1]}
    return Config.from_dict(data)


def parse_budget(text: str) -> float:
    """'1%' -> 0.01, '0.01' -> 0.01; a budget must lie strictly between 0 and 100%."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise QuicksilverError(f"budget {text!r} is not a number: give a percentage like 1% or a fraction like 0.01") from None
    if not raw.endswith("%") and value >= 1:
        raise QuicksilverError(f"budget {text!r} is ambiguous: give a percentage like {raw}% or a fraction below 1")
    if not 0 < value < 1 or math.isnan(value):
        raise QuicksilverError(f"budget {text!r} must be above 0% and below 100%")
    return value


@dataclass
class Step:
    """One trial as the search saw it (for the report)."""

    phase: str
    point: dict
    cost: float
    gain: float
    fits: bool


def search(runner: TrialRunner, levels: dict[str, list[tuple[str, dict]]], target: float,
           on_trial: Callable[[int, int, str], None] | None = None, max_measured_combos: int = 4) -> tuple[dict, list[Step]]:
    """Grid, combine, refine (see the module docstring). Returns the best point and every step."""
    mechs = list(levels)
    off = {m: 0 for m in mechs}
    steps: list[Step] = []
    planned = 1 + sum(len(v) for v in levels.values()) + max_measured_combos + 2 * len(mechs)

    def measure(point: dict, phase: str) -> Step:
        if on_trial:
            on_trial(len(steps), max(planned, len(steps) + 1), f"{phase}: {_describe(point, levels)}")
        config = point_config(point, levels)
        within = getattr(runner, "measure_within", None)  # several corpora: stop at the first one that breaks the target
        trial = within(config, target) if within is not None else runner.measure(config)
        c, g = runner.cost(trial), runner.gain(trial)
        step = Step(phase, dict(point), c, g, c <= target)
        steps.append(step)
        return step

    prefetch = getattr(runner, "prefetch", lambda configs: None)  # TrialRunner with Ray: measure these in parallel
    prefetch([point_config({**off, m: i}, levels) for m in mechs for i in range(len(levels[m]) + 1)])
    best = measure(off, "grid")
    alone: dict[str, list[Step]] = {}
    for m in mechs:
        # Levels go from mildest to most aggressive: the first level that breaks the target ends
        # this mechanism's grid (the harsher ones would cost more still; refine may try one).
        alone[m] = []
        for i in range(1, len(levels[m]) + 1):
            alone[m].append(measure({**off, m: i}, "grid"))
            if not alone[m][-1].fits:
                break
        for s in alone[m]:
            if s.fits and s.gain > best.gain:
                best = s

    # Combine: predictions from the single-mechanism grid, measured best first.
    def predicted(point):
        cost, kept = 0.0, 1.0
        for m, i in point.items():
            if i:
                cost += alone[m][i - 1].cost
                kept *= 1.0 - alone[m][i - 1].gain
        return cost, 1.0 - kept

    combos = []
    for combo in itertools.product(*[range(len(alone[m]) + 1) for m in mechs]):
        point = dict(zip(mechs, combo))
        if sum(1 for i in combo if i) < 2:
            continue
        cost, gain = predicted(point)
        if cost <= target and gain > best.gain:
            combos.append((gain, point))
    combos.sort(key=lambda item: -item[0])
    for _, point in combos[:max_measured_combos]:
        s = measure(point, "combine")
        if s.fits and s.gain > best.gain:
            best = s
            break

    # Refine: one-level moves from the best point while one helps.
    seen = {json.dumps(s.point, sort_keys=True) for s in steps}
    improved = True
    while improved:
        improved = False
        moves = []
        for m in mechs:
            for d in (1, -1):
                i = best.point[m] + d
                if 0 <= i <= len(levels[m]):
                    point = {**best.point, m: i}
                    if json.dumps(point, sort_keys=True) not in seen:
                        moves.append(point)
        candidates = []
        prefetch([point_config(p, levels) for p in moves])
        for point in moves:
            seen.add(json.dumps(point, sort_keys=True))
            candidates.append(measure(point, "refine"))
        fitting = [s for s in candidates if s.fits and s.gain > best.gain]
        if fitting:
            best = max(fitting, key=lambda s: s.gain)
            improved = True
    return best.point, steps


def _describe(point: dict, levels: dict) -> str:
    parts = [f"{m} {levels[m][i - 1][0]}" for m, i in point.items() if i]
    return "; ".join(parts) or "off"


def calibrate(
    budget: float,
    model: str = "smollm2-135m",
    corpus: str | list[str] = "wiki",
    objective: str = "flops",
    window: int = 4096,
    max_tokens: int | None = 8192,
    margin: float = DEFAULT_MARGIN,
    mechanisms: list[str] | None = None,
    heldout: list[str] | None = None,
    journal: str | Path | None = None,
    dtype: str = "auto",
    device: str = "cpu",
    loaded: tuple | None = None,
    on_trial: Callable[[int, int, str], None] | None = None,
    on_window: Callable[[int, int], None] | None = None,
    ray: str | None = None,
    timed_checks: bool = True,
    also_windows: list[int] | None = None,
) -> tuple[Config, dict]:
    """Search the cheapest config within ``budget`` on the calibration split, then check it on test splits.

    Parameters
    ----------
    budget : float
        Allowed relative perplexity increase (0.01 is 1%).
    corpus : str or list of str, default "wiki"
        Offline corpora to search on (their calibration splits). With several, the chosen
        config keeps the budget on every one of them (the worst corpus binds).
    objective : {"flops", "bitflops", "time", "decode-time"}
        What to minimize: FLOPs executed, bit-weighted FLOPs (quantized linears count at
        bits/16), prefill wall-clock time against the stock model, or decode wall-clock time
        (greedy generation against HF ``generate``, same dtype).
    window, max_tokens : int
        Context length and tokens of each split (calibration and test alike).
    margin : float
        The search keeps the calibration increase within ``budget * (1 - margin)``, leaving
        the rest for the difference between calibration and unseen text.
    mechanisms : list of str, optional
        Which mechanisms may be turned on (default all four).
    heldout : list of str, optional
        Further corpora whose test split the chosen config is evaluated on (e.g. ``news``);
        every searched corpus's test split is always checked.
    journal : path, optional
        JSON-lines file of measured trials; a rerun with the same settings resumes from it.
    ray : str, optional
        A Ray address (``local``: a local cluster): independent trials run as Ray tasks,
        with the same journal and the same choice as serially.
    timed_checks : bool, default True
        Check each test split with the stock model interleaved (``evaluate_model``: a speedup
        too). False: the engine alone against the stock model's totals measured once per
        split and journaled (perplexity and FLOPs are the same; ``speedup`` is None), about
        a quarter of the work. Timed objectives always time their checks.
    also_windows : list of int, optional
        Further context lengths (e.g. ``[512]``) at which the chosen config must keep the
        budget too: each corpus's calibration split at each of them binds like another corpus
        (``NAME@N`` in the provenance), and its test split is checked there as well. The
        levels searched still come from ``window``. A KV window that covers such a context
        drops no key there, so it costs nothing to check (``acting_config``).

    Returns the chosen Config (its ``calibration`` field holds the provenance and held-out
    results) and a report dict.
    """
    from .corpora import HUB_CORPORA, OFFLINE_CORPORA
    from .evaluate import evaluate_model, window_plan
    from .models import LoadedModel, as_loaded, load_model, parse_device

    if objective not in OBJECTIVES:
        raise QuicksilverError(f"unknown objective {objective!r} (use {', '.join(OBJECTIVES)})")
    if not 0 <= margin < 1:
        raise QuicksilverError(f"margin must be in [0, 1), got {margin}")
    mechanisms = list(mechanisms or MECHANISMS)
    unknown = [m for m in mechanisms if m not in MECHANISMS]
    if unknown:
        raise QuicksilverError(f"unknown mechanism(s) {', '.join(unknown)} (known: {', '.join(MECHANISMS)})")
    heldout = list(heldout or [])
    corpora = list(dict.fromkeys([corpus] if isinstance(corpus, str) else corpus))
    if not corpora:
        raise QuicksilverError("calibrate needs at least one corpus")
    for name in [*corpora, *heldout]:
        if name not in OFFLINE_CORPORA:
            if name not in HUB_CORPORA:
                raise QuicksilverError(f"unknown corpus {name!r} (calibrate takes {' or '.join(OFFLINE_CORPORA)}: corpora with calibration and test splits)")
            raise QuicksilverError(f"calibrate needs corpora with separate calibration and test splits ({', '.join(OFFLINE_CORPORA)}), got {name!r}")
    if max_tokens is not None and max_tokens < 2:
        raise QuicksilverError(f"max-tokens must be at least 2, got {max_tokens}")
    window_plan(window, window, window - 1, bos=False)  # rejects a window below 2 before loading
    dev = parse_device(device)
    if loaded is not None:  # the older spelling: the loaded model names itself
        model = as_loaded(loaded)
    lm = model if isinstance(model, LoadedModel) else load_model(model, dtype=dtype, device=dev)
    hf_model, tokenizer = lm
    model = lm.name  # results and journals name the model as it was loaded
    if window > lm.spec.max_positions:
        raise QuicksilverError(f"window {window} is longer than the model's context of {lm.spec.max_positions} tokens")
    bos = lm.bos_per_window
    all_levels = mechanism_levels(window, objective)
    # AMQ changes how many bits a multiply-add uses, not how many there are: under the plain
    # FLOP objective it can only cost perplexity, so it is not searched there.
    searched = [m for m in mechanisms if all_levels[m] and not (objective == "flops" and m == "amq")]
    if not searched:
        raise QuicksilverError(f"nothing to search: {', '.join(mechanisms)} cannot reduce {objective} at window {window}")
    levels = {m: all_levels[m] for m in searched}
    extra = [w for w in dict.fromkeys(also_windows or []) if w != window]
    for w in extra:
        window_plan(w, w, w - 1, bos=False)
    # (split name, corpus, window): the first window's splits carry the corpus's own name.
    splits = [(name, name, window) for name in corpora] + [(f"{name}@{w}", name, w) for w in extra for name in corpora]
    runners = {key: split_runner(hf_model, tokenizer, model, name, "calibration", w, max_tokens, bos, dev, journal, objective, ray)
               for key, name, w in splits}
    runner = runners[corpora[0]] if len(runners) == 1 else WorstDomainRunner(runners)
    target = budget * (1.0 - margin)
    point, steps = search(runner, levels, target, on_trial)
    chosen = next(s for s in steps if s.point == point)
    config = point_config(point, levels, name=f"calibrated {budget * 100:g}% ({objective})")
    chosen_trials = {name: r.measure(config) for name, r in runners.items()}  # journaled already: no rerun

    checks = {}
    tested = [*corpora, *[h for h in heldout if h not in corpora]]
    for key, name, w in [(n, n, window) for n in tested] + [(f"{n}@{w}", n, w) for w in extra for n in tested]:
        if acting_config(config, w).is_off:
            checks[key] = _check(None, budget)
        elif timed_checks or objective in TIMED:
            checks[key] = _check(evaluate_model(lm, name, "test", window=w, max_tokens=max_tokens, config=config,
                                                progress=on_window), budget)
        else:
            test = split_runner(hf_model, tokenizer, model, name, "test", w, max_tokens, bos, dev, journal)
            checks[key] = _ledger_check(test, test.measure(config), budget)
    config.calibration = {
        "budget": budget,
        "objective": objective,
        "margin": margin,
        "search_target": target,
        "model": model,
        "corpus": "+".join(corpora),
        "corpora": corpora,
        "window": window,
        **({"also_windows": extra} if extra else {}),
        "tokens": {name: int(r.ids.numel()) for name, r in runners.items()} if len(runners) > 1 else int(runners[corpora[0]].ids.numel()),
        "setting": _describe(point, levels),
        # The worst calibration split (the one the budget bound) and each split on its own.
        "calibration_split": {"relative_delta_perplexity": chosen.cost, "saving": chosen.gain},
        "calibration_splits": {name: {"relative_delta_perplexity": r.cost(chosen_trials[name]), "saving": r.gain(chosen_trials[name])}
                               for name, r in runners.items()},
        "test_splits": checks,
    }
    report = {
        "config": config.to_dict(),
        "trials": [asdict(s) | {"setting": _describe(s.point, levels)} for s in steps],
        "resumed_trials": runner.resumed,
        "baseline": {name: asdict(r.baseline) for name, r in runners.items()} if len(runners) > 1 else asdict(runners[corpora[0]].baseline),
    }
    return config, report


def _check(result: dict | None, budget: float) -> dict:
    """The held-out line of a calibrated config: did the budget hold, and what did it save?"""
    if result is None:  # nothing fits: the config is off and equals the stock model
        return {"relative_delta_perplexity": 0.0, "flop_reduction": 0.0, "bit_weighted_flop_reduction": 0.0,
                "speedup": 1.0, "within_budget": True, "tokens": 0}
    return {
        "tokens": result["tokens"],
        "perplexity": result["perplexity"],
        "baseline_perplexity": result["baseline"]["perplexity"],
        "relative_delta_perplexity": result["relative_delta_perplexity"],
        "flop_reduction": result["flop_reduction"],
        "bit_weighted_flop_reduction": 1.0 - result["bit_weighted_flops"] / result["baseline"]["flops"],
        "speedup": result["speedup"],
        "top1_agreement": result["top1_agreement"],
        "within_budget": result["relative_delta_perplexity"] <= budget,
    }
