"""Fuzzing quicksilver serve from its own OpenAPI schema (hypothesis + hypothesis-jsonschema).

Bodies the schema allows, the same bodies with one field replaced by any JSON value, any JSON
value at all and raw bytes go to both POST endpoints of the app in-process (a tiny random Llama
with the default model's tokenizer); any model id goes to ``GET /v1/models/{id}``. The property:
no answer is a 5xx, and afterwards ``/health`` answers with no failed request.

A few seconds by default, with a fixed seed; ``QUICKSILVER_FUZZ_EXAMPLES=2000`` runs longer,
with fresh random inputs each time.
"""

from __future__ import annotations

import json
import os
from urllib.parse import quote

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
hypothesis_jsonschema = pytest.importorskip("hypothesis_jsonschema")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import tiny_llama  # noqa: E402

EXAMPLES = int(os.environ.get("QUICKSILVER_FUZZ_EXAMPLES", "0"))
RUN = settings(max_examples=EXAMPLES or 80, deadline=None, database=None, derandomize=not EXAMPLES,
               suppress_health_check=list(HealthCheck))
PATHS = ("/v1/completions", "/v1/chat/completions")


@pytest.fixture(scope="module")
def fuzzed():
    from fastapi.testclient import TestClient
    from transformers import AutoTokenizer

    from quicksilver import Config
    from quicksilver.engine import Engine
    from quicksilver.models import offline_model_folder
    from quicksilver.serve import ServeSettings, create_app

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread, no spinning workers on a busy machine
    tok = AutoTokenizer.from_pretrained(offline_model_folder("smollm2-135m"))
    model = tiny_llama(vocab_size=len(tok), max_position_embeddings=512)
    with torch.no_grad():
        model.lm_head.weight.mul_(300)  # logits of a real model's size (tens), which a tiny temperature overflows
    engine = Engine(model, Config())
    # A short max_tokens limit: a request that is valid generates a few tokens at most.
    app = create_app(engine, tok, "tiny", ServeSettings(max_batch=4, max_queue=4, max_tokens_limit=4))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, app.openapi()
    torch.set_num_threads(threads)


# Any JSON value, with the edges that broke the server once: lone surrogates, seeds past 64 bits,
# temperatures that overflow logits, NaN and infinities (Python's json writes and reads them).
ODD_TEXT = st.text(st.characters(exclude_categories=()) | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), max_size=16)
EDGES = st.sampled_from([2**64, -(2**64) - 1, 2**63, 1e-300, 5e-324, 1e308, -0.0, True, False, "", "<|im_start|>system"])
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=16) | ODD_TEXT | EDGES
ANYTHING = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                        max_leaves=8)


def _places(value, path=()):
    """Every place in a JSON value: the paths to it and to everything inside it."""
    yield path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, inner in items:
        yield from _places(inner, path + (key,))


def _replaced(value, path, new):
    if not path:
        return new
    value = dict(value) if isinstance(value, dict) else list(value)
    value[path[0]] = _replaced(value[path[0]], path[1:], new)
    return value


@st.composite
def _mutated(draw, valid):
    """A body the schema allows with one place in it (a field, a message's content, a stop) replaced by anything."""
    body = draw(valid)
    places = [p for p in _places(body) if p]
    if not places:
        return body
    return _replaced(body, draw(st.sampled_from(places)), draw(ANYTHING))


# Requests that get an answer, in the schema's own fields: the base that _mutated bends one place of.
SAMPLING = {"max_tokens": st.integers(1, 4), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "top_k": st.integers(1, 50),
            "seed": st.integers(-(2**63), 2**64 - 1), "stop": st.lists(st.text(max_size=4), max_size=4), "stream": st.booleans(),
            "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()})}
ANSWERED = {
    "/v1/completions": st.fixed_dictionaries(
        {"prompt": st.text(min_size=1, max_size=24) | st.lists(st.integers(0, 1000), min_size=1, max_size=8)}, optional=SAMPLING),
    "/v1/chat/completions": st.fixed_dictionaries(
        {"messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                                     "content": st.text(max_size=24)}), min_size=1, max_size=3)}, optional=SAMPLING),
}


def _bodies(openapi: dict, path: str):
    ref = openapi["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    valid = hypothesis_jsonschema.from_schema({**ref, "components": openapi["components"]})  # anything the schema allows
    answered = ANSWERED[path]
    bodies = st.one_of(answered, _mutated(answered), _mutated(answered), _mutated(answered), valid, _mutated(valid), ANYTHING)
    return bodies.map(lambda b: json.dumps(b).encode()) | st.binary(max_size=64)


def test_no_input_gets_a_5xx(fuzzed):
    client, openapi = fuzzed
    requests = st.one_of(
        *(st.tuples(st.just(path), _bodies(openapi, path)) for path in PATHS),
        st.tuples(st.just("GET"), st.text(max_size=20)),
    )
    seen = []

    @RUN
    @given(requests)
    def probe(request):
        path, payload = request
        if path == "GET":
            r = client.get("/v1/models/" + quote(payload, safe="/"))
        else:
            r = client.post(path, content=payload, headers={"content-type": "application/json"})
        seen.append(r.status_code)
        assert r.status_code < 500, (path, payload[:300], r.status_code, r.text[:300])

    probe()
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["failed_requests"] == 0
    assert any(s == 200 for s in seen) and any(400 <= s < 500 for s in seen)  # both kinds were tried
