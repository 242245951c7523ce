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
KVSKIP = {"enabled": True, "policy": "propagate", "sink_tokens": 4, "recent_window": 1024}
FUSION = {"enabled": True, "layer": 12, "threshold": 0.92, "window": 4, "output": "delta"}
AMQ = {"enabled": True, "decision_layer": 8, "int4_below": 0.15, "group_size": 32}
# Inside the full stack, fusion uses the setting that cost least on the calibration split
# (+0.23% there), so that four mechanisms together can fit a 3% budget.
ALL_FUSION = {**FUSION, "layer": 20}
PRESETS: dict[str, dict] = {
    "off": {},
    "halting": {"halting": HALTING},
    "kvskip": {"kv": KVSKIP},
    "fusion": {"fusion": FUSION},
    "amq": {"amq": AMQ},
    # The paper's full stack: halting + KV skipping + fusion + AMQ.
    "all": {"halting": HALTING, "kv": KVSKIP, "fusion": ALL_FUSION, "amq": AMQ},
    # Uniform weight-quantization baselines: int8 through the real int8 kernel, with SmoothQuant
    # (alpha 0.65, the best on the calibration split); int4 slices (no fast kernel).
    "int8": {"amq": {"enabled": True, "uniform_bits": 8, "smoothing": 0.65, "activation_quant": True}},
    "int4": {"amq": {"enabled": True, "uniform_bits": 4, "group_size": 32}},
    # Lossless decoding: output equals "off"; drafts from prompt lookup, else the int8 weights.
    "lossless": {"speculative": {"enabled": True, "sources": "lookup,int8"}},
}


@dataclass
class Config:
    """Everything the engine needs to know about the mechanisms; all off by default."""

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

    @classmethod
    def preset(cls, name: str) -> "Config":
        if name not in PRESETS:
            raise QuicksilverError(f"unknown preset {name!r} (presets: {', '.join(PRESETS)})")
        return cls.from_dict({**PRESETS[name], "name": name})

    @classmethod
    def from_dict(cls, data: dict) -> "Config":
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
        unless ``enabled`` is given explicitly.
        """
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
        return Config.from_dict(data)



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
