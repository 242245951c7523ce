"""Quest as the kvskip preset? Its teacher-forced cost on the calibration splits at 4,096-token windows.

Prints the relative perplexity increase of quest at kept fractions 25/30/40% (4 sink keys, the
default 64-key recent window and 16-key pages, propagate policy: the preset helper kv2 proposed),
and of ``all`` with that quest in place of the window, against the stock model in bfloat16, on the
first 4,096 tokens of each corpus's calibration split. These are the numbers behind RESULTS'
"Quest was not made the kvskip preset". Usage:

    python benchmarks/kvskip_candidates.py wiki,news,code
"""

from __future__ import annotations

import sys
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


def main() -> None:
    corpora = (sys.argv[1] if len(sys.argv) > 1 else "wiki,news,code").split(",")
    loaded = load_model("smollm2-135m", dtype="bfloat16")
    args = dict(split="calibration", window=4096, max_tokens=4096, loaded=loaded)
    for corpus in corpora:
        base = evaluate_model(corpus=corpus, **args)["perplexity"]
        for name, config in configs().items():
            t = time.time()
            ppl = evaluate_model(corpus=corpus, config=config, **args)["perplexity"]
            print(f"{corpus} {name}: {100 * (ppl / base - 1):+.2f}%  ({time.time() - t:.1f}s)", flush=True)


if __name__ == "__main__":
    main()
