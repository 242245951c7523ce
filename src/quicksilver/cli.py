"""The ``quicksilver`` command: a thin layer over the Python API, with one-line errors."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import QuicksilverError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="QuickSilver: token-level runtime savings for frozen causal LMs, measured honestly.",
)
out = Console()


@app.callback()
def _root() -> None:
    """QuickSilver: token-level runtime savings for frozen causal LMs, measured honestly."""

err = Console(stderr=True)


def _progress(description: str):
    """A rich progress bar on stderr, as a callback ``(done, total)`` plus a context manager."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err, transient=True)
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
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Offline name, local folder or hub id."),
    corpus: str = typer.Option("wiki", "--corpus", "-c", help="wiki, news, wikitext-103, c4."),
    split: str = typer.Option("test", help="test or calibration (offline corpora)."),
    text_file: Optional[Path] = typer.Option(None, "--text-file", help="Evaluate a UTF-8 text file instead of a corpus."),
    window: int = typer.Option(512, help="Tokens per window (BOS included when the model expects one)."),
    stride: Optional[int] = typer.Option(None, help="Window step, at most window-1; default window-1 (no overlap)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Evaluate only the first N tokens."),
    dtype: str = typer.Option("auto", help="auto (bfloat16 where the hardware runs it natively, else float32), float32, bfloat16, float16."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the results as JSON (atomically)."),
    preset: str = typer.Option("off", "--preset", "-p", help="off, halting, kvskip, fusion, amq, all, int8, int4."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="A config JSON file (replaces --preset)."),
    settings: list[str] = typer.Option([], "--set", help="Override one setting, e.g. --set halting.threshold=0.03 (repeatable)."),
) -> None:
    """Perplexity, bits per byte, word perplexity, FLOPs and wall-clock of a model on a corpus.

    With a preset other than off, the stock model and the preset run on the same
    windows in the same process and the output compares them.
    """
    from .evaluate import evaluate_model
    from .results_io import check_writable_target, write_json_atomic

    check_writable_target(output)
    config = _config(preset, config_file, settings)
    bar, update = _progress("evaluating")
    with bar:
        result = evaluate_model(
            model=model, corpus=corpus, split=split, text_file=str(text_file) if text_file else None,
            window=window, stride=stride, max_tokens=max_tokens, dtype=dtype, device=device, progress=update,
            config=config,
        )
    table = _comparison_table(result) if "baseline" in result else _single_table(result)
    out.print(table)
    if output:
        write_json_atomic(output, result)
        err.print(f"wrote {output}")


@app.command("generate")
def generate_cmd(
    prompt: str = typer.Argument(..., help="The prompt text."),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Offline name, local folder or hub id (GPT-2 or Llama family)."),
    preset: str = typer.Option("off", "--preset", "-p", help="off, halting, kvskip, amq, all, int8, int4, lossless (fusion is prefill-only)."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="A config JSON file (replaces --preset)."),
    settings: list[str] = typer.Option([], "--set", help="Override one setting (repeatable)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", help="Tokens to generate at most."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the tokenizer's chat template."),
    temperature: float = typer.Option(0.0, help="0 is greedy."),
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
    hf_model, tok = load_model(model, dtype=dtype, device=device)
    engine = make_engine(hf_model, tok, config)
    if config.fusion.enabled:
        err.print("note: Contextual Token Fusion is prefill-only; generate runs without it", highlight=False, soft_wrap=True)
    if chat:
        if not getattr(tok, "chat_template", None):
            raise QuicksilverError(f"model {model!r} has no chat template")
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False).input_ids
    else:
        ids = tok(prompt).input_ids
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

    result = engine.generate(
        torch.tensor(ids), max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
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
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Offline name, local folder or hub id."),
    corpus: str = typer.Option("wiki", "--corpus", "-c", help="wiki or news: searched on its calibration split, checked on its test split."),
    objective: str = typer.Option("flops", help="flops (executed), bitflops (bit-weighted) or time (wall clock)."),
    output: Path = typer.Option(Path("calibrated.json"), "--output", "-o", help="The config file to write (load it with --config)."),
    window: int = typer.Option(4096, help="Context length to calibrate for (KV windows only save at long context)."),
    max_tokens: int = typer.Option(8192, "--max-tokens", help="Tokens of each split to use."),
    margin: float = typer.Option(0.25, help="Search within budget x (1 - margin) on calibration text, leaving the rest for unseen text."),
    mechanisms: list[str] = typer.Option([], "--mechanism", help="Only search these (halting, kv, fusion, amq; repeatable)."),
    heldout: list[str] = typer.Option([], "--heldout", help="Also evaluate the result on this corpus's test split (repeatable)."),
    journal: Optional[Path] = typer.Option(None, help="Trial journal for resuming; default OUTPUT.trials.jsonl."),
    report: Optional[Path] = typer.Option(None, help="Also write every trial and the checks as JSON."),
    dtype: str = typer.Option("auto", help="auto (bfloat16 where the hardware runs it natively, else float32), float32, bfloat16, float16."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
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
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err, transient=True)
    task = bar.add_task("calibrating", total=None)

    def on_trial(done: int, total: int, what: str) -> None:
        bar.update(task, completed=done, total=total, description=f"trial {done + 1}: {what}"[:70])

    def on_window(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total, description="checking on held-out text")

    with bar:
        config, full = calibrate(
            value, model=model, corpus=corpus, objective=objective, window=window, max_tokens=max_tokens, margin=margin,
            mechanisms=mechanisms or None, heldout=heldout, journal=journal, dtype=dtype, device=device,
            on_trial=on_trial, on_window=on_window,
        )
    config.save(output)
    if report:
        write_json_atomic(report, full)
    cal = config.calibration
    table = Table(title=f"{config.name}: {cal['setting']}")
    for col in ("text", "rel. ΔPPL", "budget held", "FLOP reduction", "bit-weighted", "speedup"):
        table.add_column(col, justify="left" if col == "text" else "right")
    c = cal["calibration_split"]
    table.add_row(f"{corpus} calibration (searched)", f"{c['relative_delta_perplexity'] * 100:+.2f}%",
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
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Offline name, local folder or hub id."),
    corpus: str = typer.Option("wiki", "--corpus", "-c", help="wiki, news, wikitext-103, c4."),
    split: str = typer.Option("test", help="test or calibration (offline corpora)."),
    window: int = typer.Option(4096, help="Tokens per window."),
    max_tokens: int = typer.Option(8192, "--max-tokens", help="Tokens to evaluate per row."),
    output_dir: Path = typer.Option(Path("sweep"), "--output-dir", "-o", help="Folder for sweep.csv, sweep.json and pareto.png."),
    baselines: bool = typer.Option(True, "--baselines/--no-baselines", help="Also run each mechanism's matched baseline."),
    dtype: str = typer.Option("auto", help="auto (bfloat16 where the hardware runs it natively, else float32), float32, bfloat16, float16."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
) -> None:
    """Pareto sweep per mechanism and for the stack, against matched baselines: CSV, JSON and a PNG plot."""
    from datetime import datetime, timezone

    from .models import parse_dtype
    from .results_io import check_writable_target, write_atomic, write_json_atomic
    from .sweep import SERIES, matched_comparison, plan, plot_pareto, run_sweep, to_csv

    chosen = series or list(SERIES)
    plan(chosen, window, baselines)  # rejects unknown series before loading anything
    if output_dir.exists() and not output_dir.is_dir():
        raise QuicksilverError(f"output folder {output_dir} is a file")
    if not output_dir.parent.is_dir():
        raise QuicksilverError(f"folder {output_dir.parent} does not exist")
    output_dir.mkdir(exist_ok=True)
    for name in ("sweep.csv", "sweep.json", "pareto.png"):
        check_writable_target(output_dir / name)
    bar, update = _progress("sweeping")
    with bar:
        rows = run_sweep(chosen, model=model, corpus=corpus, split=split, window=window, max_tokens=max_tokens, baselines=baselines,
                         dtype=dtype, device=device, on_row=lambda i, n, what: update(i, n))
    matched = matched_comparison(rows)
    title = f"{model} on {corpus}/{split}, {window}-token windows, {max_tokens} tokens"
    meta = {"model": model, "corpus": corpus, "split": split, "window": window, "max_tokens": max_tokens,
            "dtype": str(parse_dtype(dtype, device)).removeprefix("torch."), "device": device, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
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


def _config(preset: str, config_file: Optional[Path], settings: list[str]):
    from .config import Config

    config = Config.load(config_file) if config_file else Config.preset(preset)
    return config.with_settings(settings) if settings else config


def _single_table(result: dict) -> Table:
    table = Table(title=f"{result['model']} on {result['corpus']}/{result['split']} ({result['tokens']} tokens)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("perplexity", "bits_per_byte", "word_perplexity", "flops", "flops_per_token", "wall_seconds", "tokens_per_second", "peak_memory_bytes"):
        table.add_row(key, _fmt(result[key]))
    return table


def _comparison_table(result: dict) -> Table:
    base = result["baseline"]
    table = Table(title=f"{result['model']} on {result['corpus']}/{result['split']} ({result['tokens']} tokens): preset {result['preset']} vs baseline")
    for col in ("metric", "baseline", result["preset"]):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for key in ("perplexity", "bits_per_byte", "word_perplexity", "flops", "flops_per_token", "wall_seconds", "tokens_per_second"):
        table.add_row(key, _fmt(base[key]), _fmt(result[key]))
    for key in ("relative_delta_perplexity", "flop_reduction", "speedup", "mean_exit_layer", "kv_fraction", "top1_agreement", "kl_divergence",
                "bits_per_token", "fused_fraction"):
        table.add_row(key, "", _fmt(result[key]))
    return table


def main() -> None:
    """Entry point: usage errors and QuicksilverError become one line on stderr and exit 2."""
    from typer.exceptions import Abort, Exit, TyperException

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("transformers", "accelerate", "httpx", "huggingface_hub", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    command = typer.main.get_command(app)
    args = sys.argv[1:] or ["--help"]
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
