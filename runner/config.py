"""Config files, presets and `section.key=value` overrides, checked before any process group starts.

Each component declares its own section as a dataclass next to its code, with `setting()` fields that carry
their constraints. This module only knows how to read YAML, apply overrides and check values against
those declarations, so that every mistake becomes one line naming the key, the value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any

import yaml

from runner.errors import UserError

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(UserError):
    pass


def setting(default: Any, *, choices=None, min=None, above=None, max=None, fingerprint: bool = False):
    """A config field with its allowed values: `min`/`max` are inclusive bounds, `above` is exclusive.

    `fingerprint=True` marks a key whose change makes a run a different experiment: a checkpoint written
    under one value is never resumed under another."""
    meta = {"choices": choices, "min": min, "above": above, "max": max, "fingerprint": fingerprint}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


# ---------------------------------------------------------------------------------------------- reading

def read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {path}: YAML syntax error{where}: {problem}") from None
    if raw is None:
        raise ConfigError(f"config file {path} is empty")
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not a {type(raw).__name__}")
    return raw


def resolve_config_source(source: str) -> Path:
    path = Path(source)
    if path.is_file():
        return path
    if (PRESET_DIR / f"{source}.yaml").is_file():
        return PRESET_DIR / f"{source}.yaml"
    if path.suffix in (".yaml", ".yml") or "/" in source:
        raise ConfigError(f"config file {source} does not exist")
    raise ConfigError(f"config {source!r} is neither a file nor a preset (presets: {', '.join(presets())})")


def load_raw(source: str, seen: tuple = ()) -> dict:
    """Read a config file or preset, following its `base:` chain (a preset name or a relative path)."""
    path = resolve_config_source(source)
    if path.resolve() in seen:
        raise ConfigError(f"config file {path}: `base` chain loops back to itself")
    raw = read_yaml(path)
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"config file {path}: `base` must be a preset name or a file path")
    base_source = base if (PRESET_DIR / f"{base}.yaml").is_file() else str(path.parent / base)
    return merge(load_raw(base_source, seen + (path.resolve(),)), raw)


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "kwargs":
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


class CommandLineText(str):
    """An override's text as typed: string keys keep it verbatim (`run.name=007`, `mixed_precision=no`),
    other keys parse it as YAML."""

    def parsed(self):
        try:
            return yaml.safe_load(self) if self != "" else ""
        except yaml.YAMLError:
            return str(self)


def apply_override(raw: dict, dotted: str, text: str) -> None:
    value = CommandLineText(text)
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value


# ---------------------------------------------------------------------------------------------- checking

def all_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys += all_keys(hint, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def unknown_key_error(key: str, valid: list[str], root_cls) -> ConfigError:
    everything = all_keys(root_cls)
    close = difflib.get_close_matches(key, everything, n=1, cutoff=0.6)
    if not close:
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in everything if k.rsplit(".", 1)[-1] in difflib.get_close_matches(leaf, [
            e.rsplit(".", 1)[-1] for e in everything], n=1, cutoff=0.75)][:1]
    hint = f"; did you mean {close[0]}?" if close else f"; valid keys here: {', '.join(valid)}"
    return ConfigError(f"unknown config key {key}{hint}")


def coerce(key: str, value: Any, hint, choices=None) -> Any:
    if isinstance(value, CommandLineText):
        value = str(value) if hint is str else value.parsed()
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(key, value, arg)
            except ConfigError as e:
                errors.append(e)
        raise errors[-1]
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list")
        return [coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)] if args else list(value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}: expected a mapping of names to values")
        return {k: v.parsed() if isinstance(v, CommandLineText) else v for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r}: expected an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r}: expected a number")
    if hint is str:
        if isinstance(value, bool) and choices and ("yes" if value else "no") in choices:
            return "yes" if value else "no"  # YAML 1.1 reads a bare `no` as false
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r}: expected a string")
    raise TypeError(f"unsupported config type {hint} for {key}")


def check_bounds(key: str, value: Any, meta) -> None:
    if value is None:
        return
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ConfigError(f"{key}={value!r} is not one of: {', '.join(map(str, meta['choices']))}")
    if meta.get("min") is not None and value < meta["min"]:
        raise ConfigError(f"{key}={value!r}: must be >= {meta['min']}")
    if meta.get("above") is not None and value <= meta["above"]:
        raise ConfigError(f"{key}={value!r}: must be > {meta['above']}")
    if meta.get("max") is not None and value > meta["max"]:
        raise ConfigError(f"{key}={value!r}: must be <= {meta['max']}")


def build(cls, raw: dict, root_cls=None, prefix: str = ""):
    """Turn a nested dict into `cls`, checking every key, type and bound, then each section's validate()."""
    root_cls = root_cls or cls
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in raw.items():
        if key not in fields:
            dotted = prefix + str(key)
            while isinstance(value, dict) and value:  # `optm.lr=1` should suggest optim.lr, not just optim
                key, value = next(iter(value.items()))
                dotted += f".{key}"
            raise unknown_key_error(dotted, [prefix + k for k in fields], root_cls)
    values = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        key, value, hint = prefix + name, raw[name], hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a section (a mapping of keys), got {value!r}")
            values[name] = build(hint, value, root_cls, key + ".")
        else:
            values[name] = coerce(key, value, hint, f.metadata.get("choices"))
            check_bounds(key, values[name], f.metadata)
    obj = cls(**values)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "kwargs":
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def dump(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ---------------------------------------------------------------------------------------------- command line

def fingerprint_keys(cls, prefix: str = "") -> list[str]:
    """The dotted keys declared with `setting(..., fingerprint=True)`, at any depth."""
    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys += fingerprint_keys(hint, f"{prefix}{f.name}.")
        elif f.metadata.get("fingerprint"):
            keys.append(prefix + f.name)
    return keys


def parse_command_line(argv: list[str], flags: dict[str, str],
                       positional: bool = False) -> tuple[dict, list[tuple[str, str]]]:
    """Split argv into known `--flags` and `section.key=value` overrides (also `--section.key value`).

    `flags` maps each flag to "value" (takes an argument) or "switch". With `positional`, other bare
    arguments (paths) are collected in options["args"].
    """
    options: dict[str, Any] = {"args": []} if positional else {}
    overrides: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if name in flags:
            if flags[name] == "switch":
                options[name] = True
            elif "=" in arg:
                options[name] = arg.split("=", 1)[1]
            elif i + 1 < len(argv):
                i += 1
                options[name] = argv[i]
            else:
                raise ConfigError(f"{name} needs a value")
        elif "=" in arg:
            key, text = arg.split("=", 1)
            overrides.append((key.lstrip("-"), text))
        elif arg.startswith("--") and i + 1 < len(argv):
            overrides.append((arg[2:], argv[i + 1]))
            i += 1
        elif positional and not arg.startswith("-"):
            options["args"].append(arg)
        else:
            raise ConfigError(f"cannot parse argument {arg!r}: expected section.key=value or one of "
                              f"{', '.join(sorted(flags))}")
        i += 1
    return options, overrides


def load(root_cls, source: str, overrides: list[tuple[str, str]]):
    raw = load_raw(source)
    for key, text in overrides:
        apply_override(raw, key, text)
    return build(root_cls, raw)
