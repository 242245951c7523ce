"""The peers' side of benchmarks/bench_peers.py: runs in a peer's own venv, never in ours.

``python peer_workers.py --worker JOB OUT``: JOB names the peer, its model files (one per
format), the token ids and lengths; OUT gets, per format, the tokens, seconds and weight bytes
(``harness.measure_decode``), or why a format did not load. Only the standard library, numpy,
this folder's harness and the peer's own package are imported.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402


class LlamaCpp:
    """One GGUF file through llama-cpp-python's ``generate`` (its sampler chain, greedy), one sequence."""

    batches = False

    def __init__(self, path: str, threads: int, gguf_py: str):
        import llama_cpp

        self.llm = llama_cpp.Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=2048, n_batch=1024,
                                   verbose=False)
        sys.path.insert(0, gguf_py)
        import gguf

        reader = gguf.GGUFReader(path)
        tensors = {t.name: int(t.n_bytes) for t in reader.tensors}
        # A decode step reads every tensor but the embedding table (one row of it), unless the
        # head is tied to it (no output.weight): then all of it, as the head.
        self.weight_bytes = sum(tensors.values()) - (tensors["token_embd.weight"] if "output.weight" in tensors else 0)
        self.types = sorted({t.tensor_type.name for t in reader.tensors})

    def generate(self, prompts, n):
        (prompt,) = prompts
        self.llm.reset()  # no prefix reuse from the previous prompt
        out, t0, ttft = [], time.perf_counter(), None
        for tok in self.llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            out.append(int(tok))
            if ttft is None:
                ttft = time.perf_counter() - t0
            if len(out) == n:
                break
        return [out], time.perf_counter() - t0, ttft


class OrtGenai:
    """One onnxruntime-genai model folder: right-padded batches (its pad handling), EOS held off by min_length."""

    batches = True

    def __init__(self, folder: str, threads: int):
        import onnx
        import onnxruntime_genai as og

        self.og = og
        cfg = og.Config(folder)
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads,
                                                                          "inter_op_num_threads": 1}}}}))
        self.model = og.Model(cfg)
        self.pad = json.loads((Path(folder) / "genai_config.json").read_text())["model"]["pad_token_id"]
        graph = onnx.load(str(Path(folder) / "model.onnx"), load_external_data=False).graph
        gathered = {n.input[0] for n in graph.node if n.op_type in ("Gather", "GatherBlockQuantized")}

        def nbytes(t):
            ext = {e.key: e.value for e in t.external_data}
            return int(ext["length"]) if "length" in ext else len(t.raw_data)

        # the embedding table is gathered (one row a token); the cos/sin caches are not weights
        self.weight_bytes = sum(nbytes(t) for t in graph.initializer
                                if t.name not in gathered and "cos_cache" not in t.name and "sin_cache" not in t.name)

    def generate(self, prompts, n):
        import numpy as np

        og, width = self.og, max(map(len, prompts))
        params = og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=width + n, min_length=width + n, batch_size=len(prompts))
        gen = og.Generator(self.model, params)
        ids = np.array([list(p) + [self.pad] * (width - len(p)) for p in prompts], dtype=np.int32)
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        steps = []
        while not gen.is_done() and len(steps) < n:
            gen.generate_next_token()
            steps.append(gen.get_next_tokens().tolist())
            if len(steps) == 1:
                ttft = time.perf_counter() - t0
        seconds = time.perf_counter() - t0
        return [list(map(int, r)) for r in zip(*steps)], seconds, ttft


class CTranslate2:
    """A CTranslate2 model folder at one compute type: ``generate_tokens`` alone, ``generate_batch`` for a batch."""

    batches = True

    def __init__(self, folder: str, compute_type: str, threads: int, shapes: dict):
        import ctranslate2

        self.gen = ctranslate2.Generator(folder, device="cpu", compute_type=compute_type, intra_threads=threads,
                                         inter_threads=1)
        self.vocab = json.loads((Path(folder) / "vocabulary.json").read_text())
        per = 4 if compute_type == "float32" else 1  # int8: one byte a weight and a float scale a row
        rows = 0 if compute_type == "float32" else 4 * shapes["matrix_rows"]
        self.weight_bytes = per * shapes["matrix_weights"] + rows

    def generate(self, prompts, n):
        toks = [[self.vocab[i] for i in p] for p in prompts]
        kw = dict(max_length=n, min_length=n, sampling_topk=1)
        t0 = time.perf_counter()
        if len(prompts) == 1:
            out, ttft = [], None
            for step in self.gen.generate_tokens(toks[0], **kw):
                out.append(int(step.token_id))
                if ttft is None:
                    ttft = time.perf_counter() - t0
            return [out[:n]], time.perf_counter() - t0, ttft
        res = self.gen.generate_batch(toks, beam_size=1, include_prompt_in_result=False, **kw)
        seconds = time.perf_counter() - t0
        return [list(map(int, r.sequences_ids[0])) for r in res], seconds, seconds


def worker(job_path: str, out_path: str) -> None:
    """Load every format of ``job['peer']``, time them (``harness.measure_decode``) and write the answer to ``out_path``."""
    from importlib.metadata import version

    job = json.loads(Path(job_path).read_text())
    peer, threads = job["peer"], job["threads"]
    package = {"llama_cpp": "llama-cpp-python", "onnxruntime_genai": "onnxruntime-genai", "ctranslate2": "ctranslate2"}[peer]
    result = {"versions": {package: version(package)}, "rows": {}, "errors": {}, "complete": False}

    def save():
        tmp = Path(out_path + ".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, out_path)

    runners = {}
    for fmt, path in job["files"].items():
        try:
            if peer == "llama_cpp":
                runners[fmt] = LlamaCpp(path, threads, job["gguf_py"])
            elif peer == "onnxruntime_genai":
                runners[fmt] = OrtGenai(path, threads)
            else:
                runners[fmt] = CTranslate2(path, fmt, threads, job["shapes"])
        except Exception as e:  # a format this build cannot load is a row that says so
            result["errors"][fmt] = " ".join(f"{type(e).__name__}: {e}".split())[:300]
    save()

    rows = harness.measure_decode(runners, job["prompts"], job["prefill"], job["new_tokens"], log=log)
    for name, row in rows.items():
        result["rows"][name] = {**row, "weight_bytes": runners[name].weight_bytes, "tensor_types": getattr(runners[name], "types", None)}
    result["complete"] = True
    save()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] != ["--worker"] or len(sys.argv) != 4:
        sys.exit("usage: peer_workers.py --worker JOB OUT (run by benchmarks/bench_peers.py in a peer's venv)")
    worker(sys.argv[2], sys.argv[3])
