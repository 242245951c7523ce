"""Any local GGUF file as a model: converted once into the cache, keyed by its content.

transformers reads GGUF files of several architectures (``gguf_file=``) and de-quantizes them,
which takes seconds to minutes; the result is written once as a float32 safetensors folder with
the file's own tokenizer and chat template (``models/gguf-<sha256>`` under the cache directory)
and later loads take under a second. The folder is named by the SHA-256 of the file's bytes,
so a copy or a rename of the same file finds the same folder and an edited file gets a new one.
The digest is computed once per file (streamed) and remembered beside the cache, keyed by the
file's path, size and modification time (``gguf/digests.json``); each converted folder's manifest
records the digest of its source, so a file already converted under another name (an offline
model's own GGUF) loads from that folder.

Before anything is converted the file's header is read (a few kilobytes): a file that is not a
GGUF, or a GGUF of an architecture the engine does not run, is refused in one line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch

from .errors import QuicksilverError
from .paths import cache_dir

log = logging.getLogger(__name__)

# ``general.architecture`` of a GGUF -> the HF family transformers loads it as (llama.cpp writes
# Mistral checkpoints as ``llama``; both run here).
ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
                 "gemma3": "gemma3_text", "gpt2": "gpt2"}
MANIFEST = "quicksilver-manifest.json"
CACHE_FORMAT = 1
_CHUNK = 1 << 22

# GGUF metadata value types (ggml's gguf.h): fixed-size ones by struct format.
_FIXED = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def is_gguf_path(name) -> bool:
    """Whether ``name`` names a GGUF file (by its suffix: what ``load_model`` routes here)."""
    return isinstance(name, (str, os.PathLike)) and str(name).lower().endswith(".gguf")


def read_metadata(path: Path, keys: tuple[str, ...] = ("general.architecture", "general.name")) -> dict:
    """The scalar values of ``keys`` from a GGUF header (it stops once it has them all).

    Reads the key/value section only, never tensor data. Raises QuicksilverError for a file that
    is not a GGUF (v2 or v3).
    """
    found: dict = {}
    with open(path, "rb") as f:
        def read(fmt: str):
            size = struct.calcsize("<" + fmt)
            data = f.read(size)
            if len(data) != size:
                raise QuicksilverError(f"{path} is not a GGUF file (its header ends early)")
            return struct.unpack("<" + fmt, data)[0]

        def string() -> bytes:
            return f.read(read("Q"))

        def value(kind: int):
            if kind in _FIXED:
                return read(_FIXED[kind])
            if kind == _STRING:
                return string().decode("utf-8", "replace")
            if kind == _ARRAY:
                item, count = read("I"), read("Q")
                if item in _FIXED:  # skipped, not parsed: tokenizer arrays hold 100k+ entries
                    f.seek(struct.calcsize("<" + _FIXED[item]) * count, os.SEEK_CUR)
                else:
                    for _ in range(count):
                        value(item)
                return None
            raise QuicksilverError(f"{path} is not a GGUF file this reader knows (metadata type {kind})")

        if f.read(4) != b"GGUF":
            raise QuicksilverError(f"{path} is not a GGUF file (no GGUF magic at its start)")
        version = read("I")
        if version not in (2, 3):
            raise QuicksilverError(f"{path} is a GGUF of version {version}; versions 2 and 3 are supported")
        read("Q")  # tensor count
        for _ in range(read("Q")):
            key = string().decode("utf-8", "replace")
            v = value(read("I"))
            if key in keys:
                found[key] = v
                if len(found) == len(keys):
                    break
    return found


def architecture(path: Path) -> str:
    """The file's ``general.architecture``, refused in one line unless the engine runs it."""
    arch = read_metadata(path).get("general.architecture")
    if arch not in ARCHITECTURES:
        raise QuicksilverError(
            f"{path}: GGUF architecture {arch!r} is not supported by the engine (supported: {', '.join(ARCHITECTURES)})")
    return arch


def _digest_index() -> Path:
    return cache_dir() / "gguf" / "digests.json"


def content_digest(path: Path) -> str:
    """SHA-256 of the file's bytes, streamed once and remembered by (path, size, mtime)."""
    stat = path.stat()
    key = str(path)
    index_path = _digest_index()
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    seen = index.get(key)
    if isinstance(seen, dict) and seen.get("size") == stat.st_size and seen.get("mtime_ns") == stat.st_mtime_ns:
        return seen["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    index[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    index_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=index_path.parent, prefix=".digests.", suffix=".json")
    with os.fdopen(fd, "w") as out:
        json.dump(index, out, indent=1)
    os.replace(tmp, index_path)  # concurrent writers: the last one wins, each entry stays whole
    return digest


def cache_is_valid(folder: Path) -> bool:
    """A converted folder whose manifest (written last) matches its files and whose weights open."""
    try:
        meta = json.loads((folder / MANIFEST).read_text())
        if meta.get("format") != CACHE_FORMAT:
            return False
        for name, size in meta["files"].items():
            if (folder / name).stat().st_size != size:
                return False
        from safetensors import safe_open

        with safe_open(folder / "model.safetensors", framework="pt") as f:
            f.keys()
        return True
    except Exception:  # any unreadable manifest or header means: rebuild
        return False


def convert(gguf: Path, target: Path, digest: str | None = None) -> None:
    """De-quantize the GGUF once and write a float32 safetensors folder (weights, config, the
    file's tokenizer and chat template), atomically: a temporary folder renamed into place."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    log.info("converting %s into a safetensors cache at %s (once)", gguf.name, target)
    # transformers' GGUF reader draws a plain tqdm bar that its own switch does not govern.
    previous = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError) as e:  # a tensor type or layout transformers does not read
        raise QuicksilverError(f"transformers cannot read {gguf}: {' '.join(str(e).split())[:200]}") from e
    finally:
        if previous is None:
            del os.environ["TQDM_DISABLE"]
        else:
            os.environ["TQDM_DISABLE"] = previous
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are plain float32 now
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))  # de-duplicates the tied embedding
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        meta = {"format": CACHE_FORMAT, "source": gguf.name, "files": files}
        if digest is not None:
            meta["sha256"] = digest
        _write_manifest(tmp, meta)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_manifest(folder: Path, meta: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".manifest.", suffix=".json")
    with os.fdopen(fd, "w") as out:
        json.dump(meta, out)
    os.replace(tmp, folder / MANIFEST)


def note_source(folder: Path, locate) -> None:
    """Record the source file's digest in a converted folder's manifest if it lacks one (a folder
    converted before digests were kept), so that the same file given by path finds this folder.
    ``locate()`` returns the source file; nothing happens when it cannot (QuicksilverError)."""
    try:
        meta = json.loads((folder / MANIFEST).read_text())
        if "sha256" in meta:
            return
        meta["sha256"] = content_digest(locate())
    except (OSError, ValueError, QuicksilverError):
        return
    _write_manifest(folder, meta)


def _converted(digest: str) -> Path | None:
    """A valid cache folder converted from a file with this digest (an offline model's included)."""
    for manifest in sorted((cache_dir() / "models").glob(f"*/{MANIFEST}")):
        try:
            if json.loads(manifest.read_text()).get("sha256") == digest and cache_is_valid(manifest.parent):
                return manifest.parent
        except (OSError, ValueError):
            continue
    return None


def model_folder(path) -> Path:
    """The cached safetensors folder of a local GGUF file, converted on first use.

    A file already converted (under any name, the offline models' own files included) reuses
    that folder, so ``load_model(path)`` of the default model's GGUF loads exactly what
    ``load_model("smollm2-135m")`` loads. One error line (QuicksilverError) for a missing file,
    a file that is not a GGUF, and an architecture the engine does not run, before any
    conversion starts.
    """
    gguf = Path(path).expanduser()
    if not gguf.is_file():
        raise QuicksilverError(f"no such GGUF file: {path}")
    gguf = gguf.resolve()
    architecture(gguf)
    digest = content_digest(gguf)
    found = _converted(digest)
    if found is not None:
        return found
    folder = cache_dir() / "models" / f"gguf-{digest[:32]}"
    if folder.exists():
        log.warning("cache at %s is damaged or incomplete: rebuilding it", folder)
    convert(gguf, folder, digest)
    if not cache_is_valid(folder):
        raise QuicksilverError(f"could not build a valid model cache at {folder}")
    return folder
