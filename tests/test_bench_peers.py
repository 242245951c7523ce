"""benchmarks/bench_peers.py without its peers: rows from raw timings, the table, a peer that failed."""

import importlib.util
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(HERE))
spec = importlib.util.spec_from_file_location("bench_peers", HERE / "bench_peers.py")
bench_peers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_peers)

REF = [[1, 2, 3, 4], [5, 6, 7, 8]]


def raw(tokens, seconds=(1.0, 1.0), ttft=(0.1, 0.1), batch=None):
    r = {"tokens": tokens, "seconds": list(seconds), "ttft": list(ttft), "prefill_seconds": [0.5, 0.4, 0.6]}
    if batch:
        r.update(batch_tokens=batch, batch_seconds=0.5)
    return r


def test_summarize_reads_rates_steps_agreement_and_bandwidth():
    row = bench_peers.summarize("llama_cpp", "llama_cpp|Q8_0|", raw([[1, 2, 9, 9], [5, 6, 7, 8]]), 144e6, REF, 4, 1024, 60.0, {})
    assert row["tokens_per_s"] == pytest.approx(8 / 2.0)
    assert row["ms_per_step"] == pytest.approx(1000 * 1.8 / 6)  # time after the first token over the steps after it
    assert row["prefill_tokens_per_s"] == pytest.approx(1024 / 0.5)  # the median of three
    assert row["agreement"] == pytest.approx(6 / 8) and row["first_divergence"] == 2 and row["common_prefix"] == 3
    assert row["weight_GBps"] == pytest.approx(144e6 / 0.3 / 1e9) and row["copy_share"] == pytest.approx(row["weight_GBps"] / 60)
    assert "batch8_tokens_per_s" not in row
    ours = bench_peers.summarize("ours", "QuickSilver `fast`|float32|eager", raw(REF, batch=REF), 140e6, REF, 4, 1024, 60.0, {})
    assert (ours["label"], ours["weights"], ours["step"]) == ("QuickSilver `fast`", "float32", "eager")
    assert ours["batch8_tokens_per_s"] == 16 and ours["batch8_agreement"] == 1.0


def test_table_shows_a_peer_that_failed_and_the_gap():
    meta = {"command": "python benchmarks/bench_peers.py", "date": "d", "machine": "m", "new_tokens": 4, "threads": 2,
            "prefill_tokens": 1024}
    ours = bench_peers.summarize("ours", "QuickSilver `off`|float32|eager", raw(REF), 500e6, REF, 4, 1024, 60.0, {})
    peer = bench_peers.summarize("onnxruntime_genai", "onnxruntime_genai|int8|", raw(REF, seconds=(0.5, 0.5)), 150e6, REF, 4,
                                 1024, 60.0, {})
    failed = {"engine": "ctranslate2", "label": "ctranslate2", "weights": "float32", "step": "", "error": "not installed: no wheel"}
    text = bench_peers.render({"meta": meta, "rows": [peer, failed, ours], "versions": {"ctranslate2": "x"}})
    lines = text.splitlines()
    table = [l for l in lines if l.startswith("| ")][1:]
    assert table[0].startswith("| QuickSilver `off` | float32 | eager |")  # ours first, then the peers in order
    assert table[1].startswith("| onnxruntime-genai 0.18 | int8 |") and "**not installed: no wheel**" in table[2]
    assert any("onnxruntime-genai 0.18 int8: 133.33 ms/step, 2.25x our speed" in l for l in lines)
    assert "bfloat16" in lines[0]  # the header says whether this CPU runs bfloat16 natively
