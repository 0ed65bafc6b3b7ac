"""Config files, presets and `section.key=value` overrides, checked before any process group starts.

Each component declares its own section as a dataclass next to its code, with `setting()` fields that carry
their constraints. This module only knows how to resolve presets and `base:` chains, apply overrides and
check values against those declarations, so that every mistake becomes one line naming the key, the value
and what is allowed. Reading the YAML itself is runner/yaml_files.py; reading argv is runner/cli.py.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from runner.errors import ConfigError, clip, shown
from runner.yaml_files import not_a_file, parse_yaml, read_yaml

PRESET_DIR = Path(__file__).parent / "presets"
INT_LIMIT = 2 ** 63        # every integer key fits a signed 64-bit integer, as torch and numpy need


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

def resolve_config_source(source: str) -> Path:
    path, preset = Path(source), PRESET_DIR / f"{source}.yaml"
    try:
        exists = path.exists()
        problem = not_a_file(path) if exists else None
        is_preset = preset.is_file()
    except OSError as e:  # a name too long, a loop of symlinks
        raise ConfigError(f"cannot read config file {shown(source)}: {e.strerror}") from None
    if exists and not problem:
        return path
    if is_preset:  # a folder named like a preset (`mnist/` beside `--config mnist`) does not hide the preset
        return preset
    if problem:
        raise ConfigError(f"config file {path} {problem}")
    if path.suffix in (".yaml", ".yml") or "/" in source:
        raise ConfigError(f"config file {source} does not exist")
    raise ConfigError(f"config {shown(source)} is neither a file nor a preset (presets: {', '.join(presets())})")


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
    """`over` on top of `base`, section by section; a `kwargs` mapping is replaced whole, never mixed."""
    out = dict(base)
    if "name" in over:
        drop_kwargs_if_renamed(out, over["name"])
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "kwargs":
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def drop_kwargs_if_renamed(section: dict, name: Any) -> None:
    """A section (model, optim) given another `name` loses the kwargs it held: they belong to the model or
    optimizer they were written for. kwargs given with the new name are applied afterwards."""
    if name != section.get("name"):
        section.pop("kwargs", None)


class CommandLineText(str):
    """An override's text as typed: string keys keep it verbatim (`run.name=007`, `mixed_precision=no`),
    other keys parse it as YAML."""

    key = "override"  # the dotted key it was given for, set by apply_override

    def parsed(self):
        if self == "":
            return ""
        try:
            return parse_yaml(self, f"{self.key}={shown(str(self))}")
        except yaml.YAMLError:  # not YAML: keep the text, and let the key's type decide
            return str(self)


def apply_override(raw: dict, dotted: str, text: str) -> None:
    value = CommandLineText(text)
    value.key = clip(dotted)
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value


# ---------------------------------------------------------------------------------------------- checking

def all_keys(cls, prefix: str = "", where=lambda field: True) -> list[str]:
    """Every dotted key of a config class, at any depth (only the fields `where` accepts)."""
    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys += all_keys(hint, f"{prefix}{f.name}.", where)
        elif where(f):
            keys.append(prefix + f.name)
    return keys


def fingerprint_keys(cls) -> list[str]:
    """The dotted keys declared with `setting(..., fingerprint=True)`."""
    return all_keys(cls, where=lambda field: field.metadata.get("fingerprint", False))


def unknown_key_error(key: str, valid: list[str], root_cls) -> ConfigError:
    key = clip(key)
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
    if origin in (typing.Union, types.UnionType):
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
            raise ConfigError(f"{key}={shown(value)}: expected a list")
        return [coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)] if args else list(value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={shown(value)}: expected a mapping of names to values")
        return {k: v.parsed() if isinstance(v, CommandLineText) else v for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={shown(value)}: expected true or false")
    if hint is int:
        return coerce_int(key, value)
    if hint is float:
        return coerce_float(key, value)
    if hint is str:
        if isinstance(value, bool) and choices and ("yes" if value else "no") in choices:
            return "yes" if value else "no"  # YAML 1.1 reads a bare `no` as false
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={shown(value)}: expected a string")
    raise TypeError(f"unsupported config type {hint} for {key}")


def coerce_int(key: str, value: Any) -> int:
    number = value
    if isinstance(value, float) and value.is_integer():
        number = int(value)
    if not isinstance(number, int) or isinstance(number, bool):
        raise ConfigError(f"{key}={shown(value)}: expected an integer")
    if not -INT_LIMIT < number < INT_LIMIT:  # torch and numpy take 64-bit integers; larger ones overflow there
        raise ConfigError(f"{key}={shown(value)}: out of range; an integer setting lies strictly between "
                          f"-2**63 and 2**63")
    return number


def coerce_float(key: str, value: Any) -> float:
    number = None
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):  # YAML reads 1e-3 as a string
        try:
            number = float(value)
        except OverflowError:  # an integer beyond 1e308
            number = math.inf
        except ValueError:
            pass
    if number is None:
        raise ConfigError(f"{key}={shown(value)}: expected a number")
    if not math.isfinite(number):  # `nan` and `inf` parse, but no setting means them
        raise ConfigError(f"{key}={shown(value)}: expected a finite number")
    return number


def check_bounds(key: str, value: Any, meta) -> None:
    if value is None:
        return
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ConfigError(f"{key}={shown(value)} is not one of: {', '.join(map(str, meta['choices']))}")
    if meta.get("min") is not None and value < meta["min"]:
        raise ConfigError(f"{key}={shown(value)}: must be >= {meta['min']}")
    if meta.get("above") is not None and value <= meta["above"]:
        raise ConfigError(f"{key}={shown(value)}: must be > {meta['above']}")
    if meta.get("max") is not None and value > meta["max"]:
        raise ConfigError(f"{key}={shown(value)}: must be <= {meta['max']}")


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
                raise ConfigError(f"{key}: expected a section (a mapping of keys), got {shown(value)}")
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


# ---------------------------------------------------------------------------------------------- loading

def load(root_cls, source: str, overrides: list[tuple[str, str]]):
    """The config from a file or preset and `section.key=value` overrides, built and checked."""
    raw = load_raw(source)
    for key, text in overrides:
        section, _, leaf = key.rpartition(".")
        if leaf == "name" and isinstance(raw.get(section), dict):
            drop_kwargs_if_renamed(raw[section], text)
    for key, text in overrides:
        apply_override(raw, key, text)
    return build(root_cls, raw)
