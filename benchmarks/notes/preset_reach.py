"""The shortest context at which each mechanism of each preset acts: the ``acts_from`` of PRESET_INFO.

Runs every mechanism of every preset alone on the first N tokens of the wiki test split, for
N on a grid, and prints what it did (tokens halted, fused, (query, key) pairs skipped, tokens
below 16 bits). The answer is monotone in N: the engine is causal, so a token's decision only
depends on the tokens before it. Usage:

    python benchmarks/notes/preset_reach.py [--lengths 256,512,1024,2048,3072,4096] [--presets all]

About 5 minutes on 2 CPU cores. Compare its output with ``acts_from`` in src/quicksilver/config.py.
"""

from __future__ import annotations

import argparse

import torch

from quicksilver import Config, Engine, load_corpus, load_model
from quicksilver.config import MECHANISMS, PRESET_INFO, PRESETS
from quicksilver.evaluate import tokenize_documents


def acted(ledger, section: str) -> int:
    """How many decisions of the mechanism changed anything in this forward pass."""
    if section == "halting":
        return ledger.halted_tokens
    if section == "fusion":
        return ledger.fused_tokens
    if section == "kv":
        return ledger.pairs_full - ledger.pairs_seen
    return ledger.tokens * ledger.n_layers - ledger.bits_hist[16]  # amq: token-layers not at 16 bits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="256,512,1024,2048,3072,4096")
    ap.add_argument("--presets", default=",".join(p for p in PRESETS if p != "off"))
    args = ap.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    model, tok = load_model("smollm2-135m")
    ids = tokenize_documents(tok, load_corpus("wiki", "test").documents, max(lengths))
    calibration = tokenize_documents(tok, load_corpus("wiki", "calibration").documents, 2048)
    print("preset | mechanism | acts_from (config.py) | " + " | ".join(f"{n} tokens" for n in lengths))
    for name in args.presets.split(","):
        full = Config.preset(name)
        for section in MECHANISMS:
            if not getattr(full, section).enabled:
                continue
            alone = Config(**{section: getattr(full, section)})
            engine = Engine(model, alone, calibration_ids=calibration)
            counts = [acted(engine(ids[:n], torch.tensor([n - 1])).ledger, section) for n in lengths]
            claimed = PRESET_INFO[name].acts_from.get(section)
            print(f"{name} | {section} | {claimed} | " + " | ".join(str(c) for c in counts), flush=True)


if __name__ == "__main__":
    main()
