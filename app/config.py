"""Typed settings of the server, filled from defaults, an optional TOML/YAML file and the command line."""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from app.canary import ArenaConfig
from app.engine import EngineConfig, SamplingConfig
from app.quotas import QuotaConfig
from app.service import Limits
from core.active import AskingConfig
from core.moderation import ModerationConfig


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 7860
    db: Path = Path("conversations.db")
    models_dir: Path = Path("models")
    model: Path | None = None  # a local HF model directory; None = the embedded SmolLM2-135M-Instruct
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    limits: Limits = field(default_factory=Limits)
    quotas: QuotaConfig = field(default_factory=QuotaConfig)
    moderation: ModerationConfig = field(default_factory=ModerationConfig)
    arena: ArenaConfig = field(default_factory=ArenaConfig)  # blind pairs of versions besides a canary's
    asking: AskingConfig = field(default_factory=AskingConfig)  # which answers a comparison shows
    # Origins besides the server's own that may call it from a browser (e.g. a school portal).
    allowed_origins: list[str] = field(default_factory=list)


def read_config_file(path: Path | str) -> dict:
    """Reads a TOML (.toml) or YAML (.yaml/.yml) file into a dict; a clear ValueError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = tomllib.loads(text)
    except Exception as exc:
        raise ValueError(f"config file {path} cannot be parsed: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a table of settings")
    return data


def merge(obj, values: dict, where: str = "config"):
    """Returns a copy of dataclass `obj` with `values` applied; unknown keys are errors, not ignored."""
    names = {f.name: f for f in dataclasses.fields(obj)}
    changes = {}
    for key, value in values.items():
        if key not in names:
            raise ValueError(f"{where}: unknown setting {key!r} (known: {', '.join(names)})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"{where}.{key} must be a table")
            changes[key] = merge(current, value, f"{where}.{key}")
        elif isinstance(current, dict) and isinstance(value, dict):
            changes[key] = {**current, **value}  # a table of limits: the keys given change, the rest stay
        else:
            # Coerce (an int for a float setting), but a bool stays a bool (str(False) would read as set)
            # and a setting that takes a bool or "auto" keeps either.
            keep = (current is None or value is None or isinstance(value, bool)
                    or (isinstance(value, str) and isinstance(current, bool)))
            if (isinstance(current, int) and not isinstance(current, bool) and isinstance(value, float)
                    and not value.is_integer()):  # int(2.5) would quietly serve 2
                raise ValueError(f"{where}.{key} must be a whole number, not {value}")
            # A switch takes true or false: the string "false" kept as it is would read as on.
            if isinstance(current, bool) and names[key].type == "bool" and not isinstance(value, bool):
                raise ValueError(f"{where}.{key} must be true or false, not {value!r}")
            changes[key] = value if keep else type(current)(value)
    return dataclasses.replace(obj, **changes)
