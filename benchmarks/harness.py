"""What every benchmark shares: the header, tables, results files, HF's reference decode, timing.

- ``run_meta`` / ``header``: the command line, the date, the machine (CPU model and features
  through ``quicksilver.hardware.describe``, torch threads), torch and Python versions, and
  the git commit the numbers come from (``+dirty`` when the tree differs from it).
- ``markdown_table``: a table from column names and rows of cells.
- ``write_results`` / ``load_results`` / ``merge_rows`` / ``merge_meta``: a JSON and a markdown
  file written atomically (a reader never sees half a file), and a later run's rows merged
  over an earlier run's.
- ``hf_generate``: HF ``generate``, greedy, on a left-padded batch, EOS ignored.
- ``greedy_agreement``: how many tokens two greedy decodes share, and where they first part.
- ``interleaved``: sides timed group by group, the order of the sides rotating from one group
  to the next, so a drift in the machine's speed falls on every side alike; ``measure_decode``:
  batch-1, batch-N and prefill timings of several decoders through it.
- ``wiki_prompts``: openings of wiki test articles cut to given lengths (the decode prompts).
- ``copy_bandwidth``: GB/s of a large copy (bytes read + written), the roof of a decode step.
- ``peer_python`` / ``run_worker``: a peer (kvpress, llama.cpp, ...) in a virtual environment of
  its own under ``$QUICKSILVER_CACHE/venvs/``, built once, and a worker run there that exchanges
  only JSON (token ids in, tokens and timings out) with the driver.

Benchmarks import it as a sibling module (``sys.path`` holds a script's own folder). Its
top level imports the standard library only, so a worker in a peer's venv can import it too.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- header


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that ran, as a reader would type it from the repository root: ``python benchmarks/x.py ...``."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve() if argv else Path("?")
    try:
        shown = script.relative_to(ROOT).as_posix()
    except ValueError:
        shown = argv[0] if argv else "?"
    return " ".join(["python", shown, *argv[1:]])


def git_commit(root: Path = ROOT) -> str:
    """The code the numbers come from: ``quicksilver.results_io.code_version`` (the checkout's commit, ``+dirty``
    when tracked files differ; the installed version outside a checkout)."""
    from quicksilver.results_io import code_version

    return code_version(root)


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def run_meta(device: str = "cpu", argv: Sequence[str] | None = None, **extra: Any) -> dict:
    """The facts a results file carries about its run (``extra`` is added as it is)."""
    import torch

    from quicksilver.hardware import describe

    cmd = command_line(argv)
    return {"command": cmd, "commands": [cmd], "date": now(), "machine": describe(device), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "commit": git_commit(),
            "load_average": round(os.getloadavg()[0], 2), "quiet": os.environ.get("QS_QUIET") == "1", **extra}


def header(meta: dict, what: str = "") -> str:
    """The first line of a table: ``Command: `...` — date — machine — torch, Python — commit``; then ``what``."""
    cmds = " + ".join(f"`{c}`" for c in meta.get("commands") or [meta["command"]])
    versions = ", ".join(x for x in (f"torch {meta['torch']}" if meta.get("torch") else "",
                                     f"Python {meta['python']}" if meta.get("python") else "") if x)
    parts = [f"Command{'s' if cmds.count('`') > 2 else ''}: {cmds}", meta["date"], meta["machine"]]
    parts += [versions] if versions else []
    commits = meta.get("commits") or ([meta["commit"]] if meta.get("commit") else [])
    parts += [("commits " if len(commits) > 1 else "commit ") + ", ".join(commits)] if commits else []
    return " — ".join(parts) + (f"; {what}" if what else "")


# ----------------------------------------------------------------------------- tables and files


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table: a header row, the rule, one line per row (cells as given, ``None`` as empty)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"a row of {len(row)} cells in a table of {len(columns)} columns")
        lines.append("| " + " | ".join("" if c is None else str(c) for c in row) + " |")
    return "\n".join(lines)


def load_results(path: Path) -> dict:
    """A results JSON written by ``write_results``; ``{}`` when there is none yet."""
    import json

    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else {}


def write_results(out: Path, stem: str, data: dict, markdown: str | None = None) -> None:
    """``out/stem.json`` (and ``out/stem.md``), each written atomically."""
    from quicksilver.results_io import write_atomic, write_json_atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / f"{stem}.json", data)
    if markdown is not None:
        write_atomic(out / f"{stem}.md", markdown if markdown.endswith("\n") else markdown + "\n")


def merge_rows(old: Sequence[dict], new: Sequence[dict], key: Callable[[dict], Any]) -> list[dict]:
    """``old``'s rows that ``new`` does not measure again, in their places, then ``new``'s others: a later row wins."""
    fresh = {key(r): r for r in new}
    out = [fresh.pop(key(r), r) for r in old]
    return out + [r for r in new if key(r) in fresh]


def merge_meta(old: dict, new: dict) -> dict:
    """``new``'s facts, with every command that contributed rows (in order) and the date span."""
    if not old:
        return new
    commands = list(dict.fromkeys([*(old.get("commands") or [old.get("command")]), *(new.get("commands") or [new["command"]])]))
    commits = list(dict.fromkeys(c for c in [*(old.get("commits") or [old.get("commit")]), *(new.get("commits") or [new.get("commit")])] if c))
    first = str(old.get("date", "")).split(" – ")[0]
    date = new["date"] if not first or first == new["date"] else f"{first} – {new['date']}"
    return {**new, "commands": [c for c in commands if c], "date": date, "commits": commits}


# ----------------------------------------------------------------------------- decoding references


def hf_generate(model, prompts: Sequence[Sequence[int]], new_tokens: int, pad_token_id: int, **extra):
    """HF greedy ``generate`` on a left-padded batch, EOS ignored: (tokens per row, seconds).

    Exactly ``new_tokens`` per row; ``extra`` goes to ``generate`` (e.g. ``prompt_lookup_num_tokens``).
    """
    import torch

    width = max(len(p) for p in prompts)
    dev = model.device
    ids = torch.tensor([[pad_token_id] * (width - len(p)) + list(p) for p in prompts], device=dev)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=dev)
    sync(dev)
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=pad_token_id, eos_token_id=None,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, **extra)
    sync(dev)
    return out[:, width:].tolist(), time.perf_counter() - t0


def pad_id(tok) -> int:
    """The tokenizer's padding id, else its EOS id (SmolLM2 has no pad token)."""
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def sync(device) -> None:
    """Wait for a CUDA device (no-op on a CPU), so a timer sees finished work."""
    import torch

    if getattr(device, "type", device) == "cuda":
        torch.cuda.synchronize(device)


def greedy_agreement(ours: Sequence[Sequence[int]], ref: Sequence[Sequence[int]]) -> tuple[float, int | None]:
    """(fraction of positions with the same token, the earliest step where any row differs; None if none)."""
    same = total = 0
    first = None
    for a, b in zip(ours, ref, strict=True):
        for step, (x, y) in enumerate(zip(a, b)):
            same += x == y
            total += 1
            if x != y and (first is None or step < first):
                first = step
        total += abs(len(a) - len(b))  # a row cut short counts its missing tokens as different
    return same / max(total, 1), first


def common_prefix(ours: Sequence[Sequence[int]], ref: Sequence[Sequence[int]]) -> float:
    """Mean number of leading tokens each row shares with its reference (after a first difference
    greedy decodes go their own ways, so this says more than the fraction of equal positions)."""
    n = []
    for a, b in zip(ours, ref, strict=True):
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        n.append(k)
    return sum(n) / max(len(n), 1)


# ----------------------------------------------------------------------------- timing


def interleaved(sides: dict[str, Callable[[Any], Any]], groups: Sequence[Any]) -> dict[str, list]:
    """Run every side on every group, group by group; the order of the sides rotates by one
    from one group to the next (A B C, B C A, C A B, ...), so no side always runs first.

    ``sides[name](group)`` returns whatever the caller measures (tokens and seconds, a result
    object); returns each side's results in the order of ``groups``.
    """
    names = list(sides)
    out: dict[str, list] = {n: [None] * len(groups) for n in names}
    for i, group in enumerate(groups):
        k = i % len(names) if names else 0
        for name in names[k:] + names[:k]:
            out[name][i] = sides[name](group)
    return out


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(``fn()``, seconds it took)."""
    t0 = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t0


def measure_decode(runners: dict, prompts: Sequence[Sequence[int]], prefill: Sequence[int], new_tokens: int, reps: int = 3,
                   log: Callable[[str], None] = lambda msg: None) -> dict:
    """Decode timings of several engines on the same token ids, their turns interleaved prompt by prompt.

    A runner has ``generate(prompts, n) -> (tokens per row, seconds, seconds to the first token)``
    and ``batches`` (True: it decodes several sequences at once). After a warm-up of each (both
    batch shapes and the prefill prompt: kernel choices, compiling, allocator), returns per runner:
    ``tokens``, ``seconds`` and ``ttft`` of each prompt alone (batch 1); ``batch_tokens`` and
    ``batch_seconds`` of all prompts at once where it batches; ``prefill_seconds``: the first-token
    time of ``prefill`` ``reps`` times, the runners' order rotating between repetitions.
    """
    for name, r in runners.items():
        t0 = time.perf_counter()
        r.generate([list(prompts[0])], 8)
        if r.batches:
            r.generate([list(p) for p in prompts], 8)
        r.generate([list(prefill)], 1)
        log(f"{name}: warm in {time.perf_counter() - t0:.1f} s")
    out: dict = {name: {"tokens": [], "seconds": [], "ttft": [], "prefill_seconds": []} for name in runners}

    def alone(name):
        def run(prompt):
            tokens, seconds, ttft = runners[name].generate([list(prompt)], new_tokens)
            out[name]["tokens"].append(tokens[0])
            out[name]["seconds"].append(seconds)
            out[name]["ttft"].append(ttft)
        return run

    interleaved({name: alone(name) for name in runners}, prompts)
    for name in [n for n, r in runners.items() if r.batches]:
        tokens, seconds, _ = runners[name].generate([list(p) for p in prompts], new_tokens)
        out[name].update(batch_tokens=tokens, batch_seconds=seconds)
    interleaved({name: (lambda _, name=name: out[name]["prefill_seconds"].append(runners[name].generate([list(prefill)], 1)[2]))
                 for name in runners}, range(reps))
    return out


def copy_bandwidth(mb: int = 512, reps: int = 5) -> float:
    """GB/s of a plain copy of ``mb`` MB with torch's threads (bytes read + bytes written), median of ``reps``.
    Both buffers lie where ``load_model`` homes a model's weights (``quicksilver.arena``: huge pages where the
    kernel grants them), so a step's share of it compares like with like."""
    import torch

    from quicksilver import arena

    a = torch.empty(mb * 2**20, dtype=torch.uint8)
    b = torch.empty_like(a)
    arena.rehome([a, b])
    a.fill_(1)
    b.copy_(a)  # touch every page of both before timing
    times = sorted(timed(lambda: b.copy_(a))[1] for _ in range(reps))
    return 2 * a.numel() / times[len(times) // 2] / 1e9


# ----------------------------------------------------------------------------- inputs


def wiki_prompts(tok, lengths: Sequence[int]) -> list[list[int]]:
    """Token ids of the opening paragraph of the first ``len(lengths)`` wiki test articles, cut to those lengths."""
    from quicksilver import load_corpus

    docs = load_corpus("wiki", "test").documents
    if len(docs) < len(lengths):
        raise ValueError(f"the wiki test split has {len(docs)} articles, fewer than {len(lengths)} prompts")
    out = []
    for doc, n in zip(docs, lengths):
        ids = tok(doc.split("\n\n", 2)[1], add_special_tokens=False).input_ids
        out.append(ids[:n])
    return out


# ----------------------------------------------------------------------------- peers in venvs of their own


class PeerError(RuntimeError):
    """A peer's venv could not be built, or its worker handed back nothing: one line for the table or stderr."""


def venv_root() -> Path:
    """``$QUICKSILVER_CACHE/venvs``: where each peer's virtual environment lives."""
    from quicksilver.paths import cache_dir

    return cache_dir() / "venvs"


def peer_python(name: str, installs: Sequence[Sequence[str]], log: Callable[[str], None], env: dict | None = None) -> Path:
    """The python of the venv ``venv_root()/name``, built once: one ``pip install`` per entry of ``installs``
    (its arguments), with ``env`` added to the environment (e.g. ``CMAKE_ARGS`` for a source build).

    The venv is built beside its place and renamed into it only when every install succeeded;
    a marker file records what it holds, and a venv built for other ``installs`` is rebuilt.
    Pin torch to the exact build this process runs (``torch_pin()``), so no CUDA wheel is pulled.
    """
    import json

    folder = venv_root() / name
    want = {"installs": [list(i) for i in installs], "env": env or {}}
    marker = folder / "quicksilver-venv.json"
    if marker.is_file() and json.loads(marker.read_text()).get("want") == want:
        return folder / "bin" / "python"
    tmp = folder.with_name(f"{name}.build-{os.getpid()}")
    log(f"building the {name} venv in {folder} (once; minutes, more for a source build)")
    try:
        subprocess.run([sys._base_executable, "-m", "venv", str(tmp)], check=True)
        for args in installs:
            subprocess.run([str(tmp / "bin" / "python"), "-m", "pip", "install", "-q", *args], check=True,
                           env={**os.environ, **(env or {})})
    except (subprocess.CalledProcessError, OSError) as e:
        subprocess.run(["rm", "-rf", str(tmp)])
        raise PeerError(f"could not build the {name} venv ({e}); PyPI must be reachable") from None
    (tmp / "quicksilver-venv.json").write_text(json.dumps({"want": want}))
    if folder.exists():
        subprocess.run(["rm", "-rf", str(folder)], check=True)
    os.replace(tmp, folder)  # `python -m pip` keeps working after the move; bin/ scripts are not used
    return folder / "bin" / "python"


def torch_pin() -> str:
    """``torch==<this process's exact build>`` (e.g. 2.13.0+cpu)."""
    from importlib.metadata import version

    return f"torch=={version('torch')}"


def run_worker(python: Path, script: Path, job: dict, workdir: Path, name: str, log: Callable[[str], None],
               extra_env: dict | None = None) -> dict:
    """Run ``script --worker JOB OUT`` with ``python`` (a peer's venv) and return the JSON it wrote to OUT.

    The worker gets no PYTHONPATH (our tree must not shadow anything in its venv) and may write
    OUT more than once, so an interrupted worker still hands back what it measured; the answer's
    ``complete`` is true only when the worker said so and exited 0.
    """
    import json

    job_path, out_path = Path(workdir) / f"{name}-job.json", Path(workdir) / f"{name}-out.json"
    job_path.write_text(json.dumps(job))
    out_path.unlink(missing_ok=True)
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           **(extra_env or {})}
    env.pop("PYTHONPATH", None)
    t = time.time()
    proc = subprocess.run([str(python), str(Path(script).resolve()), "--worker", str(job_path), str(out_path)], env=env)
    if not out_path.is_file():
        raise PeerError(f"the {name} worker failed (exit {proc.returncode}) before its first result; its traceback is above")
    result = json.loads(out_path.read_text())
    result["complete"] = bool(result.get("complete")) and proc.returncode == 0
    log(f"{name} worker {'done' if result['complete'] else f'stopped (exit {proc.returncode})'} in {time.time() - t:.0f} s")
    return result
