"""Pass-key retrieval ("needle in a haystack") for the stock model and a configuration, on the same trials.

A trial hides "The pass key is N. Remember it. N is the pass key." (N: 5 digits) at a
depth of a raw-text haystack cut from a corpus, then asks "What is the pass key? The
pass key is" and decodes greedily. The context is prefilled with the configuration (an
eviction rule compresses the cache at the end of prefill); the question is never
compressed: it and the answer read whatever the cache kept, in full, except under
``quest``, which chooses pages per query. The kept fraction is measured, not assumed:
the share of the context's K/V entries that the question's and answer's queries read,
averaged over layers, heads (each KV head reads its own entries, the same number in every
head) and trials.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass

import torch

from .cache import SequenceCache
from .errors import QuicksilverError

NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"
ANSWER_TOKENS = 8
DEFAULT_CONTEXTS = (2048, 4096, 7680)
DEFAULT_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
DEFAULT_TRIALS = 30


@dataclass(frozen=True)
class Trial:
    context: int
    depth: float
    key: str
    ids: torch.Tensor  # (context,) haystack with the needle inside
    question: torch.Tensor  # (q,)


def make_trials(tokenizer, haystack: torch.Tensor, contexts, depths, trials: int, seed: int = 0) -> list[Trial]:
    """The same trials for every configuration: keys, depths and haystack offsets from ``seed``."""
    question = torch.tensor(tokenizer(QUESTION, add_special_tokens=False).input_ids)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    out = []
    for n in contexts:
        rng = random.Random(f"{seed}-{n}")
        for i in range(trials):
            key = str(rng.randint(10000, 99999))
            depth = depths[i % len(depths)]
            needle = tokenizer(NEEDLE.format(key=key), add_special_tokens=False).input_ids
            fill = n - len(needle) - len(bos)
            if fill < 16 or haystack.numel() <= fill:
                raise QuicksilverError(f"context {n} is too short for the needle or longer than the haystack text ({haystack.numel()} tokens)")
            start = rng.randrange(0, haystack.numel() - fill)
            hay = haystack[start : start + fill].tolist()
            at = round(depth * fill)
            ids = torch.tensor(bos + hay[:at] + needle + hay[at:])
            out.append(Trial(n, depth, key, ids, question))
    return out


@contextlib.contextmanager
def _reading_in_full(engine):
    """Let the question and answer read every kept entry (KV selection off), except for quest."""
    kv = engine.config.kv
    saved = kv.enabled
    if not kv.rule.reads_pages:  # an evicting rule chose what the cache holds; a page-reading one (quest) chooses per query
        kv.enabled = False
    try:
        yield
    finally:
        kv.enabled = saved


@torch.inference_mode()
def run_trial(engine, trial: Trial, answer_tokens: int = ANSWER_TOKENS) -> tuple[str, float]:
    """Greedy answer ids decoded to text, and the kept fraction of the context its queries read."""
    from .decoding import decode_one_token, prefill

    spec = engine.spec
    dev = next(engine.model.parameters()).device
    n = trial.ids.numel()
    cache = SequenceCache(spec.n_layers, capacity=n + trial.question.numel() + answer_tokens)
    prefill(engine, trial.ids.to(dev), cache)
    with _reading_in_full(engine):
        logits, ledger = extend(engine, trial.question.to(dev), cache)
        pairs, queries = ledger.pairs_seen, trial.question.numel()
        tokens = [int(logits.argmax(-1))]
        for _ in range(answer_tokens - 1):
            logits, step = decode_one_token(engine, torch.tensor(tokens[-1:], device=dev), [cache])
            pairs += step.pairs_seen
            queries += 1
            tokens.append(int(logits.argmax(-1)))
    # Pairs among the question and answer themselves are always read; the rest are context entries.
    own = queries * (queries + 1) // 2
    kept = (pairs / spec.n_layers - own) / (queries * n)
    return tokens, kept


def extend(engine, ids: torch.Tensor, cache: SequenceCache, logit_rows: torch.Tensor | None = None):
    """Run ``ids`` after what ``cache`` holds (positions go on from ``cache.length``); logits of the last row by default."""
    pos = torch.arange(cache.length, cache.length + ids.numel(), device=ids.device)
    rows = torch.tensor([ids.numel() - 1], device=ids.device) if logit_rows is None else logit_rows
    return engine.run(ids, pos, [(0, ids.numel())], [cache], logit_rows=rows)


def answer_key(text: str) -> str:
    """The first run of digits in the answer ('' if none)."""
    digits = ""
    for ch in text:
        if ch.isdigit():
            digits += ch
        elif digits:
            break
    return digits


def needle_test(engine, baseline, tokenizer, trials: list[Trial], progress=None) -> dict:
    """Accuracy of ``engine`` and of ``baseline`` (the stock model as an Engine with everything off) on ``trials``."""
    rows = []
    for i, t in enumerate(trials):
        base_tokens, _ = run_trial(baseline, t)
        tokens, kept = run_trial(engine, t)
        text, base_text = tokenizer.decode(tokens), tokenizer.decode(base_tokens)
        rows.append({"context": t.context, "depth": t.depth, "key": t.key, "answer": text, "baseline_answer": base_text,
                     "correct": answer_key(text) == t.key, "baseline_correct": answer_key(base_text) == t.key, "kept_fraction": kept})
        if progress:
            progress(i + 1, len(trials))
    return summarize(rows)


def summarize(rows: list[dict]) -> dict:
    """Accuracy, baseline accuracy and kept fraction overall, per context and per (context, depth)."""
    def stats(rs):
        return {"trials": len(rs), "accuracy": sum(r["correct"] for r in rs) / len(rs),
                "baseline_accuracy": sum(r["baseline_correct"] for r in rs) / len(rs),
                "kv_fraction": sum(r["kept_fraction"] for r in rs) / len(rs)}

    table = []
    for n in sorted({r["context"] for r in rows}):
        for d in sorted({r["depth"] for r in rows if r["context"] == n}):
            table.append({"context": n, "depth": d, **stats([r for r in rows if r["context"] == n and r["depth"] == d])})
    per_context = {str(n): stats([r for r in rows if r["context"] == n]) for n in sorted({r["context"] for r in rows})}
    return {**stats(rows), "per_context": per_context, "table": table, "trials_detail": rows}


def parse_depths(text: str | None) -> tuple[float, ...]:
    """'0.1,0.5,0.9' -> (0.1, 0.5, 0.9); each in [0, 1]."""
    if text is None:
        return DEFAULT_DEPTHS
    try:
        depths = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise QuicksilverError(f"--depths expects numbers in [0, 1] separated by commas, got {text!r}") from None
    if not depths or any(not 0 <= d <= 1 for d in depths):
        raise QuicksilverError(f"--depths expects numbers in [0, 1] separated by commas, got {text!r}")
    return depths
