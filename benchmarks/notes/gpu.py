"""The ablation and decode tables on a CUDA GPU, in under 8 minutes (nothing else depends on this).

    python benchmarks/notes/gpu.py [--model smollm2-135m] [--out docs/results/gpu] [--dtype float32] [--budget-s 450]

Runs ``sweep_engine.py --only ablation`` (wiki and news) and ``bench_decode.py`` with
``--device cuda``, each under its share of the time budget, and writes their tables to
``--out``. A step that fails or runs out of time is reported as such in ``gpu.md`` and the
others still run. What to expect: the engine's gather/compute/scatter saves FLOPs, but on
a GPU a 135M model at these sizes is launch-bound, so wall-clock ratios there measure
Python and kernel-launch overhead more than arithmetic; the int8 kernel is CPU-only
(fbgemm), so int8/AMQ rows run float matmuls over dequantized weights on CUDA.

``--model`` takes anything ``load_model`` does: a machine with network access can run a hub
checkpoint of any family the engine runs (``Qwen/Qwen2.5-0.5B-Instruct``,
``meta-llama/Llama-3.2-1B``), or a local ``.gguf`` file. The presets' layer indices (halting from
layer 10, AMQ's decision at layer 8) assume a model of at least 16 layers.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent  # benchmarks/
ROOT = HERE.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="offline name, .gguf file, folder or hub id")
    ap.add_argument("--out", default="docs/results/gpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--budget-s", type=float, default=450.0, help="total seconds for all steps (default 7.5 minutes)")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("error: no CUDA device visible to torch (torch %s); this script only runs on a GPU machine" % torch.__version__)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = ["--device", "cuda", "--dtype", args.dtype, "--model", args.model, "--out", str(out)]
    steps = [
        ("ablation, wiki", [str(HERE / "sweep_engine.py"), "--only", "ablation", "--tokens", str(args.tokens), *common], 0.4),
        ("ablation, news", [str(HERE / "sweep_engine.py"), "--only", "ablation", "--corpus", "news", "--tokens", str(args.tokens), *common], 0.3),
        ("decode", [str(HERE / "bench_decode.py"), *common], 0.3),
    ]
    start = time.time()
    report = [f"GPU run of `python benchmarks/notes/gpu.py {' '.join(sys.argv[1:])}` — "
              f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} — {torch.cuda.get_device_name(0)}, torch {torch.__version__} — model {args.model}", ""]
    for name, cmd, share in steps:
        left = args.budget_s - (time.time() - start)
        limit = max(min(args.budget_s * share + max(left - args.budget_s * share, 0) * 0.5, left), 1.0)
        t0 = time.time()
        try:
            done = subprocess.run([sys.executable, *cmd], cwd=ROOT, timeout=limit)
            status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        except subprocess.TimeoutExpired:
            status = f"stopped after {limit:.0f} s (time budget)"
        report.append(f"- {name}: {status}, {time.time() - t0:.0f} s")
        print(report[-1], file=sys.stderr, flush=True)
    for md in ("sweep_ablation.md", "sweep_ablation_news.md", "decode.md"):
        if (out / md).is_file():
            report += ["", (out / md).read_text().strip()]
    (out / "gpu.md").write_text("\n".join(report) + "\n")
    print(f"wrote {out / 'gpu.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
