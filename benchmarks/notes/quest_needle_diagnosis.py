"""Why quest loses pass keys at a small kept fraction: the question's page choice, or the prefill?

For each variant, each trial is run as ``quicksilver needle`` runs it (same trials: wiki test,
seed 0, the default depths), except that a variant may prefill the context with every key
(``full-prefill``) or let the question and answer read every key (``full-question``). For the
question's last query it prints, per layer and KV head, the share of the needle's tokens
that query reads (``cov``), and whether the pass key came back. Usage:

    python benchmarks/notes/quest_needle_diagnosis.py --context 4096 --trials 3,4,5,7,8 \\
        --variants '{"p16": ["", {}], "p8": ["", {"page_size": 8}], "fq": ["full-question", {}]}'

A variant is ``[mode, kv settings over quest at --keep]``; mode is "", "full-prefill" or
"full-question". Output: one JSON line per (variant, trial), then a summary per variant.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT / "src"))

import quicksilver.engine as engine_module  # noqa: E402
from quicksilver import load_corpus, load_model  # noqa: E402
from quicksilver.cache import SequenceCache  # noqa: E402
from quicksilver.config import Config  # noqa: E402
from quicksilver.engine import Engine  # noqa: E402
from quicksilver.evaluate import tokenize_documents  # noqa: E402
from quicksilver.decoding import decode_one_token, prefill  # noqa: E402
from quicksilver.needle import ANSWER_TOKENS, DEFAULT_DEPTHS, NEEDLE, answer_key, extend, make_trials  # noqa: E402

RECORD = {"on": False, "masks": []}
_attend_selected = engine_module.attend_selected


def _recording(q, k, v, q_pos, k_pos, scale, kv, bias=None, return_mask=False, pages=None):
    """The engine's attend_selected, keeping what the last query of each call reads (while recording)."""
    out, seen, full = _attend_selected(q, k, v, q_pos, k_pos, scale, kv, bias, return_mask=True, pages=pages)
    if RECORD["on"]:
        RECORD["masks"].append((full[:, -1].clone(), k_pos.clone()))
    return out, seen, full


@contextlib.contextmanager
def kv_off(engine, off: bool):
    saved = engine.config.kv.enabled
    engine.config.kv.enabled = saved and not off
    try:
        yield
    finally:
        engine.config.kv.enabled = saved


@torch.inference_mode()
def run(engine, trial, n_layers: int, mode: str):
    """Answer text and the recorded masks of the question's last query (one per quest layer)."""
    cache = SequenceCache(n_layers, capacity=trial.ids.numel() + trial.question.numel() + ANSWER_TOKENS)
    with kv_off(engine, mode == "full-prefill"):
        prefill(engine, trial.ids, cache)
    RECORD["on"], RECORD["masks"] = True, []
    with kv_off(engine, mode == "full-question"):
        logits, _ = extend(engine, trial.question, cache)
        RECORD["on"] = False
        tokens = [int(logits.argmax(-1))]
        for _ in range(ANSWER_TOKENS - 1):
            logits, _ = decode_one_token(engine, torch.tensor(tokens[-1:]), [cache])
            tokens.append(int(logits.argmax(-1)))
    return tokens, RECORD["masks"]


def needle_span(tok, trial) -> tuple[int, int]:
    """Positions [a, b) of the needle sentence in the trial's ids."""
    ids = trial.ids.tolist()
    needle = tok(NEEDLE.format(key=trial.key), add_special_tokens=False).input_ids
    for i in range(len(ids) - len(needle) + 1):
        if ids[i : i + len(needle)] == needle:
            return i, i + len(needle)
    raise RuntimeError("needle not found")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--trials", default="0,1,2,3,4,5,6,7,8,9", help="trial indices (of 10, as long_context.py's needle)")
    ap.add_argument("--keep", type=float, default=0.25)
    ap.add_argument("--variants", required=True, help='JSON: {"name": [mode, {kv settings}]}')
    args = ap.parse_args()
    torch.manual_seed(0)
    engine_module.attend_selected = _recording
    model, tok = load_model("smollm2-135m", dtype="auto")
    haystack = tokenize_documents(tok, load_corpus("wiki", "test").documents, args.context * 4)
    trials = make_trials(tok, haystack, [args.context], DEFAULT_DEPTHS, 10, 0)
    n_layers = model.config.num_hidden_layers
    summary = {}
    for name, (mode, extra) in json.loads(args.variants).items():
        kv = {"enabled": True, "selection": "quest", "keep_fraction": args.keep, "sink_tokens": 4, **extra}
        engine = Engine(model, Config.from_dict({"kv": kv}))
        for i in (int(x) for x in args.trials.split(",")):
            t, t0 = trials[i], time.perf_counter()
            tokens, masks = run(engine, t, n_layers, mode)
            a, b = needle_span(tok, t)
            cov = [[round(float(m[h, (kp >= a) & (kp < b)].float().mean()), 2) for h in range(m.shape[0])] for m, kp in masks]
            text = tok.decode(tokens)
            ok = answer_key(text) == t.key
            summary.setdefault(name, []).append(ok)
            print(json.dumps({"variant": name, "trial": i, "depth": t.depth, "key": t.key, "answer": text, "correct": ok,
                              "seconds": round(time.perf_counter() - t0, 1), "cov": cov}), flush=True)
    for name, oks in summary.items():
        print(f"{name}: {sum(oks)}/{len(oks)} pass keys", flush=True)


if __name__ == "__main__":
    main()
