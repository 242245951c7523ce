"""Quest as the kvskip preset? Its teacher-forced cost on the calibration splits at 4,096-token windows.

Round 2 (``--round 2``): the rule issue #12's bars are checked on (2-key pages for a question,
16-key blocks for a prefill and a decode step) with ``min_keys=1024`` (contexts up to 1,024
tokens read in full; 25% of 4,096 is 1,024), at 25% and 50%, with 256- and 512-key recent
windows, and with query blocks of 32 instead of 128 (``attention.QUERY_BLOCK``, fresher page
choices in a teacher-forced pass). Usage: ``python benchmarks/notes/kvskip_candidates.py code --round 2``.

Prints the relative perplexity increase of quest at kept fractions 25/30/40% (4 sink keys, the
default 64-key recent window and 16-key pages, propagate policy: the preset helper kv2 proposed),
and of ``all`` with that quest in place of the window, against the stock model in bfloat16, on the
first 4,096 tokens of each corpus's calibration split. These are the numbers behind RESULTS'
"Quest was not made the kvskip preset". Usage:

    python benchmarks/notes/kvskip_candidates.py wiki,news,code
"""

from __future__ import annotations

import time

from quicksilver import load_model
from quicksilver.config import PRESETS, Config
from quicksilver.evaluate import evaluate_model

QUEST = {"enabled": True, "policy": "propagate", "sink_tokens": 4, "selection": "quest"}


def configs() -> dict[str, Config]:
    out = {f"quest{int(f * 100)}": Config.from_dict({"kv": {**QUEST, "keep_fraction": f}}) for f in (0.25, 0.3, 0.4)}
    for f in (0.3, 0.4):
        out[f"all(quest{int(f * 100)})"] = Config.from_dict({**PRESETS["all"], "kv": {**QUEST, "keep_fraction": f}})
    return out


ROUND2 = {"enabled": True, "sink_tokens": 4, "selection": "quest", "page_size": 2, "block_pages": 16, "min_keys": 1024}


def configs_round2() -> dict[str, tuple[Config, int]]:
    """name -> (config, query block)."""
    out = {f"2-key/16-block min_keys=1024 {int(f * 100)}%": (Config.from_dict({"kv": {**ROUND2, "keep_fraction": f}}), 128) for f in (0.25, 0.5)}
    for w in (256, 512):
        out[f"... 25%, recent window {w}"] = (Config.from_dict({"kv": {**ROUND2, "keep_fraction": 0.25, "recent_window": w}}), 128)
    for b in (32, 16):
        out[f"... 25%, query blocks of {b}"] = (Config.from_dict({"kv": {**ROUND2, "keep_fraction": 0.25}}), b)
    return out


def main() -> None:
    import argparse

    from quicksilver import attention

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpora", nargs="?", default="wiki,news,code", help="comma-separated calibration splits")
    ap.add_argument("--round", type=int, choices=(1, 2), default=1, help="1: quest 25-40%% and all with quest; 2: the #12 rule's variants")
    a = ap.parse_args()
    round2, corpora = a.round == 2, a.corpora.split(",")
    loaded = load_model("smollm2-135m", dtype="bfloat16")
    args = dict(split="calibration", window=4096, max_tokens=4096, loaded=loaded)
    block = attention.QUERY_BLOCK
    for corpus in corpora:
        base = evaluate_model(corpus=corpus, **args)["perplexity"]
        candidates = configs_round2() if round2 else {k: (c, block) for k, c in configs().items()}
        for name, (config, qb) in candidates.items():
            t = time.time()
            attention.QUERY_BLOCK = qb
            ppl = evaluate_model(corpus=corpus, config=config, **args)["perplexity"]
            attention.QUERY_BLOCK = block
            print(f"{corpus} {name}: {100 * (ppl / base - 1):+.2f}%  ({time.time() - t:.1f}s)", flush=True)


if __name__ == "__main__":
    main()
