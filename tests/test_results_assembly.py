"""benchmarks/results.py's staleness rule and the first page's headline table (benchmarks/headline.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import headline  # noqa: E402
import results  # noqa: E402

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]


def _commit(repo: Path, path: str, text: str) -> str:
    (repo / path).parent.mkdir(parents=True, exist_ok=True)
    (repo / path).write_text(text)
    subprocess.run([*GIT, "add", path], cwd=repo, check=True)
    subprocess.run([*GIT, "commit", "-qm", path], cwd=repo, check=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()


def test_a_table_is_stale_when_src_changed_since_its_commit(tmp_path, monkeypatch):
    subprocess.run([*GIT, "init", "-q"], cwd=tmp_path, check=True)
    first = _commit(tmp_path, "src/a.py", "1")
    docs_only = _commit(tmp_path, "docs/x.md", "2")  # no src/ change since ``first``
    monkeypatch.setattr(results, "ROOT", tmp_path)
    table = lambda *commits: f"Command: `x` — today — machine — commit{'s' if len(commits) > 1 else ''} {', '.join(commits)}\n\n| a |"  # noqa: E731
    assert results.stale_reason(table(first)) is None
    assert results.stale_reason(table(first + "+dirty", docs_only)) is None
    assert "names no commit" in results.stale_reason("Command: `x` — today\n\n| a |")
    _commit(tmp_path, "src/a.py", "3")
    assert "src/ changed since its commit " + first[:10] in results.stale_reason(table(first))
    assert "src/ changed" in results.stale_reason(table(docs_only))  # any commit of several counts
    assert "not in this repository" in results.stale_reason(table("0" * 40))


def test_the_headline_comes_from_the_results_files_and_says_when_they_are_stale(tmp_path, monkeypatch):
    monkeypatch.setattr(headline, "RESULTS", tmp_path)
    assert "not measured" in headline.headline()  # no files: it says so, it invents nothing
    ours = lambda preset, tps, step="native", **kw: {"engine": "ours", "label": f"QuickSilver `{preset}`", "weights": "float32",  # noqa: E731
                                                     "step": step, "tokens_per_s": tps, "prefill_tokens_per_s": 500.0, **kw}
    rows = [{"engine": "ours", "label": "HF transformers", "weights": "float32", "step": "", "tokens_per_s": 10.0},
            ours("off", 30.0), ours("off", 15.0, "eager"), ours("fast", 80.0, batch8_tokens_per_s=200.0),
            {"engine": "llama_cpp", "label": "llama_cpp", "weights": "Q8_0", "tokens_per_s": 100.0, "prefill_tokens_per_s": 250.0},
            {"engine": "onnxruntime_genai", "label": "onnxruntime_genai", "weights": "int8", "tokens_per_s": 80.0,
             "batch8_tokens_per_s": 160.0}]
    (tmp_path / "peers.json").write_text(json.dumps({"rows": rows}))
    table = headline.headline("docs/RESULTS.md")
    assert "`off` float32 (native step): **30.0 tok/s**; 3.00x HF float32" in table  # the fastest step of the preset
    rows.append({**ours("fast", 90.0), "weights": "bfloat16"})  # a faster dtype leads, against HF in its dtype and in float32
    rows.append({"engine": "ours", "label": "HF transformers", "weights": "bfloat16", "step": "", "tokens_per_s": 30.0})
    (tmp_path / "peers.json").write_text(json.dumps({"rows": rows}))
    assert "`fast` bfloat16 (native step): **90.0 tok/s**; 3.00x HF bfloat16; 9.00x HF float32; 0.90x llama.cpp Q8_0" in headline.headline()
    rows[:] = rows[:-2]
    (tmp_path / "peers.json").write_text(json.dumps({"rows": rows}))
    assert "0.80x llama.cpp Q8_0; 1.00x onnxruntime-genai int8" in table
    assert "`fast` float32: 200.0 tok/s, 1.25x onnxruntime-genai int8" in table and "2.00x llama.cpp's best (250 tok/s)" in table
    assert "(docs/RESULTS.md#against-other-cpu-engines)" in table and "stale" not in table
    assert headline.headline(stale={"peers"}).count("(**stale**: measured on older code)") == 4  # 2 presets, batch 8, prefill


def test_step_timings_carry_only_a_step_measured_with_todays_command(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "RESULTS", tmp_path)
    monkeypatch.setattr(results, "STEPS", {"a": ["a.py"], "b": ["b.py", "--x", "1"], "c": ["c.py"]})
    old = [{"step": "a", "seconds": 60.0, "status": "ok", "command": "a.py", "started": "then", "commit": "1" * 40},
           {"step": "b", "seconds": 120.0, "status": "ok", "command": "b.py --x 2", "started": "then", "commit": "1" * 40}]
    (tmp_path / "make_results.json").write_text(json.dumps({"steps": old}))
    results.write_timings([{"step": "c", "seconds": 30.0, "status": "ok"}], "now")
    rows = {r["step"]: r for r in json.loads((tmp_path / "make_results.json").read_text())["steps"]}
    assert rows["a"]["seconds"] == 60.0 and rows["a"]["started"] == "then"  # carried: same command
    assert rows["b"]["seconds"] is None  # its command changed since: no time
    assert rows["c"]["started"] == "now" and rows["c"]["command"] == "c.py"
    text = (tmp_path / "make_results.md").read_text()
    assert "from 2 run(s)" in text and "2 of 3" in text and "not one run" in text
    results.write_timings([{"step": s, "seconds": 10.0, "status": "ok"} for s in ("a", "b", "c")], "later")
    assert "one run of every step" in (tmp_path / "make_results.md").read_text()
