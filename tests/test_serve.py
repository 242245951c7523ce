"""quicksilver serve: the scheduler in-process (batching, faults), then one real server driven by the openai client.

The model is a tiny random Llama with the default model's tokenizer (saved to a folder,
as a user's local model would be), so a server starts and answers in moments. Its EOS row
of the LM head is zeroed so that greedy runs are never cut short by a chance EOS.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from conftest import tiny_llama

from quicksilver.decoding import generate

LIMIT = 3000  # --max-tokens-limit: long enough that a stream is still running when the test drops it


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    from quicksilver.models import offline_model_folder

    folder = tmp_path_factory.mktemp("tiny-serve")
    tok = AutoTokenizer.from_pretrained(offline_model_folder("smollm2-135m"))
    model = tiny_llama(vocab_size=len(tok), max_position_embeddings=4096)
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] = 0
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def server_process(tiny_folder):
    """Start the server early (module scope) so it boots while the in-process tests run."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # One torch thread: the tiny model gains nothing from two, and the test process needs the other core.
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "quicksilver.cli", "serve", "--model", str(tiny_folder), "--port", str(port),
           "--max-batch", "2", "--max-queue", "1", "--max-tokens-limit", str(LIMIT)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield proc, f"http://127.0.0.1:{port}"
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def engine(tiny_folder):
    from quicksilver import Config
    from quicksilver.engine import Engine
    from quicksilver.models import load_model

    model, tok = load_model(str(tiny_folder), dtype="float32")  # the equality promise is for float32
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from two; on a busy machine spinning workers slow it 30x
    yield Engine(model, Config()), tok
    torch.set_num_threads(threads)


@pytest.fixture
def server(server_process):
    proc, url = server_process
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited: {proc.stdout.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return url
        except httpx.HTTPError:
            time.sleep(0.1)
    pytest.fail("server did not come up")


def _run_scheduler(engine, tok, requests, **kw):
    from quicksilver.serve import Scheduler

    sched = Scheduler(engine, tok, eos_token_ids=[tok.eos_token_id], **kw)
    sched.start()
    for r in requests:
        sched.submit(r)
    deadline = time.time() + 60
    while any(r.finished_at is None for r in requests) and time.time() < deadline:
        time.sleep(0.01)
    sched.stop()
    return sched


def test_a_batched_request_equals_itself_served_alone(server_process, engine):
    """Greedy and seeded sampling, rows joining at different steps: each equals its own generate() run."""
    from quicksilver.serve import GenerationRequest

    eng, tok = engine
    long = tok("The history of Rome " * 80).input_ids  # longer than the pool's first rows (256): the pool grows mid-run
    prompts = [tok(t).input_ids for t in ("The history of Rome", "Once upon a time there was", "A", "Water boils at")] + [long]
    settings = [dict(temperature=0.0), dict(temperature=0.9, seed=1), dict(temperature=0.0), dict(temperature=0.7, top_p=0.9, seed=5),
                dict(temperature=0.0)]
    lengths = [5 + 2 * i for i in range(len(prompts))]
    alones = [generate(eng, torch.tensor(p), n, eos_token_id=tok.eos_token_id, **s).tokens[0] for p, n, s in zip(prompts, lengths, settings)]
    for per_step in (1, 512):  # one newcomer per step boundary (rows join and leave at different steps), then several at once
        reqs = [GenerationRequest(prompt_ids=p, max_tokens=n, **s) for p, n, s in zip(prompts, lengths, settings)]
        sched = _run_scheduler(eng, tok, reqs, max_batch=3, prefill_tokens_per_step=per_step)
        for r, alone in zip(reqs, alones):
            assert r.tokens == alone and r.finish_reason == "length"
            assert r.text == tok.decode(alone, skip_special_tokens=True)
        assert sched.generated_tokens == sum(r.max_tokens for r in reqs) and sched.batch_size == 0 and sched.free_rows == 3
        spec = eng.spec
        assert sched.pool_bytes > 3 * 256 * spec.n_layers * 2 * spec.kv_dim * 4  # 3 rows of more than 256 float32 entries


def test_lossless_serving_equals_plain_decoding_under_concurrent_load(server_process, engine):
    """float32: the lossless preset served to 4 concurrent requests (verify passes over pooled rows, rows
    joining at different steps) gives each request exactly what ``generate`` with every mechanism off gives."""
    from quicksilver import Config
    from quicksilver.engine import Engine
    from quicksilver.serve import GenerationRequest

    eng, tok = engine
    lossless = Engine(eng.model, Config.preset("lossless"))
    base = "The cat sat on the mat. The dog sat on the log. "
    prompts = [tok(base * k + tail).input_ids for k, tail in ((3, "The cat"), (2, "The dog"), (4, "The"), (1, "Once"))]
    lengths = [24, 17, 30, 12]
    alones = [generate(eng, torch.tensor(p), n, eos_token_id=tok.eos_token_id).tokens[0] for p, n in zip(prompts, lengths)]
    reqs = [GenerationRequest(prompt_ids=p, max_tokens=n) for p, n in zip(prompts, lengths)]
    sched = _run_scheduler(lossless, tok, reqs, max_batch=4, prefill_tokens_per_step=64)
    assert [r.tokens for r in reqs] == alones
    stats = sched.batch.drafter.summary()
    assert stats["verify_passes"] > 0 and stats["accepted"] > 0  # drafts were verified and taken, not only plain steps
    assert sched.batch_size == 0 and sched.free_rows == 4


def test_a_cancelled_request_gives_its_row_to_the_next(server_process, engine):
    """One pool row: a running request is dropped, the waiting one gets that row, with none of its entries."""
    from quicksilver.serve import GenerationRequest, Scheduler

    eng, tok = engine
    sched = Scheduler(eng, tok, max_batch=1, eos_token_ids=[tok.eos_token_id]).start()
    first = GenerationRequest(prompt_ids=tok("A long story about ships").input_ids, max_tokens=LIMIT)
    second = GenerationRequest(prompt_ids=tok("Water boils at").input_ids, max_tokens=6)
    sched.submit(first)
    deadline = time.time() + 30
    while len(first.tokens) < 20 and time.time() < deadline:  # it has written more entries than the next one will
        time.sleep(0.01)
    sched.submit(second)
    held, pool = sched.free_rows, sched.pool_bytes
    sched.cancel(first)
    while second.finished_at is None and time.time() < deadline:
        time.sleep(0.01)
    sched.stop()
    assert held == 0 and second.finish_reason == "length" and first.finish_reason is None
    assert second.tokens == generate(eng, torch.tensor(second.prompt_ids), 6, eos_token_id=tok.eos_token_id).tokens[0]
    assert sched.free_rows == 1 and sched.pool_bytes == pool and sched.outcomes() == {"cancelled": 1, "length": 1}


def test_kv_skipping_rows_keep_caches_of_their_own(server_process, engine):
    """KV skipping shrinks caches row by row: no pool, and a batched row still equals itself alone."""
    from quicksilver import Config
    from quicksilver.engine import Engine
    from quicksilver.serve import GenerationRequest

    eng, tok = engine
    kv = Engine(eng.model, Config.from_dict({"kv": {"enabled": True, "sink_tokens": 1, "recent_window": 4}}))
    prompts = [tok(t).input_ids for t in ("The history of Rome", "Once upon a time there was")]
    reqs = [GenerationRequest(prompt_ids=p, max_tokens=8) for p in prompts]
    sched = _run_scheduler(kv, tok, reqs, max_batch=2)
    for r, p in zip(reqs, prompts):
        assert r.tokens == generate(kv, torch.tensor(p), 8, eos_token_id=tok.eos_token_id).tokens[0]
    assert sched.pool_bytes == 0 and sched.free_rows == 2


def test_an_engine_fault_fails_that_request_alone(server_process, engine):
    from quicksilver.serve import GenerationRequest

    eng, tok = engine

    class Faulty:  # the engine, except that a decode step at position 6 raises
        spec, model, config = eng.spec, eng.model, eng.config

        def run(self, ids, pos, segments, caches, logit_rows=None):
            if all(c.length > 0 for c in caches) and bool((pos == 6).any()):
                raise RuntimeError("injected fault")
            return eng.run(ids, pos, segments, caches, logit_rows)

    short, long = [1, 2, 3, 4, 5], tok("a much longer prompt that passes position six").input_ids
    events = []
    reqs = [GenerationRequest(prompt_ids=short, max_tokens=8, on_event=events.append), GenerationRequest(prompt_ids=long, max_tokens=8)]
    sched = _run_scheduler(Faulty(), tok, reqs, max_batch=2)
    assert events[-1].kind == "error" and "injected fault" in events[-1].message
    assert reqs[0].finish_reason is None and len(reqs[0].tokens) == 2
    assert reqs[1].tokens == generate(eng, torch.tensor(long), 8).tokens[0]  # its row was rolled back and rerun
    assert sched.failed == 1 and "injected fault" in sched.last_error


def test_stop_strings_end_the_text_before_the_stop(server_process, engine):
    from quicksilver.serve import GenerationRequest

    eng, tok = engine
    prompt = tok("The history of Rome").input_ids
    full = tok.decode(generate(eng, torch.tensor(prompt), 12).tokens[0], skip_special_tokens=True)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    deltas = []
    req = GenerationRequest(prompt_ids=prompt, max_tokens=12, stop=(stop, "never-seen"), on_event=lambda e: deltas.append(e.text))
    _run_scheduler(eng, tok, [req])
    assert req.finish_reason == "stop" and req.text == full[: full.index(stop)] == "".join(deltas)


def _client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)


def test_completions_and_chat_equal_quicksilver_generate(server, tiny_folder):
    from typer.testing import CliRunner

    from quicksilver.cli import app

    client, model = _client(server), str(tiny_folder)
    run = CliRunner().invoke
    cli = run(app, ["generate", "The history of Rome", "--model", model, "-n", "12"])
    got = client.completions.create(model=model, prompt="The history of Rome", max_tokens=12, temperature=0)
    assert got.choices[0].text == cli.stdout[:-1] and got.choices[0].finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens, got.usage.total_tokens) == (4, 12, 16)
    streamed = list(client.completions.create(model=model, prompt="The history of Rome", max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == got.choices[0].text and streamed[-1].choices[0].finish_reason == "length"

    cli = run(app, ["generate", "Tell me a story.", "--model", model, "-n", "7", "--chat"])
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=7, temperature=0)
    assert chat.choices[0].message.content == cli.stdout[:-1] and chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens == 7 and chat.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=7,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.completion_tokens == 7
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    seeded = [client.completions.create(model=model, prompt="Hi", max_tokens=6, temperature=1, seed=3).choices[0].text for _ in range(2)]
    assert seeded[0] == seeded[1]
    # the raw stream ends with data: [DONE]
    raw = httpx.post(server + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "stream": True}, timeout=30).text
    assert raw.rstrip().endswith("data: [DONE]")


def test_models_health_and_metrics(server, tiny_folder):
    assert [m.id for m in _client(server).models.list().data] == [str(tiny_folder)]
    health = httpx.get(server + "/health").json()
    assert health["status"] == "ok" and health["max_batch"] == 2
    metrics = httpx.get(server + "/metrics").text
    for name in ("quicksilver_requests_total", "quicksilver_generated_tokens_total", "quicksilver_queue_depth", "quicksilver_batch_size",
                 "quicksilver_time_to_first_token_seconds", "quicksilver_request_tokens_per_second", "quicksilver_kv_bytes",
                 "quicksilver_kv_full_bytes"):
        assert name in metrics


@pytest.mark.parametrize("body, status, param", [
    ('{"prompt": "x", "max_tokens": ', 400, None),  # malformed JSON
    ({"max_tokens": 3}, 400, "prompt"),  # missing field
    ({"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),  # wrong type
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": [5] * 5000, "max_tokens": 1}, 400, "prompt"),  # longer than the context (4096)
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": LIMIT + 1}, 400, "max_tokens"),
    ({"prompt": "x", "n": 2}, 400, "n"),
    ({"prompt": "x", "model": "gpt-4o"}, 404, "model"),
])
def test_bad_input_gets_an_openai_error(server, body, status, param):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) else {"json": body}
    r = httpx.post(server + "/v1/completions", timeout=30, **kw)
    assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert r.json()["error"]["param"] == param and "Traceback" not in r.text


def test_bad_input_through_the_client_and_the_server_stays_up(server):
    client = _client(server)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=None, prompt="x", max_tokens=LIMIT + 1)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=None, messages="not a list")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=None, prompt="x", n=3)
    assert client.completions.create(model=None, prompt="x", max_tokens=2).usage.completion_tokens == 2


def _health(url):
    return httpx.get(url + "/health").json()


def _wait(url, cond, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        h = _health(url)
        if cond(h):
            return h
        time.sleep(0.05)
    pytest.fail(f"timed out waiting; last health {h}")


def test_full_queue_gets_429_and_dropped_streams_free_their_rows(server):
    client = _client(server)
    before = _health(server)
    fresh = client.completions.create(model=None, prompt="Water boils at", max_tokens=4, temperature=0).choices[0].text
    streams = []
    for _ in range(2):  # fill the batch (max 2 rows) with long streams
        s = client.completions.create(model=None, prompt="Long", max_tokens=LIMIT, temperature=0, stream=True)
        next(iter(s))  # its first token came: it holds a row
        streams.append(s)
    streams.append(client.completions.create(model=None, prompt="Queued", max_tokens=LIMIT, stream=True))
    _wait(server, lambda h: h["queue_depth"] == 1 and h["batch_size"] == 2 and h["kv_bytes"] > 0)
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model=None, prompt="One too many", max_tokens=2)
    assert int(e.value.response.headers["retry-after"]) >= 0 and e.value.response.json()["error"]["code"] == "rate_limit_exceeded"
    for s in streams:  # clients go away mid-stream
        s.close()
    after = _wait(server, lambda h: h["batch_size"] == 0 and h["queue_depth"] == 0)
    assert after["kv_bytes"] == 0 and after["free_rows"] == 2 and after["finished"].get("cancelled", 0) - before["finished"].get("cancelled", 0) == 3
    assert after["generated_tokens"] - before["generated_tokens"] < LIMIT  # cancelled long before the end
    # the freed rows are reused, and nothing of the dropped streams' entries leaks into the next request
    assert client.completions.create(model=None, prompt="Water boils at", max_tokens=4, temperature=0).choices[0].text == fresh
    assert _wait(server, lambda h: h["free_rows"] == 2)["status"] == "ok"
