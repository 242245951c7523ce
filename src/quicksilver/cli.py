"""The ``quicksilver`` command: a thin layer over the Python API, with one-line errors."""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .decoding.sampling import GREEDY_BELOW, SEED_RANGE
from .errors import QuicksilverError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="QuickSilver: token-level runtime savings for frozen causal LMs, measured honestly.",
)
out = Console()
# Sampling limits are the decode core's (decoding/sampling.py): a temperature below GREEDY_BELOW is
# greedy (dividing logits by less overflows them), a seed fits a 64-bit generator.


@app.callback()
def _root() -> None:
    """QuickSilver: token-level runtime savings for frozen causal LMs, measured honestly."""

err = Console(stderr=True)


def _progress(description: str):
    """A rich progress bar on stderr, as a callback ``(done, total)`` plus a context manager."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    # Off when stderr is not a terminal: there rich cannot redraw, and would leave a blank line before an error.
    bar = Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err, transient=True,
                   disable=not err.is_terminal)
    task = bar.add_task(description, total=None)

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    return bar, update


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.4e}"
    if isinstance(value, int) and abs(value) >= 10**6:
        return f"{value:.4e}"
    return str(value)


@app.command("eval")
def eval_cmd(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Offline name, local .gguf file or folder, or hub id."),
    corpus: str = typer.Option("wiki", "--corpus", "-c", help="wiki, news, wikitext-103, c4."),
    split: str = typer.Option("test", help="test or calibration (offline corpora)."),
    text_file: Optional[Path] = typer.Option(None, "--text-file", help="Evaluate a UTF-8 text file instead of a corpus."),
    window: int = typer.Option(512, help="Tokens per window (BOS included when the model expects one)."),
    stride: Optional[int] = typer.Option(None, help="Window step, at most window-1; default window-1 (no overlap)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Evaluate only the first N tokens."),
    dtype: str = typer.Option("auto", help="auto (bfloat16 where the hardware runs it natively, else float32), float32, bfloat16, float16."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    device_map: Optional[str] = typer.Option(None, "--device-map", help="auto: spread the model over the GPUs (accelerate)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the results as JSON (atomically)."),
    preset: str = typer.Option("off", "--preset", "-p", help="off, halting, kvskip, fusion, amq, all, fast, fast4, lossless; baselines int8, int4."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="A config JSON file (replaces --preset)."),
    settings: list[str] = typer.Option([], "--set", help="Override one setting, e.g. --set halting.threshold=0.03 (repeatable)."),
    ray: Optional[str] = typer.Option(None, "--ray", help="Run on Ray: --ray (a local cluster) or --ray ADDRESS."),
) -> None:
    """Perplexity, bits per byte, word perplexity, FLOPs and wall-clock of a model on a corpus.

    With a preset other than off, the stock model and the preset run on the same
    windows in the same process and the output compares them.
    """
    from .evaluate import evaluate_model
    from .results_io import check_writable_target, write_json_atomic

    check_writable_target(output)
    config = _config(preset, config_file, settings)
    _reach_note(config, min(window, max_tokens or window), teacher_forced=True)
    bar, update = _progress("evaluating")
    with bar:
        result = evaluate_model(
            model=model, corpus=corpus, split=split, text_file=str(text_file) if text_file else None,
            window=window, stride=stride, max_tokens=max_tokens, dtype=dtype, device=device, progress=update,
            config=config, ray=ray, device_map=device_map,
        )
    table = _comparison_table(result) if "baseline" in result else _single_table(result)
    out.print(table)
    if output:
        write_json_atomic(output, result)
        err.print(f"wrote {output}")


@app.command("generate")
def generate_cmd(
    prompt: str = typer.Argument(..., help="The prompt text."),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Offline name, local .gguf file or folder, or hub id."),
    preset: str = typer.Option("off", "--preset", "-p", help="off, halting, kvskip, amq, all, fast, fast4, lossless; baselines int8, int4 (fusion: eval only)."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="A config JSON file (replaces --preset)."),
    settings: list[str] = typer.Option([], "--set", help="Override one setting (repeatable)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", help="Tokens to generate at most."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the tokenizer's chat template."),
    temperature: float = typer.Option(0.0, help=f"0 is greedy (and so is anything below {GREEDY_BELOW:g})."),
    top_k: Optional[int] = typer.Option(None, "--top-k"),
    top_p: Optional[float] = typer.Option(None, "--top-p"),
    seed: Optional[int] = typer.Option(None, help="Seed for sampling."),
    stop: list[str] = typer.Option([], "--stop", help="Stop once the output contains this string (repeatable)."),
    dtype: str = typer.Option("auto", help="auto (bfloat16 where the hardware runs it natively, else float32), float32, bfloat16, float16."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
) -> None:
    """Generate text with the mechanisms on, streaming tokens as they come, then a one-line summary."""
    from .evaluate import make_engine
    from .models import load_model

    config = _config(preset, config_file, settings)
    if not prompt.strip():
        raise QuicksilverError("empty prompt")
    if max_new_tokens < 1:
        raise QuicksilverError(f"max-new-tokens must be at least 1, got {max_new_tokens}")
    temperature = _check_sampling(temperature, top_k, top_p, seed)
    if config.fusion.enabled and (preset == "fusion" and not config_file or any(s.strip().startswith("fusion.") for s in settings)):
        raise QuicksilverError(f"Contextual Token Fusion works in eval only: {_FUSION_WHY}")
    hf_model, tok = load_model(model, dtype=dtype, device=device)
    engine = make_engine(hf_model, tok, config)
    if config.fusion.enabled:
        err.print(f"note: generate runs {config.name} without its fusion part: {_FUSION_WHY}", highlight=False, soft_wrap=True)
    if chat:
        if not getattr(tok, "chat_template", None):
            raise QuicksilverError(f"model {model!r} has no chat template")
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False).input_ids
    else:
        ids = tok(prompt).input_ids
    _reach_note(config, len(ids) + max_new_tokens)
    shown: list[int] = []
    printed = 0

    def stream(row: int, token: int) -> None:
        nonlocal printed
        shown.append(token)
        text = tok.decode(shown, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[printed:])
            sys.stdout.flush()
            printed = len(text)

    import torch

    from .decoding import generate

    result = generate(
        engine, torch.tensor(ids), max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
        eos_token_id=tok.eos_token_id, stop_strings=stop, tokenizer=tok, on_token=stream,
    )
    sys.stdout.write("\n")
    kv_ratio = result.kv_bytes / max(result.kv_full_bytes, 1)
    err.print(
        f"{result.new_tokens} tokens, {result.tokens_per_second:.1f} tokens/s, first token {result.time_to_first_token * 1000:.0f} ms, "
        f"mean exit layer {result.mean_exit_layer:.1f}/{engine.spec.n_layers}, KV {result.kv_bytes / 2**20:.2f} MiB "
        f"of {result.kv_full_bytes / 2**20:.2f} MiB full ({kv_ratio:.0%}), stop: {result.stop_reasons[0]}{_speculation(result)}",
        highlight=False,
        soft_wrap=True,  # one line, whatever the terminal width
    )


@app.command("serve")
def serve_cmd(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Offline name, local .gguf file or folder, or hub id."),
    preset: str = typer.Option("off", "--preset", "-p", help="off, halting, kvskip, amq, all, fast, fast4, lossless; baselines int8, int4 (fusion is prefill-only)."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="A config JSON file (replaces --preset)."),
    settings: list[str] = typer.Option([], "--set", help="Override one setting (repeatable)."),
    dtype: str = typer.Option("auto", help="auto (bfloat16 where the hardware runs it natively, else float32), float32, bfloat16, float16."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, help="Port to listen on."),
    max_batch: int = typer.Option(8, "--max-batch", help="Requests decoded together at most."),
    max_queue: int = typer.Option(64, "--max-queue", help="Requests waiting for a batch row at most; more get 429."),
    max_tokens_limit: int = typer.Option(1024, "--max-tokens-limit", help="Largest max_tokens a request may ask for."),
    max_body_bytes: int = typer.Option(4 << 20, "--max-body-bytes", help="Largest request body in bytes; a larger one gets 413."),
    read_timeout: float = typer.Option(30.0, "--read-timeout", help="Seconds a client has to send a request's head, then its body."),
) -> None:
    """An OpenAI-compatible HTTP server (completions, chat, streaming) with continuous batching."""
    # The event loop shares the cores with torch's worker threads; spinning OpenMP workers starve
    # it (10-25x slower steps measured on 2 busy cores). Only takes effect before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from .evaluate import make_engine
    from .models import load_model

    try:
        from .serve import ServeSettings, create_app
        from .serve.limits import check_listen
        import uvicorn
    except ImportError as e:
        raise QuicksilverError(f"serve needs the serve extra ({e.name} is missing): pip install 'quicksilver[serve]'") from e
    config = _config(preset, config_file, settings)
    if not 0 <= port < 65536:
        raise QuicksilverError(f"port must be in 0..65535, got {port}")
    try:
        serve_settings = ServeSettings(max_batch=max_batch, max_queue=max_queue, max_tokens_limit=max_tokens_limit,
                                       max_body_bytes=max_body_bytes, read_timeout=read_timeout)
    except ValueError as e:
        raise QuicksilverError(str(e)) from e
    check_listen(host, port)
    hf_model, tok = load_model(model, dtype=dtype, device=device)
    engine = make_engine(hf_model, tok, config)
    if config.fusion.enabled:
        err.print("note: Contextual Token Fusion is prefill-only; decoding runs without it", highlight=False, soft_wrap=True)
    server_app = create_app(engine, tok, model, serve_settings)
    where = f"[{host}]" if ":" in host else host
    err.print(f"serving {model} on http://{where}:{port}/v1 (max batch {max_batch}, max queue {max_queue})", highlight=False, soft_wrap=True)
    uvicorn.run(server_app, host=host, port=port, log_level="warning", **serve_settings.uvicorn_options())


def _check_sampling(temperature: float, top_k: Optional[int], top_p: Optional[float], seed: Optional[int]) -> float:
    """Refuse sampling settings that cannot work, before the model loads; the temperature to use."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise QuicksilverError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise QuicksilverError(f"top-k must be at least 1, got {top_k}")
    if top_p is not None and not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise QuicksilverError(f"top-p must be in (0, 1], got {top_p}")
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise QuicksilverError(f"seed must be in [-2**63, 2**64 - 1], got {seed}")
    return 0.0 if temperature < GREEDY_BELOW else temperature


def _speculation(result) -> str:
    """The generate summary's speculative part: acceptance, tokens per verify step, and by which source."""
    s = getattr(result, "speculative", None)
    if not s:
        return ""
    by = ", ".join(f"{name} {v['accepted']}/{v['drafted']}" for name, v in s["sources"].items() if v["steps"])
    return (f", speculative: {s['acceptance_rate']:.0%} of drafted tokens accepted, {s['tokens_per_step']:.2f} tokens per verify step"
            f" ({by or 'no drafts'})")


@app.command("calibrate")
def calibrate_cmd(
    budget: str = typer.Option(..., "--budget", "-b", help="Allowed relative perplexity increase: 1% or 0.01."),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Offline name, local .gguf file or folder, or hub id."),
    corpus: list[str] = typer.Option(["wiki"], "--corpus", "-c", help="wiki, news, code or pydoc: searched on its calibration split, checked on its test split (repeatable: the budget holds on every one)."),
    objective: str = typer.Option("flops", help="flops (executed), bitflops (bit-weighted), time (prefill wall clock) or decode-time (generation wall clock)."),
    output: Path = typer.Option(Path("calibrated.json"), "--output", "-o", help="The config file to write (load it with --config)."),
    window: int = typer.Option(4096, help="Context length to calibrate for (KV windows only save at long context)."),
    also_window: list[int] = typer.Option([], "--also-window", help="A further context length at which the budget must hold too (repeatable)."),
    max_tokens: int = typer.Option(8192, "--max-tokens", help="Tokens of each split to use."),
    margin: float = typer.Option(0.25, help="Search within budget x (1 - margin) on calibration text, leaving the rest for unseen text."),
    mechanisms: list[str] = typer.Option([], "--mechanism", help="Only search these (halting, kv, fusion, amq; repeatable)."),
    heldout: list[str] = typer.Option([], "--heldout", help="Also evaluate the result on this corpus's test split (repeatable)."),
    journal: Optional[Path] = typer.Option(None, help="Trial journal for resuming; default OUTPUT.trials.jsonl."),
    report: Optional[Path] = typer.Option(None, help="Also write every trial and the checks as JSON."),
    dtype: str = typer.Option("auto", help="auto (bfloat16 where the hardware runs it natively, else float32), float32, bfloat16, float16."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    ray: Optional[str] = typer.Option(None, "--ray", help="Run on Ray: --ray (a local cluster) or --ray ADDRESS."),
) -> None:
    """Find the cheapest configuration within a perplexity budget; check it on held-out text.

    Searches on the corpus's calibration split (resumable: rerun the same command after an
    interruption), writes the config, then evaluates it on the test split of the corpus and
    of every --heldout corpus and says whether the budget held there.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .calibrate import calibrate, parse_budget
    from .results_io import check_writable_target, write_json_atomic

    value = parse_budget(budget)
    check_writable_target(output)
    check_writable_target(report)
    journal = journal or output.with_name(output.name + ".trials.jsonl")
    check_writable_target(journal)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err, transient=True,
                   disable=not err.is_terminal)
    task = bar.add_task("calibrating", total=None)

    def on_trial(done: int, total: int, what: str) -> None:
        bar.update(task, completed=done, total=total, description=f"trial {done + 1}: {what}"[:70])

    def on_window(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total, description="checking on held-out text")

    with bar:
        config, full = calibrate(
            value, model=model, corpus=corpus, objective=objective, window=window, max_tokens=max_tokens, margin=margin,
            mechanisms=mechanisms or None, heldout=heldout, journal=journal, dtype=dtype, device=device,
            on_trial=on_trial, on_window=on_window, ray=ray, also_windows=also_window or None,
        )
    config.save(output)
    if report:
        write_json_atomic(report, full)
    cal = config.calibration
    table = Table(title=f"{config.name}: {cal['setting']}")
    for col in ("text", "rel. ΔPPL", "budget held", "FLOP reduction", "bit-weighted", "speedup"):
        table.add_column(col, justify="left" if col == "text" else "right")
    for name, c in cal["calibration_splits"].items():
        table.add_row(f"{name} calibration (searched)", f"{c['relative_delta_perplexity'] * 100:+.2f}%",
                      "yes" if c["relative_delta_perplexity"] <= value else "no", f"({objective}: {c['saving'] * 100:.1f}%)", "", "")
    for name, r in cal["test_splits"].items():
        table.add_row(f"{name} test (held out)", f"{r['relative_delta_perplexity'] * 100:+.2f}%", "yes" if r["within_budget"] else "NO",
                      f"{r['flop_reduction'] * 100:.1f}%", f"{r['bit_weighted_flop_reduction'] * 100:.1f}%", f"{r['speedup']:.2f}x")
    out.print(table)
    if full["resumed_trials"]:
        err.print(f"resumed {full['resumed_trials']} trials from {journal}", highlight=False)
    err.print(f"wrote {output} (use it with --config {output})", highlight=False, soft_wrap=True)


@app.command("sweep")
def sweep_cmd(
    series: list[str] = typer.Option([], "--series", "-s", help="halting, kv, fusion, amq, stack (repeatable; default all)."),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Offline name, local .gguf file or folder, or hub id."),
    corpus: str = typer.Option("wiki", "--corpus", "-c", help="wiki, news, wikitext-103, c4."),
    split: str = typer.Option("test", help="test or calibration (offline corpora)."),
    window: int = typer.Option(4096, help="Tokens per window."),
    max_tokens: int = typer.Option(8192, "--max-tokens", help="Tokens to evaluate per row."),
    output_dir: Path = typer.Option(Path("sweep"), "--output-dir", "-o", help="Folder for sweep.csv, sweep.json and pareto.png."),
    baselines: bool = typer.Option(True, "--baselines/--no-baselines", help="Also run each mechanism's matched baseline."),
    dtype: str = typer.Option("auto", help="auto (bfloat16 where the hardware runs it natively, else float32), float32, bfloat16, float16."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    ray: Optional[str] = typer.Option(None, "--ray", help="Run on Ray: --ray (a local cluster) or --ray ADDRESS."),
) -> None:
    """Pareto sweep per mechanism and for the stack, against matched baselines: CSV, JSON and a PNG plot."""
    from datetime import datetime, timezone

    from .models import parse_dtype
    from .results_io import check_writable_target, code_version, write_atomic, write_json_atomic
    from .sweep import SERIES, matched_comparison, plan, plot_pareto, run_sweep, to_csv

    chosen = series or list(SERIES)
    plan(chosen, window, baselines)  # rejects unknown series before loading anything
    if output_dir.exists() and not output_dir.is_dir():
        raise QuicksilverError(f"output folder {output_dir} is a file")
    if not output_dir.parent.is_dir():
        raise QuicksilverError(f"folder {output_dir.parent} does not exist")
    try:
        output_dir.mkdir(exist_ok=True)
    except OSError as e:
        raise QuicksilverError(f"cannot create output folder {output_dir}: {e.strerror or e}") from e
    for name in ("sweep.csv", "sweep.json", "pareto.png"):
        check_writable_target(output_dir / name)
    bar, update = _progress("sweeping")
    with bar:
        rows = run_sweep(chosen, model=model, corpus=corpus, split=split, window=window, max_tokens=max_tokens, baselines=baselines,
                         dtype=dtype, device=device, on_row=lambda i, n, what: update(i, n), ray=ray)
    matched = matched_comparison(rows)
    title = f"{model} on {corpus}/{split}, {window}-token windows, {max_tokens} tokens"
    meta = {"model": model, "corpus": corpus, "split": split, "window": window, "max_tokens": max_tokens,
            "dtype": str(parse_dtype(dtype, device)).removeprefix("torch."), "device": device, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": code_version()}
    write_atomic(output_dir / "sweep.csv", to_csv(rows))
    write_json_atomic(output_dir / "sweep.json", {"meta": meta, "rows": rows, "matched": matched})
    write_atomic(output_dir / "pareto.png", plot_pareto(rows, title))
    table = Table(title=f"best within budget: {title}")
    for col in ("series", "budget", "mechanism", "saving", "baseline", "saving ", "verdict"):
        table.add_column(col.strip(), justify="right" if col.startswith("saving") or col == "budget" else "left")
    for m in matched:
        table.add_row(m["series"], f"{m['budget'] * 100:g}%", m["mechanism"], f"{m['mechanism_value'] * 100:.1f}%", m["baseline"],
                      f"{m['baseline_value'] * 100:.1f}%", m["verdict"])
    out.print(table)
    err.print(f"wrote {output_dir}/sweep.csv, sweep.json, pareto.png", highlight=False, soft_wrap=True)


@app.command("needle")
def needle_cmd(
    contexts: list[int] = typer.Option([], "--context", help="Context length in tokens (repeatable); default 2048, 4096, 7680."),
    depths: Optional[str] = typer.Option(None, "--depths", help="Needle depths in [0, 1], comma-separated; default 0.1,0.3,0.5,0.7,0.9."),
    trials: int = typer.Option(30, "--trials", help="Trials per context (the same needles for every configuration)."),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Offline name, local .gguf file or folder, or hub id."),
    corpus: str = typer.Option("wiki", "--corpus", "-c", help="Haystack text: wiki, news, wikitext-103, c4."),
    text_file: Optional[Path] = typer.Option(None, "--text-file", help="Haystack from a UTF-8 text file instead."),
    seed: int = typer.Option(0, help="Seed of keys, depths and haystack offsets."),
    preset: str = typer.Option("kvskip", "--preset", "-p", help="off, halting, kvskip, fusion, amq, all, int8, int4."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="A config JSON file (replaces --preset)."),
    settings: list[str] = typer.Option([], "--set", help="Override one setting, e.g. --set kv.selection=quest (repeatable)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the results as JSON (atomically)."),
    dtype: str = typer.Option("auto", help="auto (bfloat16 where the hardware runs it natively, else float32), float32, bfloat16, float16."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
) -> None:
    """Pass-key retrieval across context lengths and depths: the stock model and the configuration on the same trials."""
    from .corpora import load_corpus
    from .engine import Engine
    from .evaluate import make_engine, tokenize_documents
    from .models import load_model
    from .needle import DEFAULT_CONTEXTS, make_trials, needle_test, parse_depths
    from .results_io import check_writable_target, write_json_atomic

    check_writable_target(output)
    config = _config(preset, config_file, settings)
    depth_list = parse_depths(depths)
    if trials < 1:
        raise QuicksilverError(f"trials must be at least 1, got {trials}")
    if any(n < 1 for n in contexts):
        raise QuicksilverError(f"--context must be a positive number of tokens, got {min(contexts)}")
    context_list = contexts or list(DEFAULT_CONTEXTS)
    hf_model, tok = load_model(model, dtype=dtype, device=device)
    if any(n + 32 > hf_model.config.max_position_embeddings for n in context_list):
        raise QuicksilverError(f"contexts must leave room for the question and answer within {hf_model.config.max_position_embeddings} positions")
    source = load_corpus(corpus, "test", str(text_file) if text_file else None)
    haystack = tokenize_documents(tok, source.documents, max(context_list) * 4)
    cases = make_trials(tok, haystack, context_list, depth_list, trials, seed)
    engine = make_engine(hf_model, tok, config, corpus)
    baseline = Engine(hf_model)
    bar, update = _progress("needles")
    with bar:
        result = needle_test(engine, baseline, tok, cases, progress=update)
    result = {"model": model, "haystack": source.name, "config": config.to_dict(), "contexts": context_list,
              "depths": list(depth_list), "trials_per_context": trials, "seed": seed, **result}
    table = Table(title=f"pass-key retrieval, {config.name} vs stock model ({trials} trials per context)")
    for col in ("context", "depth", "trials", "stock", config.name, "kept"):
        table.add_column(col, justify="right")
    for r in result["table"]:
        table.add_row(str(r["context"]), f"{r['depth']:g}", str(r["trials"]), f"{r['baseline_accuracy']:.0%}", f"{r['accuracy']:.0%}",
                      f"{r['kv_fraction']:.1%}")
    table.add_row("all", "", str(len(cases)), f"{result['baseline_accuracy']:.0%}", f"{result['accuracy']:.0%}", f"{result['kv_fraction']:.1%}")
    out.print(table)
    if output:
        write_json_atomic(output, result)
        err.print(f"wrote {output}")


@app.command("continuation")
def continuation_cmd(
    prefix_tokens: int = typer.Option(3584, "--prefix-tokens", help="Prefix whose cache is compressed (BOS included when the model expects one)."),
    continuation_tokens: int = typer.Option(512, "--continuation-tokens", help="Tokens scored after the compressed prefix."),
    max_chunks: Optional[int] = typer.Option(None, "--max-chunks", help="Score at most this many prefix+continuation chunks."),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Offline name, local .gguf file or folder, or hub id."),
    corpus: str = typer.Option("wiki", "--corpus", "-c", help="wiki, news, wikitext-103, c4."),
    split: str = typer.Option("test", help="test or calibration (offline corpora)."),
    text_file: Optional[Path] = typer.Option(None, "--text-file", help="Score a UTF-8 text file instead."),
    preset: str = typer.Option("kvskip", "--preset", "-p", help="off, halting, kvskip, fusion, amq, all, int8, int4."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="A config JSON file (replaces --preset)."),
    settings: list[str] = typer.Option([], "--set", help="Override one setting, e.g. --set kv.keep_fraction=0.5 (repeatable)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the results as JSON (atomically)."),
    dtype: str = typer.Option("auto", help="auto (bfloat16 where the hardware runs it natively, else float32), float32, bfloat16, float16."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
) -> None:
    """Continuation perplexity: the prefix's cache compressed by the configuration, the next tokens scored against the stock model's."""
    from .continuation import continuation_perplexity
    from .corpora import load_corpus
    from .engine import Engine
    from .evaluate import make_engine, tokenize_documents
    from .models import load_model
    from .results_io import check_writable_target, write_json_atomic

    check_writable_target(output)
    config = _config(preset, config_file, settings)
    if prefix_tokens < 2 or continuation_tokens < 1:
        raise QuicksilverError("prefix-tokens must be at least 2 and continuation-tokens at least 1")
    lm = load_model(model, dtype=dtype, device=device)
    hf_model, tok = lm
    if prefix_tokens + continuation_tokens > hf_model.config.max_position_embeddings:
        raise QuicksilverError(f"prefix and continuation exceed the model's {hf_model.config.max_position_embeddings} positions")
    source = load_corpus(corpus, split, str(text_file) if text_file else None)
    size = prefix_tokens + continuation_tokens
    ids = tokenize_documents(tok, source.documents, size * max_chunks if max_chunks else None)
    bos_id = lm.bos_id
    engine = make_engine(hf_model, tok, config, corpus)
    bar, update = _progress("chunks")
    with bar:
        result = continuation_perplexity(engine, Engine(hf_model), ids.to(hf_model.device), prefix_tokens, continuation_tokens, max_chunks,
                                         bos_id, progress=update)
    result = {"model": model, "corpus": source.name, "split": split, "config": config.to_dict(), **result}
    table = Table(title=f"continuation perplexity, {config.name}: {result['chunks']} chunks of {prefix_tokens} + {continuation_tokens} tokens")
    for col in ("stock", config.name, "rel. ΔPPL", "kept"):
        table.add_column(col, justify="right")
    table.add_row(f"{result['baseline_perplexity']:.3f}", f"{result['perplexity']:.3f}", f"{result['relative_delta_perplexity'] * 100:+.2f}%",
                  f"{result['kv_fraction']:.1%}")
    out.print(table)
    if output:
        write_json_atomic(output, result)
        err.print(f"wrote {output}")


def _config(preset: str, config_file: Optional[Path], settings: list[str]):
    from .config import Config

    config = Config.load(config_file) if config_file else Config.preset(preset)
    return config.with_settings(settings) if settings else config


# Why generate cannot fuse: the engine's generation cache holds one K/V entry per token and layer.
_FUSION_WHY = "fused tokens write no K/V entries, and the generation cache needs every token's"


def _reach_note(config, context: int, teacher_forced: bool = False) -> None:
    """One line on stderr when the preset's mechanisms (some or all) do nothing at this context (or in a teacher-forced pass)."""
    info = config.promise
    idle = info.idle_at(context, teacher_forced) if info else []
    if not idle:
        return
    reach = ", ".join(f"{section} acts only in generation" if teacher_forced and section in info.generation_only
                      else f"{section} acts from {info.acts_from[section]:,} tokens" for section in idle)
    if len(idle) == len(info.acts_from):
        what = f"preset {config.name} does nothing ({reach}): this run measures the stock model"
    else:
        what = f"part of preset {config.name} does nothing ({reach})"
    err.print(f"note: at {context:,} tokens of context {what}; see Presets in README.md", highlight=False, soft_wrap=True)


def _single_table(result: dict) -> Table:
    table = Table(title=f"{result['model']} on {result['corpus']}/{result['split']} ({result['tokens']} tokens)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("perplexity", "bits_per_byte", "word_perplexity", "flops", "flops_per_token", "wall_seconds", "tokens_per_second", "peak_memory_bytes"):
        table.add_row(key, _fmt(result[key]))
    return table


def _comparison_table(result: dict) -> Table:
    base = result["baseline"]
    table = Table(title=f"{result['model']} on {result['corpus']}/{result['split']} ({result['tokens']} tokens): {result['preset']} vs baseline")
    for col in ("metric", "baseline", result["preset"]):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for key in ("perplexity", "bits_per_byte", "word_perplexity", "flops", "flops_per_token", "wall_seconds", "tokens_per_second"):
        table.add_row(key, _fmt(base[key]), _fmt(result[key]))
    for key in ("relative_delta_perplexity", "flop_reduction", "speedup", "mean_exit_layer", "kv_fraction", "top1_agreement", "kl_divergence",
                "bits_per_token", "fused_fraction"):
        table.add_row(key, "", _fmt(result[key]))
    return table


# Optional libraries that talk when imported or loaded (torchao's kernel probes and torch's
# pytree deprecations, lm-eval, Ray, datasets, HF's hub notices) would put lines before our
# output and before an error. Silenced here, at the command line only, never in the library.
# (Not uvicorn's: a server's "running on" line is output, not noise.)
QUIET_LOGGERS = ("transformers", "accelerate", "httpx", "huggingface_hub", "matplotlib", "torchao", "datasets", "lm_eval",
                 "lm-eval", "ray", "urllib3", "filelock", "fsspec", "numexpr", "absl")
QUIET_WARNINGS_FROM = r"(torch|torchao|transformers|accelerate|datasets|lm_eval|ray|pydantic|huggingface_hub|gguf|sklearn|numpy|pkg_resources|setuptools)(\.|$)"


def quiet_third_party() -> None:
    """Silence known third-party loggers and warnings (QUICKSILVER_DEBUG=1 skips this, showing everything)."""
    import warnings

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)  # ahead of the import: these libraries keep a level set earlier
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    # torch sets its own logger's level when imported: TORCH_LOGS for a later import, the level for an earlier one.
    os.environ.setdefault("TORCH_LOGS", "-torch")
    if "torch" in sys.modules:
        logging.getLogger("torch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=QUIET_WARNINGS_FROM)
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)  # addressed to developers, not to users


def main() -> None:
    """Entry point: usage errors and QuicksilverError become one line on stderr and exit 2."""
    from typer.exceptions import Abort, Exit, TyperException

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if not os.environ.get("QUICKSILVER_DEBUG"):
        quiet_third_party()
    command = typer.main.get_command(app)
    from .parallel import optional_value

    args = optional_value(sys.argv[1:]) or ["--help"]  # a bare --ray means a local Ray cluster
    try:
        code = command.main(args=args, prog_name="quicksilver", standalone_mode=False)
    except Exit as e:
        sys.exit(e.exit_code)
    except TyperException as e:  # usage errors: bad option, bad value, missing argument
        print(f"error: {e.format_message()}", file=sys.stderr)
        sys.exit(2)
    except Abort:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except QuicksilverError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # a bug: still one line, with the traceback only on request
        if os.environ.get("QUICKSILVER_DEBUG"):
            raise
        print(f"error: internal error ({type(e).__name__}: {e}); set QUICKSILVER_DEBUG=1 for the traceback", file=sys.stderr)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
