"""How much does skipping one layer (or its MLP) for every token cost? A map for halting.

For each layer l, every token from position 4 on skips layer l (whole layer, or MLP only);
perplexity against the stock model on the first 1024 tokens of the wiki calibration split,
512-token windows. This is what a halted token does to the model, one layer at a time.

    python benchmarks/layer_skip_map.py [--out docs/results]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import header, run_meta  # noqa: E402
from quicksilver import load_corpus, load_model  # noqa: E402
from quicksilver.config import Config  # noqa: E402
from quicksilver.engine import Engine  # noqa: E402
from quicksilver.evaluate import EngineRunner, StockRunner, score_windows, tokenize_documents  # noqa: E402
from quicksilver.results_io import write_atomic  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--tokens", type=int, default=1024)
    args = ap.parse_args()
    model, tok = load_model("smollm2-135m")
    ids = tokenize_documents(tok, load_corpus("wiki", "calibration").documents, args.tokens)
    (base,) = score_windows([StockRunner(model)], ids, 512, 511, None, warmup=False)
    base_ppl = math.exp(base.nll / base.count)
    rows = []
    n_layers = model.config.num_hidden_layers
    for layer in range(2, n_layers):
        cells = []
        for skip in ("mlp", "layer"):
            # threshold 2 halts every unprotected token after layer 1; it then skips only `layer`.
            cfg = Config.from_dict({"halting": {"enabled": True, "threshold": 2.0, "min_layer": 1, "patience": 1,
                                                "tail_layers": 0, "protect_first": 4, "skip": skip, "skippable_layers": [layer]}})
            (t,) = score_windows([EngineRunner(Engine(model, cfg))], ids, 512, 511, None, warmup=False)
            cells.append(math.exp(t.nll / t.count) / base_ppl - 1)
        rows.append((layer, *cells))
        print(f"layer {layer}: mlp {cells[0] * 100:+.1f}%, layer {cells[1] * 100:+.1f}%", file=sys.stderr, flush=True)
    lines = [header(run_meta(), f"smollm2-135m float32, wiki calibration split, first {args.tokens} tokens, baseline PPL "
                                f"{base_ppl:.2f}. Relative perplexity increase when every token (from position 4) skips one "
                                "layer's MLP, or the whole layer."), "",
             "| layer | skip MLP | skip layer |", "|---|---|---|"]
    lines += [f"| {l} | {m * 100:+.1f}% | {w * 100:+.1f}% |" for l, m, w in rows]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "layer_map.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
