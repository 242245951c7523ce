"""The CLI's promises: one-line errors with a non-zero exit, never a traceback; atomic JSON."""

import json
import sys

import pytest

from quicksilver import cli


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["quicksilver", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    captured = capsys.readouterr()
    return e.value.code, captured.out, captured.err


BAD = [
    (["eval", "--model", "nope"], "unknown model"),
    (["eval", "--stride", "-1"], "stride"),
    (["eval", "--max-tokens", "0"], "max-tokens"),
    (["eval", "--window", "abc"], "window"),
    (["eval", "--corpus", "nope"], "unknown corpus"),
    (["eval", "--dtype", "int3"], "dtype"),
    (["eval", "--text-file", "/no/such/file.txt"], "does not exist"),
    (["eval", "--output", "/no/such/dir/r.json"], "does not exist"),
    (["eval", "--no-such-flag"], "No such option"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_input_is_one_line_and_nonzero(monkeypatch, capsys, args, message):
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:") and message in lines[0]
    assert "Traceback" not in err


@pytest.mark.real_model
@pytest.mark.parametrize(
    "args,message",
    [(["--window", "9000"], "longer than the model's context"), (["--text-file", "BINARY"], "UTF-8"), (["--text-file", "EMPTY"], "empty")],
)
def test_bad_input_needing_the_model(monkeypatch, capsys, tmp_path, default_model, args, message):
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe\x00bad")
    (tmp_path / "e.txt").write_text("")
    args = [{"BINARY": str(tmp_path / "b.txt"), "EMPTY": str(tmp_path / "e.txt")}.get(a, a) for a in args]
    code, _, err = run_cli(monkeypatch, capsys, "eval", *args)
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.real_model
def test_eval_writes_json_with_the_documented_keys(monkeypatch, capsys, tmp_path, default_model):
    out = tmp_path / "r.json"
    code, stdout, _ = run_cli(monkeypatch, capsys, "eval", "--max-tokens", "300", "--window", "128", "--output", str(out))
    assert code == 0
    r = json.loads(out.read_text())
    for key in ("model", "corpus", "tokens", "window", "stride", "perplexity", "bits_per_byte", "word_perplexity",
                "flops", "wall_seconds", "tokens_per_second", "peak_memory_bytes", "config"):
        assert key in r
    assert r["tokens"] == 299 and r["window"] == 128
    assert "perplexity" in stdout
    assert not list(tmp_path.glob(".r.json.*"))  # no temp file left behind


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    from quicksilver.results_io import write_json_atomic

    p = tmp_path / "r.json"
    write_json_atomic(p, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(p, {"a": object()})
    assert json.loads(p.read_text()) == {"a": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["r.json"]


@pytest.mark.parametrize(
    "args,message",
    [(["generate", "   "], "empty prompt"), (["generate", "hi", "-n", "0"], "max-new-tokens"), (["generate", "hi", "--preset", "x"], "unknown preset"),
     (["generate", "hi", "--temperature", "-1"], "temperature")],
)
def test_generate_bad_input(monkeypatch, capsys, args, message):
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.real_model
def test_generate_streams_text_and_prints_a_one_line_summary(monkeypatch, capsys, default_model):
    code, out, err = run_cli(monkeypatch, capsys, "generate", "The capital of France is", "-n", "6", "--preset", "kvskip")
    assert code == 0
    assert out.strip()  # the streamed continuation
    summary = [line for line in err.splitlines() if "tokens/s" in line]
    assert len(summary) == 1 and "6 tokens" in summary[0] and "KV" in summary[0]


FAIL_EARLY = [
    (["eval", "--output", "/proc/forbidden.json"], "cannot write in output folder /proc"),  # os.access says yes to root
    (["calibrate", "--budget", "1%", "--output", "/proc/forbidden.json"], "cannot write in output folder /proc"),
    (["sweep", "--output-dir", "/proc/forbidden"], "cannot create output folder /proc/forbidden"),
    (["needle", "--output", "/proc/forbidden.json"], "cannot write in output folder /proc"),
    (["generate", "hi", "--temperature", "nan"], "temperature must be a finite number"),
    (["generate", "hi", "--temperature", "inf"], "temperature must be a finite number"),
    (["generate", "hi", "--seed", str(2**70)], "seed must be in"),
    (["generate", "hi", "--top-p", "nan"], "top-p"),
    (["eval", "--text-file", "/dev/null"], "is not a regular file"),
    (["needle", "--context", "0"], "--context must be a positive number"),
]


@pytest.mark.parametrize("args,message", FAIL_EARLY)
def test_bad_input_fails_before_any_work(monkeypatch, capsys, args, message):
    """Checked before a model loads or a corpus is read: exit 2 in moments, one line naming the problem."""
    import time

    t0 = time.perf_counter()
    code, _, err = run_cli(monkeypatch, capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert time.perf_counter() - t0 < 10


def test_a_tiny_temperature_is_greedy():
    assert cli._check_sampling(1e-300, None, None, None) == cli._check_sampling(0.0, None, None, None) == 0.0
    assert cli._check_sampling(0.7, 5, 0.9, 2**64 - 1) == 0.7
