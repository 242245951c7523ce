"""Pareto sweeps: each mechanism at each level and its matched baseline, on the same windows.

Every row is one ``evaluate_model`` run (the stock model and the configuration
interleaved in one process), so FLOP reduction and speedup are ratios from one run.
A row's ``saving`` is its bit-weighted FLOP reduction, which equals the plain FLOP
reduction for every unquantized configuration and credits AMQ/int8/int4 with their
narrower multiply-adds (an int8 MAC counts 8/16 of a 16-bit one).

Matched baselines (``calibrate.baseline_levels``): static depth reduction for halting
(every token skips the same MLPs), uniform int8/int4 for AMQ, attention sinks plus a recent
window (StreamingLLM) for KV skipping, which is that very policy here, so it ties by
construction. Fusion has no baseline in the issue; the stack is compared with the best
baseline row.
"""

from __future__ import annotations

import csv
import io
from typing import Callable

from .calibrate import baseline_levels, mechanism_levels
from .errors import QuicksilverError

SERIES = ("halting", "kv", "fusion", "amq", "stack")
TIE = 0.01  # savings within one percentage point of each other tie (run-to-run and probe-cost noise)
MATCHED = {"halting": "static depth reduction", "kv": "sinks + recent window", "amq": "uniform quantization", "fusion": None,
           "stack": "best baseline"}
FIELDS = ("series", "kind", "label", "relative_delta_perplexity", "flop_reduction", "saving", "speedup", "perplexity",
          "baseline_perplexity", "top1_agreement", "kv_fraction", "bits_per_token", "fused_fraction", "mean_exit_layer")


def stack_levels(window: int) -> list[tuple[str, dict]]:
    """The full stack at rising aggressiveness: level i of every mechanism (clamped to its last)."""
    levels = mechanism_levels(window)
    rows = []
    for i in range(max(len(v) for v in levels.values())):
        data = {m: {"enabled": True, **v[min(i, len(v) - 1)][1]} for m, v in levels.items() if v}
        rows.append((f"all four at level {i + 1}", data))
    return rows


def plan(series: list[str], window: int, baselines: bool = True) -> list[tuple[str, str, str, dict]]:
    """(series, kind, label, config dict) for every row to run."""
    unknown = [s for s in series if s not in SERIES]
    if unknown:
        raise QuicksilverError(f"unknown sweep series {', '.join(unknown)} (known: {', '.join(SERIES)})")
    levels, base = mechanism_levels(window), baseline_levels()
    rows = []
    for s in series:
        if s == "stack":
            rows += [(s, "mechanism", label, data) for label, data in stack_levels(window)]
        else:
            rows += [(s, "mechanism", label, {s: {"enabled": True, **settings}}) for label, settings in levels[s]]
        if baselines and MATCHED[s] in base:  # the KV rows *are* the sinks + window baseline
            rows += [(s, "baseline", label, data) for label, data in base[MATCHED[s]]]
    return rows


def run_sweep(series: list[str], model: str = "smollm2-135m", corpus: str = "wiki", split: str = "test", window: int = 4096,
              max_tokens: int | None = 8192, baselines: bool = True, loaded=None, dtype: str = "auto",
              device: str = "cpu", on_row: Callable[[int, int, str], None] | None = None, ray: str | None = None) -> list[dict]:
    """Evaluate every planned row; returns one flat dict per row (the CSV's columns).

    ``ray``: a Ray address (``local``: a local cluster); the rows then run as Ray tasks.
    """
    from .corpora import check_corpus_args
    from .evaluate import BaselineCache, window_plan
    from .models import as_loaded, load_model
    from .parallel import map_calls

    check_corpus_args(corpus, split)
    window_plan(window, window, window - 1, bos=False)
    rows = plan(series, window, baselines)
    lm = as_loaded(loaded) if loaded is not None else model if not isinstance(model, str) else load_model(model, dtype=dtype, device=device)
    source = lm.source.keep(lm)
    # Rows run here share the stock model's results on the windows (run and timed once, in the first row);
    # Ray tasks each measure their own.
    cache = BaselineCache() if ray is None else None
    calls = [(source, corpus, split, window, max_tokens, s, kind, label, data, cache) for s, kind, label, data in rows]
    if on_row:
        on_row(0, len(rows), "started")
    done = (lambda i, n: on_row(i, n, "rows")) if on_row else None
    return map_calls(sweep_row, calls, ray, str(device).startswith("cuda"), done)


def sweep_row(source, corpus: str, split: str, window: int, max_tokens: int | None, series: str, kind: str,
              label: str, data: dict, baseline_cache=None) -> dict:
    """One row of a sweep: the configuration against the stock model on the same windows."""
    from .config import Config
    from .evaluate import evaluate_model

    r = evaluate_model(source.load(), corpus, split, window=window, max_tokens=max_tokens,
                       device=source.device, config=Config.from_dict({**data, "name": label}), baseline_cache=baseline_cache)
    return flat_row(series, kind, label, r)


def flat_row(series: str, kind: str, label: str, r: dict) -> dict:
    return {
        "series": series, "kind": kind, "label": label,
        "relative_delta_perplexity": r["relative_delta_perplexity"],
        "flop_reduction": r["flop_reduction"],
        "saving": 1.0 - r["bit_weighted_flops"] / r["baseline"]["flops"],
        "speedup": r["speedup"],
        "perplexity": r["perplexity"],
        "baseline_perplexity": r["baseline"]["perplexity"],
        "top1_agreement": r["top1_agreement"],
        "kv_fraction": r["kv_fraction"],
        "bits_per_token": r["bits_per_token"],
        "fused_fraction": r["fused_fraction"],
        "mean_exit_layer": r["mean_exit_layer"],
        "config": r["config"],
    }


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points (gain, cost) no other point beats (more gain at no more cost, or less cost at no less gain).

    Sorted by gain. Higher gain is better, lower cost is better.
    """
    front = []
    for i, (g, c) in enumerate(points):
        dominated = any((g2 >= g and c2 <= c) and (g2 > g or c2 < c) for j, (g2, c2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def best_within(rows: list[dict], budget: float, key: str = "saving") -> dict | None:
    """The row with the largest ``key`` whose perplexity increase is within ``budget``."""
    fit = [r for r in rows if r["relative_delta_perplexity"] <= budget]
    return max(fit, key=lambda r: r[key]) if fit else None


def matched_comparison(rows: list[dict], budgets=(0.005, 0.01, 0.02), key: str = "saving") -> list[dict]:
    """For each series and budget: the best mechanism row against the best matched-baseline row."""
    out = []
    for s in dict.fromkeys(r["series"] for r in rows):
        mech = [r for r in rows if r["series"] == s and r["kind"] == "mechanism"]
        if s == "kv":
            base = mech  # the same policy: sinks + recent window
        elif s == "stack":
            base = [r for r in rows if r["kind"] == "baseline"]
        else:
            base = [r for r in rows if r["series"] == s and r["kind"] == "baseline"]
        for b in budgets:
            m, bl = best_within(mech, b, key), best_within(base, b, key)
            mv, bv = (m[key] if m else 0.0), (bl[key] if bl else 0.0)
            if not base:
                verdict = "no baseline"
            elif s == "kv":
                verdict = "ties (same policy)"
            else:
                verdict = "beats" if mv > bv + TIE else "ties" if abs(mv - bv) <= TIE else "loses"
            out.append({"series": s, "budget": b, "mechanism": m["label"] if m else "off", "mechanism_value": mv,
                        "baseline": bl["label"] if bl else ("off" if base else "—"), "baseline_value": bv, "verdict": verdict})
    return out


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items() if k in FIELDS})
    return buf.getvalue()


def plot_pareto(rows: list[dict], title: str = "") -> bytes:
    """A PNG: one row of panels per series; relative ΔPPL against FLOP saving and against speedup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = list(dict.fromkeys(r["series"] for r in rows))
    fig, axes = plt.subplots(len(series), 2, figsize=(11, 3.2 * len(series)), squeeze=False)
    for ax_row, s in zip(axes, series):
        for ax, xkey, xlabel, origin in ((ax_row[0], "saving", "FLOP reduction, % (bit-weighted for quantized rows)", 0.0),
                                         (ax_row[1], "speedup", "wall-clock speedup vs stock HF (x)", 1.0)):
            for kind, colour, marker in (("mechanism", "tab:blue", "o"), ("baseline", "tab:orange", "s")):
                pts = [r for r in rows if r["series"] == s and r["kind"] == kind]
                if not pts:
                    continue
                scale = 100.0 if xkey == "saving" else 1.0
                xs = [r[xkey] * scale for r in pts]
                ys = [r["relative_delta_perplexity"] * 100 for r in pts]
                name = f"baseline: {MATCHED[s]}" if kind == "baseline" else "kv (= baseline: sinks + recent window)" if s == "kv" else s
                ax.scatter(xs, ys, c=colour, marker=marker, label=name, zorder=3)
                # The front includes the stock model itself (no saving, no cost).
                pts_xy = list(zip(xs, ys)) + [(origin, 0.0)]
                front = pareto_front(pts_xy)
                ax.plot([pts_xy[i][0] for i in front], [pts_xy[i][1] for i in front], c=colour, lw=1, ls="--", zorder=2)
            ax.scatter([origin], [0.0], c="black", marker="*", s=140, label="stock HF model", zorder=4)
            ax.axhline(0, c="grey", lw=0.5)
            ax.set_yscale("symlog", linthresh=1.0)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("perplexity increase, %")
            ax.set_title(s if xkey == "saving" else f"{s}: wall clock")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.985) if title else None)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()
