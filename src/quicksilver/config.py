"""Config: one dataclass per mechanism, presets by name, JSON files that ``--config`` loads."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import QuicksilverError
from .mechanisms import AdaptiveMatryoshkaQuantization, ContextualTokenFusion, DynamicTokenHalting, KVCacheSkipping
from .mechanisms.speculative import SpeculativeDecoding

MECHANISMS = {
    "halting": DynamicTokenHalting,
    "kv": KVCacheSkipping,
    "fusion": ContextualTokenFusion,
    "amq": AdaptiveMatryoshkaQuantization,
}
# Every config section: the mechanisms, and speculative decoding, which changes how fast tokens
# come but never which (so calibration does not search it and ``is_off`` ignores it).
SECTIONS = {**MECHANISMS, "speculative": SpeculativeDecoding}

# Each preset is the best point of the sweeps in docs/RESULTS.md with relative perplexity
# increase <= 2% on wiki (benchmarks/sweep_engine.py, scouting on the calibration split).
# On the default model they save little; RESULTS.md says how little and why.
HALTING = {"enabled": True, "threshold": 0.13, "min_layer": 10, "patience": 3, "tail_layers": 5, "skip": "mlp"}
# KV skipping: Quest's query-aware pages at 25% of the context (issue #12; docs/RESULTS.md "Long
# context"). In generation every decode step and every token appended to a cache (a question) reads
# a quarter of its past, at least 1,024 keys: the sinks, 64 recent keys and the pages that Quest's
# bound ranks best (2-key pages for appended text, 16-key blocks for decode steps, for speed). The
# prompt's own prefill reads every key (``dense_prefill``): a sequence's first pass choosing in
# blocks cost +5.66% perplexity on code at 4,096 tokens (calibration), so teacher-forced passes
# are the stock model and the preset's cost shows where it acts, after the context: continuation
# perplexity and pass keys on the test splits (benchmarks/long_context.py).
KVSKIP = {"enabled": True, "policy": "propagate", "sink_tokens": 4, "selection": "quest", "keep_fraction": 0.25, "min_keys": 1024,
          "page_size": 2, "block_pages": 16, "dense_prefill": True}
# The position window that ``kvskip`` was until issue #12, set on the calibration splits of every
# offline corpus at 512- and 4,096-token windows, the worst one binding (benchmarks/preset_candidates.py):
# 2,048 recent keys cost at most +1.06% there (code), within 2% x 0.75. ``all`` keeps it: it acts in
# teacher-forced passes too, where the stack's promise is measured.
KV_WINDOW = {"enabled": True, "policy": "propagate", "sink_tokens": 4, "recent_window": 2048}
# Fusion needs its two preceding rows to match too (``prefix``): with similarity alone it cost
# +11-14% on Python source and +1.9% on Wikipedia, nearly all of it on fused repeats of a
# token that predicted what followed the earlier copy (docs/results/fusion_why.md). With the
# prefix it is within budget on every offline domain because it rarely fires: it saves
# almost nothing (docs/results/fusion_why.md), and it is not part of ``all``.
FUSION = {"enabled": True, "layer": 12, "threshold": 0.92, "window": 4, "output": "delta", "prefix": 2}
AMQ = {"enabled": True, "decision_layer": 8, "int4_below": 0.15, "group_size": 32}
ALL_AMQ = {**AMQ, "int4_below": 0.0}  # AMQ's int8 tier alone: group-32 int8 weights for every token
PRESETS: dict[str, dict] = {
    "off": {},
    "halting": {"halting": HALTING},
    "kvskip": {"kv": KVSKIP},
    "fusion": {"fusion": FUSION},
    "amq": {"amq": AMQ},
    # The paper's stack less fusion, which saves almost nothing here once it is safe and forces
    # a slower attention path: halting + KV skipping + AMQ's int8 tier. Set on the calibration
    # splits of every offline corpus at 512 and 4,096 tokens (benchmarks/preset_candidates.py):
    # with AMQ's int4 tier (as the ``amq`` preset) the stack cost +2.81% on news even with KV
    # off, over 3% x 0.75, and its int4 tokens save few bits; with int8 alone and the ``kvskip``
    # window it costs at most +1.49% (code) and saves 34.5% of bit-weighted FLOPs at 4,096 tokens.
    "all": {"halting": HALTING, "kv": KV_WINDOW, "amq": ALL_AMQ},
    # The best wall clock within 1% on the calibration split (benchmarks/bench_fast.py, bench_decode.py):
    # weight-only int8 per output channel everywhere, the LM head included, through the fastest
    # kernel measured on this machine. Decode is bound by weight bytes; this halves them.
    "fast": {"amq": {"enabled": True, "uniform_bits": 8, "head_bits": 8}},
    # 4-bit weights that keep quality: GGUF's Q4_1 grid (a float16 scale and minimum per 32 weights)
    # for every decoder linear, the LM head int8 per channel; decode reads 0.625 bytes per decoder
    # weight through the native 4-bit kernel. The default model's decoder weights sit on this grid
    # exactly (they come from a Q4_1 GGUF), so only the int8 head costs anything there.
    "fast4": {"amq": {"enabled": True, "uniform_bits": 4, "group_size": 32, "scheme": "q4_1", "head_bits": 8}},
    # Uniform weight-quantization baselines: int8 through the real int8 kernel, with SmoothQuant
    # (alpha 0.65, the best on the calibration split); int4 slices (no fast kernel).
    "int8": {"amq": {"enabled": True, "uniform_bits": 8, "smoothing": 0.65, "activation_quant": True}},
    "int4": {"amq": {"enabled": True, "uniform_bits": 4, "group_size": 32}},
    # Lossless decoding: output equals "off"; drafts from prompt lookup or the int8 weights.
    "lossless": {"speculative": {"enabled": True, "sources": "lookup,int8"}},
}


@dataclass(frozen=True)
class PresetInfo:
    """What a preset promises, and from what context length each of its mechanisms acts.

    Parameters
    ----------
    summary : str
        One line: what the preset is.
    budget : float or None
        The promise: relative perplexity increase at most ``budget`` (0.02 is 2%) on text of
        every offline corpus at 512- and 4,096-token windows, checked on their test splits
        (benchmarks/promises.py). None for a baseline, which promises nothing.
    acts_from : dict of str to int, default {}
        Per mechanism section, the shortest context (tokens) at which it changes anything;
        below it that mechanism runs as the stock model.
    generation_only : tuple of str, default ()
        Sections that act only while generating (decode steps, text appended to a cache): a
        teacher-forced pass runs them as the stock model at any length.
    """

    summary: str
    budget: float | None
    acts_from: dict = field(default_factory=dict)
    generation_only: tuple = ()

    @property
    def baseline(self) -> bool:
        """A baseline (uniform quantization) is a point to compare against, not a promise."""
        return self.budget is None

    @property
    def promise(self) -> str:
        if self.budget is None:
            return "none (a baseline)"
        if self.budget == 0:
            return "exact (logits equal the stock model's)"
        return f"<= +{self.budget * 100:g}% perplexity"

    @property
    def min_context(self) -> int:
        """The shortest context at which the preset does anything at all (0: it never acts)."""
        return min(self.acts_from.values(), default=0)

    def idle_at(self, context: int, teacher_forced: bool = False) -> list[str]:
        """The mechanisms of this preset that do nothing at ``context`` tokens (in a teacher-forced pass: also
        those that act only in generation)."""
        return [section for section, n in self.acts_from.items() if context < n or (teacher_forced and section in self.generation_only)]


# The metadata of every preset: one entry per name in PRESETS (a test checks), so a new preset
# states its promise and reach here. KV's reach follows from its settings; halting's and
# fusion's depend on the text: the shortest of the lengths 256, 512, 1,024, 2,048, 3,072 and
# 4,096 tokens (the start of the wiki test split) at which they acted on the default model
# (benchmarks/preset_reach.py; halting: none in 2,048 tokens, 4 in 3,072).
_KV_REACH = KVCacheSkipping(**KV_WINDOW).reach()  # the first query that drops a key
_QUEST_REACH = KVCacheSkipping(**KVSKIP).reach()  # the first decode step that reads fewer keys than its past
PRESET_INFO: dict[str, PresetInfo] = {
    "off": PresetInfo("the stock model (the engine's logits equal HF's)", 0.0),
    "halting": PresetInfo("halting on relative drift < 0.13 for 3 layers from layer 10, MLP-only skipping, last 5 layers always run",
                          0.02, {"halting": 3072}),
    "kvskip": PresetInfo("in generation each decode step and each token appended to a cache reads 25% of its past (at least "
                         "1,024 keys): 4 sinks, 64 recent keys and the pages Quest's bound ranks best; the prompt's own "
                         "prefill and teacher-forced passes read every key (the stock model's logits)",
                         0.02, {"kv": _QUEST_REACH}, generation_only=("kv",)),
    "amq": PresetInfo("int8 group-32 weights; tokens with drift < 0.15 at layer 8 run int4 afterwards", 0.02, {"amq": 1}),
    "fusion": PresetInfo("fusion after layer 12 at cosine >= 0.92 within 4 predecessors, only where the 2 rows before "
                         "both tokens match too (a repeated phrase), delta output; saves almost nothing", 0.02, {"fusion": 512}),
    "all": PresetInfo("halting + a 2,048-key window (kvskip until issue #12) + AMQ's int8 tier (group-32 int8 weights; its int4 "
                      "tier left out: over budget on news); "
                      "fusion left out (once safe it saves almost nothing and slows attention)",
                      0.03, {"amq": 1, "kv": _KV_REACH, "halting": 3072}),
    "lossless": PresetInfo("speculative decoding: drafts from prompt lookup or the int8 weights, verified by the full "
                           "model; greedy output equals off (generation only; teacher-forced it is off)", 0.0),
    "fast": PresetInfo("weight-only int8 per output channel for every decoder linear and the LM head, through the "
                       "fastest kernel measured on this machine", 0.01, {"amq": 1}),
    "fast4": PresetInfo("Q4_1-grid 4-bit weights (float16 scale and minimum per 32) for every decoder linear, int8 per "
                        "channel for the LM head; decode through the native 4-bit kernel", 0.01, {"amq": 1}),
    "int8": PresetInfo("uniform int8 per-channel weights through the real int8 kernel, SmoothQuant alpha 0.65", None, {"amq": 1}),
    "int4": PresetInfo("uniform int4 (MSB slice of group-32 int8; no fast kernel)", None, {"amq": 1}),
}


@dataclass
class Config:
    """Everything the engine needs to know about the mechanisms; all off by default.

    Parameters
    ----------
    halting, kv, fusion, amq : mechanism settings, default all off
        ``DynamicTokenHalting``, ``KVCacheSkipping``, ``ContextualTokenFusion``,
        ``AdaptiveMatryoshkaQuantization``.
    name : str, default "custom"
        A preset's name when the settings are exactly that preset's; ``custom`` or
        ``PRESET+custom`` once they differ (``from_dict``, ``load`` and ``with_settings``
        relabel, so a label never claims a preset's promise for other settings).
    calibration : dict, optional
        Provenance written by ``quicksilver calibrate``; not a setting.
    """

    halting: DynamicTokenHalting = field(default_factory=DynamicTokenHalting)
    kv: KVCacheSkipping = field(default_factory=KVCacheSkipping)
    fusion: ContextualTokenFusion = field(default_factory=ContextualTokenFusion)
    amq: AdaptiveMatryoshkaQuantization = field(default_factory=AdaptiveMatryoshkaQuantization)
    speculative: SpeculativeDecoding = field(default_factory=SpeculativeDecoding)
    name: str = "custom"
    calibration: dict | None = None  # provenance written by ``quicksilver calibrate``; not a setting

    @property
    def is_off(self) -> bool:
        return not any(getattr(self, key).enabled for key in MECHANISMS)

    @property
    def promise(self) -> PresetInfo | None:
        """The preset's promise and reach (``PresetInfo``); None for a custom config."""
        return PRESET_INFO.get(self.name)

    @classmethod
    def preset(cls, name: str) -> "Config":
        """The named preset (``off``, ``halting``, ``kvskip``, ``fusion``, ``amq``, ``all``, ``int8``, ``int4``)."""
        if not isinstance(name, str) or name not in PRESETS:
            raise QuicksilverError(f"unknown preset {name!r} (presets: {', '.join(PRESETS)})")
        return cls._build({**PRESETS[name], "name": name})

    @classmethod
    def resolve(cls, config: "Config | str | None") -> "Config":
        """A Config from a Config, a preset name, or None (all off): what the API accepts as ``config``."""
        if config is None:
            return cls.preset("off")
        if isinstance(config, str):
            return cls.preset(config)
        if not isinstance(config, Config):
            raise QuicksilverError(f"config must be a Config or a preset name, got {type(config).__name__}")
        return config

    @classmethod
    def from_dict(cls, data: dict) -> "Config":
        """A Config from ``to_dict``'s form; a preset's name whose settings differ becomes ``PRESET+custom``."""
        config = cls._build(data)
        config.name = _honest_name(config)
        return config

    @classmethod
    def _build(cls, data: dict) -> "Config":
        if not isinstance(data, dict):
            raise QuicksilverError("a config must be a JSON object")
        unknown = set(data) - set(SECTIONS) - {"name", "calibration"}
        if unknown:
            raise QuicksilverError(f"unknown config section(s): {', '.join(sorted(unknown))} (known: {', '.join(SECTIONS)})")
        parts = {}
        for key, kind in SECTIONS.items():
            settings = data.get(key, {}) or {}
            if not isinstance(settings, dict):
                raise QuicksilverError(f"config section {key!r} must be a JSON object, got {type(settings).__name__}")
            known = {f.name for f in dataclasses.fields(kind)}
            bad = set(settings) - known
            if bad:
                raise QuicksilverError(f"unknown {key} setting(s): {', '.join(sorted(bad))} (known: {', '.join(sorted(known))})")
            parts[key] = kind(**settings)
        calibration = data.get("calibration")
        if calibration is not None and not isinstance(calibration, dict):
            raise QuicksilverError("a config's calibration entry must be a JSON object")
        return cls(**parts, name=data.get("name", "custom"), calibration=calibration)

    def to_dict(self) -> dict:
        data = {"name": self.name, **{key: dataclasses.asdict(getattr(self, key)) for key in SECTIONS}}
        if self.calibration is not None:
            data["calibration"] = self.calibration
        return data

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        path = Path(path)
        if path.is_dir():
            raise QuicksilverError(f"config file {path} is a folder; give a file")
        if not path.is_file():
            raise QuicksilverError(f"config file {path} does not exist")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise QuicksilverError(f"config file {path} is not valid JSON: {e}") from e
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        from .results_io import write_json_atomic

        write_json_atomic(path, self.to_dict())

    def with_settings(self, assignments: list[str]) -> "Config":
        """A copy with ``section.field=value`` assignments applied (the CLI's ``--set``).

        Values are parsed by the field's type; setting any field of a mechanism enables it
        unless ``enabled`` is given explicitly. Settings that differ from a preset's rename
        the copy ``custom`` (from ``off``) or ``PRESET+custom``; any other name gets ``+custom``.
        """
        if isinstance(assignments, str) or not all(isinstance(a, str) for a in assignments):
            raise QuicksilverError(f"with_settings expects a list of 'SECTION.FIELD=VALUE' strings, got {assignments!r}")
        data = self.to_dict()
        for item in assignments:
            key, sep, raw = item.partition("=")
            section, dot, name = key.strip().partition(".")
            if not sep or not dot or section not in SECTIONS:
                raise QuicksilverError(f"--set expects SECTION.FIELD=VALUE with SECTION in {', '.join(SECTIONS)}, got {item!r}")
            fields = {f.name: f for f in dataclasses.fields(SECTIONS[section])}
            if name not in fields:
                raise QuicksilverError(f"unknown {section} setting {name!r} (known: {', '.join(sorted(fields))})")
            data[section][name] = _parse_value(raw.strip(), fields[name].default, item)
            if name != "enabled" and not any(a.strip().startswith(f"{section}.enabled") for a in assignments):
                data[section]["enabled"] = True
        config = Config.from_dict(data)
        changed = any(getattr(config, key) != getattr(self, key) for key in MECHANISMS)
        if changed and config.name not in PRESETS and config.name != "custom" and not config.name.endswith("+custom"):
            config.name += "+custom"  # e.g. a calibrated config: its provenance no longer describes these settings
        return config


def _honest_name(config: Config) -> str:
    """The config's name if its settings are its preset's; else ``custom`` or ``PRESET+custom``.

    Settings are compared field by field after construction, so a file that spells a preset's
    defaults differently still carries the preset's name.
    """
    name = config.name if isinstance(config.name, str) else "custom"
    base = name.removesuffix("+custom")
    if base not in PRESETS:
        return name  # a custom name (e.g. a calibrated config's) promises nothing by itself
    preset = Config._build({**PRESETS[base], "name": base})
    if all(getattr(config, key) == getattr(preset, key) for key in MECHANISMS):
        return base
    return "custom" if base in ("off", "custom") else f"{base}+custom"



def _parse_value(raw: str, default, item: str):
    """Parse a --set value like the field's default: bool, int, float, str, or none."""
    if raw.lower() in ("none", "null"):
        return None
    try:
        if isinstance(default, bool):
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return raw.lower() in ("true", "1", "yes")
        if isinstance(default, int) or default is None:
            return int(raw) if default is not None or raw.lstrip("-").isdigit() else raw
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise QuicksilverError(f"--set {item!r}: {raw!r} is not a valid {type(default).__name__}") from None
    return raw
