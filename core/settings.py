"""Typed settings from a file: a TOML or YAML file read into tables, and tables applied to dataclass
configs with every key and type checked. Shared by the server's settings ([serve], app/config.py) and the
cycle's ([retrain], rlhf/cli.py); it imports neither."""
from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

KINDS = {int: "a whole number", float: "a number", str: "text"}  # a setting's type, as its error names it


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
            try:
                changes[key] = value if keep else type(current)(value)
            except (TypeError, ValueError):
                kind = "a path" if isinstance(current, Path) else KINDS.get(type(current), f"a {type(current).__name__}")
                raise ValueError(f"{where}.{key} must be {kind}, not {value!r}") from None
    return dataclasses.replace(obj, **changes)
