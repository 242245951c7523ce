"""benchmarks/harness.py: the header, tables, results files, agreement and the interleaved timer."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama

spec = importlib.util.spec_from_file_location("harness", Path(__file__).resolve().parent.parent / "benchmarks" / "harness.py")
harness = importlib.util.module_from_spec(spec)
spec.loader.exec_module(harness)


def test_interleaved_rotates_which_side_runs_first():
    calls = []
    sides = {name: (lambda g, name=name: calls.append((g, name)) or f"{name}{g}") for name in "abc"}
    out = harness.interleaved(sides, [0, 1, 2, 3])
    assert out == {n: [f"{n}{g}" for g in range(4)] for n in "abc"}
    firsts = [next(name for g, name in calls if g == group) for group in range(4)]
    assert firsts == ["a", "b", "c", "a"]  # no side always first (bench_decode ran HF first every time)
    assert [name for g, name in calls if g == 1] == ["b", "c", "a"]


def test_greedy_agreement_and_common_prefix():
    ref = [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert harness.greedy_agreement(ref, ref) == (1.0, None)
    frac, first = harness.greedy_agreement([[1, 2, 9, 4], [5, 6, 7, 0]], ref)
    assert frac == 6 / 8 and first == 2
    assert harness.greedy_agreement([[1, 2], [5, 6, 7, 8]], ref) == (6 / 8, None)  # a row cut short counts as different
    assert harness.common_prefix([[1, 2, 9, 4], [5, 6, 7, 8]], ref) == (2 + 4) / 2
    with pytest.raises(ValueError):
        harness.greedy_agreement([[1]], ref)


def test_merge_rows_replaces_in_place_and_appends_new():
    old = [{"k": 1, "v": "old"}, {"k": 2, "v": "old"}]
    new = [{"k": 2, "v": "new"}, {"k": 3, "v": "new"}]
    assert harness.merge_rows(old, new, lambda r: r["k"]) == [{"k": 1, "v": "old"}, {"k": 2, "v": "new"}, {"k": 3, "v": "new"}]
    a = {"command": "run a", "commands": ["run a"], "date": "2026-01-01 10:00 UTC"}
    b = {"command": "run b", "commands": ["run b"], "date": "2026-01-02 11:00 UTC", "commit": "abc"}
    m = harness.merge_meta(a, b)
    assert m["commands"] == ["run a", "run b"] and m["date"] == "2026-01-01 10:00 UTC – 2026-01-02 11:00 UTC"
    assert m["commit"] == "abc"
    assert harness.merge_meta(m, {**b, "date": "2026-01-03 09:00 UTC"})["date"] == "2026-01-01 10:00 UTC – 2026-01-03 09:00 UTC"
    assert harness.merge_meta({}, b) == b


def test_markdown_table_and_header():
    assert harness.markdown_table(["a", "b"], [(1, None), ("x", 2.5)]) == "| a | b |\n|---|---|\n| 1 |  |\n| x | 2.5 |"
    with pytest.raises(ValueError, match="3 cells"):
        harness.markdown_table(["a", "b"], [(1, 2, 3)])
    meta = harness.run_meta(argv=[str(harness.ROOT / "benchmarks" / "bench_x.py"), "--out", "d"])
    assert meta["command"] == "python benchmarks/bench_x.py --out d"
    line = harness.header(meta, "what was run")
    assert line.startswith("Command: `python benchmarks/bench_x.py --out d` — ")
    assert meta["machine"] in line and f"torch {torch.__version__}" in line and line.endswith("; what was run")
    assert f"commit {meta['commit']}" in line and torch.get_num_threads() == meta["threads"]


def test_git_commit_says_dirty_when_tracked_files_differ(tmp_path):
    assert harness.git_commit(tmp_path) == "unknown"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "f").write_text("1")
    subprocess.run([*git, "add", "f"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "x"], cwd=tmp_path, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    (tmp_path / "untracked").write_text("ignored for the verdict")
    assert harness.git_commit(tmp_path) == head
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "table.md").write_text("a")
    subprocess.run([*git, "add", "docs/table.md"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "y"], cwd=tmp_path, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    (tmp_path / "docs" / "table.md").write_text("b")  # a result written during a run is not a code change
    assert harness.git_commit(tmp_path) == head
    (tmp_path / "f").write_text("2")
    assert harness.git_commit(tmp_path) == head + "+dirty"


def test_write_and_load_results(tmp_path):
    assert harness.load_results(tmp_path / "none.json") == {}
    harness.write_results(tmp_path / "out", "x", {"rows": [1]}, "| a |")
    assert json.loads((tmp_path / "out" / "x.json").read_text()) == {"rows": [1]}
    assert (tmp_path / "out" / "x.md").read_text() == "| a |\n"
    assert harness.load_results(tmp_path / "out" / "x.json") == {"rows": [1]}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x.json", "x.md"]  # no temporary file left


def test_hf_generate_gives_exactly_n_tokens_left_padded_like_alone():
    model = tiny_llama()
    model.generation_config.eos_token_id = 3
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    rows, seconds = harness.hf_generate(model, prompts, 6, pad_token_id=0)
    assert [len(r) for r in rows] == [6, 6] and seconds > 0
    alone, _ = harness.hf_generate(model, prompts[:1], 6, pad_token_id=0)
    assert rows[0] == alone[0]


def test_the_harness_imports_only_the_standard_library():
    """A peer's worker (another venv: no torch, no quicksilver) imports it."""
    code = (f"import sys; sys.path.insert(0, {str(harness.ROOT / 'benchmarks')!r}); import harness; "
            "print(sorted(m for m in ('torch', 'quicksilver', 'transformers', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


class FakeRunner:
    """Decodes ``token = prompt[-1] + step``; logs its calls."""

    def __init__(self, name, calls, batches=True):
        self.name, self.calls, self.batches = name, calls, batches

    def generate(self, prompts, n):
        self.calls.append((self.name, len(prompts), n))
        return [[p[-1] + i for i in range(n)] for p in prompts], 0.1 * n, 0.1


def test_measure_decode_times_every_runner_alike_and_batches_only_where_it_can():
    calls = []
    runners = {"a": FakeRunner("a", calls), "b": FakeRunner("b", calls, batches=False)}
    out = harness.measure_decode(runners, [[1, 2], [5], [7, 8, 9]], [3] * 10, 4, reps=3)
    assert out["a"]["tokens"] == out["b"]["tokens"] == [[2, 3, 4, 5], [5, 6, 7, 8], [9, 10, 11, 12]]
    assert out["a"]["seconds"] == [0.4, 0.4, 0.4] and out["b"]["ttft"] == [0.1, 0.1, 0.1]
    assert out["a"]["batch_tokens"] == out["a"]["tokens"] and "batch_tokens" not in out["b"]
    assert len(out["a"]["prefill_seconds"]) == len(out["b"]["prefill_seconds"]) == 3
    timed = [c for c in calls if c[2] == 4 and c[1] == 1]  # after the warm-ups: the batch-1 turns
    assert [c[0] for c in timed] == ["a", "b", "b", "a", "a", "b"]  # who goes first alternates
    assert ("b", 3, 8) not in calls and ("a", 3, 8) in calls  # warm-up of the batch shape where it batches
