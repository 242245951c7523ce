"""The first page's headline table, drawn from the results files (never typed in by hand).

``results.py`` puts it at the top of docs/RESULTS.md and between the ``headline`` markers of the
README. Each row links to the section whose table it comes from; a row whose file is missing
says so instead of inventing a number.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def _tps(row: dict, batch: int = 1) -> float | None:
    v = row.get("tokens_per_s" if batch == 1 else f"batch{batch}_tokens_per_s")
    return float(v) if isinstance(v, (int, float)) else None


def _peer_rows() -> list[dict]:
    return (_load("peers.json") or {}).get("rows", [])


def _best(rows: list[dict], label: str, weights: str, batch: int = 1) -> dict | None:
    found = [r for r in rows if r.get("label") == label and r.get("weights") == weights and _tps(r, batch)]
    return max(found, key=lambda r: _tps(r, batch)) if found else None


def _fastest(rows: list[dict], label: str, batch: int = 1) -> dict | None:
    """Our fastest row of ``label`` in either dtype (the machine decides which: bfloat16 pays only where the CPU runs it natively)."""
    found = [r for r in (_best(rows, label, d, batch) for d in ("float32", "bfloat16")) if r is not None]
    return max(found, key=lambda r: _tps(r, batch)) if found else None


PEERS = {"off": [("llama_cpp", "F32", "llama.cpp F32"), ("llama_cpp", "BF16", "llama.cpp BF16"),
                 ("onnxruntime_genai", "fp32", "onnxruntime-genai fp32")],
         "fast": [("llama_cpp", "Q8_0", "llama.cpp Q8_0"), ("onnxruntime_genai", "int8", "onnxruntime-genai int8")],
         "fast4": [("llama_cpp", "Q4_1", "llama.cpp Q4_1"), ("onnxruntime_genai", "int4", "onnxruntime-genai int4")]}


def decode_rows(link: str) -> list[str]:
    rows = _peer_rows()
    if not rows:
        return [f"| Decode | not measured (no `docs/results/peers.json`) | [{link}]({link}) |"]
    out = []
    for preset, peers in PEERS.items():
        r = _fastest(rows, f"QuickSilver `{preset}`")
        if r is None:
            continue
        dtype = r["weights"]
        cells = [f"`{preset}` {dtype} ({r.get('step') or 'eager'} step): **{_tps(r):.1f} tok/s**"]
        for hf_dtype in dict.fromkeys([dtype, "float32"]):  # HF in the same dtype, and in float32 (HF's default)
            hf = _best(rows, "HF transformers", hf_dtype)
            if hf is not None:
                cells.append(f"{_tps(r) / _tps(hf):.2f}x HF {hf_dtype}")
        for label, weights, name in peers:
            peer = _best(rows, label, weights)
            if peer is not None:
                cells.append(f"{_tps(r) / _tps(peer):.2f}x {name}")
        out.append("| Decode, batch 1 | " + "; ".join(cells) + f" | [{link}]({link}) |")
    b8, ort8 = _fastest(rows, "QuickSilver `fast`", 8), _best(rows, "onnxruntime_genai", "int8", 8)
    if b8 and ort8:
        out.append(f"| Decode, batch 8 | `fast` {b8['weights']}: {_tps(b8, 8):.1f} tok/s, {_tps(b8, 8) / _tps(ort8, 8):.2f}x "
                   f"onnxruntime-genai int8 | [{link}]({link}) |")
    ours = max((r for r in rows if r["label"].startswith("QuickSilver") and r.get("prefill_tokens_per_s")),
               key=lambda r: r["prefill_tokens_per_s"], default=None)
    peer_pf = max((r.get("prefill_tokens_per_s") or 0 for r in rows if r["label"] == "llama_cpp"), default=0)
    if ours and peer_pf:
        ours_pf = ours["prefill_tokens_per_s"]
        out.append(f"| Prefill, 1,024 tokens | {ours['label'].removeprefix('QuickSilver ')} {ours['weights']}: {ours_pf:.0f} tok/s, "
                   f"{ours_pf / peer_pf:.2f}x llama.cpp's best ({peer_pf:.0f} tok/s) | "
                   f"[{link}]({link}) |")
    return out


def lossless_rows(link: str) -> list[str]:
    data = _load("serve.json") or {}
    rows = [r for r in data.get("lossless", []) if r.get("mode") == "lossless"]
    if not rows:
        return [f"| `lossless` | not measured in this report's serving run | [{link}]({link}) |"]
    cells = [f"{r['prompts']} prompts {r['speedup_vs_off']:.2f}x `off` ({r['mismatched']} answers differ)" for r in rows]
    return ["| `lossless` (speculative, output equals `off`), served to 4 clients | " + "; ".join(cells) + f" | [{link}]({link}) |"]


def long_context_rows(link: str) -> list[str]:
    data = _load("long_context.json") or {}
    rule = "quest+page_size=2+block_pages=16+min_keys=1024+dense_prefill=1"
    cells = []
    for corpus in ("news", "wiki"):
        n = data.get("needle", {}).get(f"{corpus}/4096/{rule}/0.25")
        w = data.get("needle", {}).get(f"{corpus}/4096/window/0.25")
        c = data.get("continuation", {}).get(f"{corpus}/4096/{rule}/0.25")
        cw = data.get("continuation", {}).get(f"{corpus}/4096/window/0.25")
        if n and c:
            part = (f"{corpus}: pass keys {round(n['accuracy'] * n['trials'])}/{n['trials']} (stock "
                    f"{round(n['baseline_accuracy'] * n['trials'])}" + (f", window {round(w['accuracy'] * w['trials'])}" if w else "")
                    + f"), continuation {c['relative_delta_perplexity'] * 100:+.2f}%"
                    + (f" (window {cw['relative_delta_perplexity'] * 100:+.2f}%)" if cw else ""))
            cells.append(part)
    if not cells:
        return [f"| Long context, 25% of keys | not measured | [{link}]({link}) |"]
    return ["| Long context (4,096 tokens), `kvskip` reading 25% of keys | " + "; ".join(cells) + f" | [{link}]({link}) |"]


def paper_rows(link: str) -> list[str]:
    data = _load("pareto_wiki/sweep.json") or {}
    rows = [r for r in data.get("rows", []) if r.get("kind") != "baseline" and r.get("relative_delta_perplexity", 1) <= 0.01]
    if not rows:
        return [f"| The paper's claim (39.6% of FLOPs at +0.2 perplexity) | not measured | [{link}]({link}) |"]
    best = max(rows, key=lambda r: r["flop_reduction"])
    window = (data.get("meta") or {}).get("window")
    span = f" over {window:,}-token windows" if window else ""  # KV skipping saves more the longer the context
    return [f"| The paper's claim: up to 39.6% of FLOPs at +<= 0.2 perplexity (about +1%) | here at most "
            f"**{best['flop_reduction'] * 100:.1f}%** within +1%{span} ({best['series']}: {best['label']}, "
            f"{best['relative_delta_perplexity'] * 100:+.2f}%, {best['speedup']:.2f}x wall clock) | [{link}]({link}) |"]


def serving_rows(link: str) -> list[str]:
    data = _load("serve.json") or {}
    rows = [r for r in data.get("rows", []) if r.get("mode") == "continuous"]
    if not rows:
        return []
    top = max(rows, key=lambda r: r["tokens_per_second"])
    return [f"| Serving throughput (continuous batching) | {top['tokens_per_second']:.1f} tok/s at {top['concurrency']} clients, "
            f"{top['speedup_vs_one_at_a_time']:.1f}x one request at a time, {top['mismatched']} answers differ | [{link}]({link}) |"]


SOURCES = [("peers", decode_rows, "against-other-cpu-engines"), ("serve", lossless_rows, "serving"),
           ("long_context", long_context_rows, "long-context"), ("pareto_wiki", paper_rows, "pareto-sweeps-against-matched-baselines"),
           ("serve", serving_rows, "serving")]


def headline(results_link: str = "", stale: set[str] | frozenset = frozenset()) -> str:
    """The table: ``results_link`` prefixes each link (``docs/RESULTS.md`` from the README, empty inside RESULTS);
    a row whose source table is in ``stale`` (measured on older code) says so."""
    lines = ["| what | measured (each number from the linked section's table) | where |", "|---|---|---|"]
    for source, rows, anchor in SOURCES:
        for row in rows(f"{results_link}#{anchor}"):
            if source in stale:
                cells = row.rsplit(" | ", 1)
                row = f"{cells[0]} (**stale**: measured on older code) | {cells[1]}"
            lines.append(row)
    return "\n".join(lines)
