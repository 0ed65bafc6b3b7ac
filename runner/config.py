"""Config files, presets and `section.key=value` overrides, checked before any process group starts.

Each component declares its own section as a dataclass next to its code, with `setting()` fields that carry
their constraints. This module only knows how to read YAML, apply overrides and check values against
those declarations, so that every mistake becomes one line naming the key, the value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
import stat
import typing
from pathlib import Path
from typing import Any

import yaml

from runner.errors import UserError

PRESET_DIR = Path(__file__).parent / "presets"
# Limits on what a config may hold, so that a hostile or broken file ends in one line, not a hang or a
# traceback: a config is a page of YAML, a few levels deep.
MAX_CONFIG_BYTES = 1 << 20
MAX_DEPTH = 20             # sections, kwargs, and lists inside them
MAX_VALUES = 100_000       # counted after YAML aliases are expanded ("billion laughs" stops here)
INT_LIMIT = 2 ** 63        # every integer key fits a signed 64-bit integer, as torch and numpy need
SHOWN_CHARS = 200          # an echoed value is cut here, so an error stays one readable line
MAX_ERROR_CHARS = 1000     # and a whole error line here, whatever a section's check echoes


class ConfigError(UserError):
    """A mistake in the config. Its message is made one line of at most MAX_ERROR_CHARS, keeping both ends
    (the key, and what is allowed): a section's check may echo a value of any length."""

    def __init__(self, message: str):
        text = " ".join(str(message).splitlines())
        if len(text) > MAX_ERROR_CHARS:
            text = f"{text[:MAX_ERROR_CHARS * 2 // 3]} ... {text[-MAX_ERROR_CHARS // 3:]}"
        super().__init__(text)


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxstring, _SHORT_REPR.maxother = 3, SHOWN_CHARS, SHOWN_CHARS
_SHORT_REPR.maxlist = _SHORT_REPR.maxdict = _SHORT_REPR.maxtuple = 8


def shown(value: Any) -> str:
    """A value as an error line echoes it: its repr (newlines escaped, so the line stays one line), cut to
    about SHOWN_CHARS however long, deep or alias-expanded the value is."""
    try:
        return cut(_SHORT_REPR.repr(value))
    except ValueError:  # an int too long for str()
        return f"<an integer of {value.bit_length()} bits>"


def clip(text: str) -> str:
    """A name echoed without quotes (a key, a path): control characters escaped, cut like shown()."""
    text = text[:SHOWN_CHARS * 4]
    return cut(text if text.isprintable() else repr(text)[1:-1])


def cut(text: str) -> str:
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."


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

class DuplicateKey(Exception):
    def __init__(self, key, first_line: int, line: int):
        super().__init__(key, first_line, line)
        self.key, self.first_line, self.line = key, first_line, line


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader (plain data only, no tags that build objects), except that a key given twice
    in one mapping is refused: PyYAML would silently keep the last one."""

    def construct_mapping(self, node, deep=False):
        first_lines = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in first_lines:
                    raise DuplicateKey(key, first_lines[key], key_node.start_mark.line + 1)
                first_lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def check_shape(value: Any, where: str) -> None:
    """Refuse a value nested deeper than MAX_DEPTH or expanding to more than MAX_VALUES values. YAML aliases
    share one object, so parsing is cheap, but a value that contains itself or a "billion laughs" tree
    would hang or fill memory once anything walks, copies or prints it."""
    stack, count = [(value, 1)], 0
    while stack:
        node, depth = stack.pop()
        count += 1
        if depth > MAX_DEPTH:
            raise ConfigError(f"{where} nests deeper than {MAX_DEPTH} levels (or holds a YAML alias to itself)")
        if count > MAX_VALUES:
            raise ConfigError(f"{where} holds more than {MAX_VALUES:,} values once YAML aliases are expanded")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, depth + 1) for child in children)


def parse_yaml(text: str, where: str) -> Any:
    """YAML text as plain data, checked by check_shape; `where` starts every error line. Syntax errors
    propagate as yaml.YAMLError, for the caller to place."""
    try:
        value = yaml.load(text, Loader=StrictLoader)
    except DuplicateKey as e:
        lines = f" (lines {e.first_line} and {e.line})" if e.first_line != e.line else ""
        raise ConfigError(f"{where}: key {shown(e.key)} appears twice in one mapping{lines}") from None
    except RecursionError:
        raise ConfigError(f"{where} nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:  # YAML 1.1 converts digits and dates: a 5,000-digit integer, a 13th month
        raise ConfigError(f"{where}: a value YAML cannot convert ({str(e).split(';')[0]})") from None
    check_shape(value, where)
    return value


def read_yaml(path: Path) -> dict:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {data[e.start]:#04x} at offset "
                          f"{e.start})") from None
    try:
        raw = parse_yaml(text, f"config file {path}")
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        syntax = isinstance(e, (yaml.scanner.ScannerError, yaml.parser.ParserError))
        kind = "YAML syntax error" if syntax else "YAML error"  # e.g. a tag that would build an object
        raise ConfigError(f"config file {path}: {kind}{where}: {problem}") from None
    if raw is None:
        raise ConfigError(f"config file {path} is empty")
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not a {type(raw).__name__}")
    return raw


def not_a_regular_file(path: Path) -> str | None:
    """What `path` is if not a regular file ("a directory", "a named pipe (FIFO)", ...), else None. Reading a
    FIFO or a device such as /dev/zero would block or never end; a directory fails with a misleading errno.
    Raises OSError (e.g. a missing file)."""
    mode = path.stat().st_mode
    if stat.S_ISREG(mode):
        return None
    return ("a directory" if stat.S_ISDIR(mode) else "a character device" if stat.S_ISCHR(mode)
            else "a block device" if stat.S_ISBLK(mode) else "a named pipe (FIFO)" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")


def not_a_file(path: Path) -> str | None:
    """Why `path`, which exists, cannot be a config file, or None if it can."""
    kind = not_a_regular_file(path)
    if kind:
        return f"is {kind}, not a YAML file"
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        return f"is {size:,} bytes; a config file is at most {MAX_CONFIG_BYTES:,}"
    return None


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
    out = dict(base)
    if "name" in over and "kwargs" not in over and over.get("name") != base.get("name"):
        out.pop("kwargs", None)  # another model's (or optimizer's) kwargs must not leak into this one
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "kwargs":
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


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


# ---------------------------------------------------------------------------------------------- command line

def fingerprint_keys(cls) -> list[str]:
    """The dotted keys declared with `setting(..., fingerprint=True)`."""
    return all_keys(cls, where=lambda field: field.metadata.get("fingerprint", False))


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
            raise ConfigError(f"cannot parse argument {shown(arg)}: expected section.key=value or one of "
                              f"{', '.join(sorted(flags))}")
        i += 1
    return options, overrides


def load(root_cls, source: str, overrides: list[tuple[str, str]]):
    raw = load_raw(source)
    overridden = {key.lstrip("-") for key, _ in overrides}
    for key, text in overrides:
        apply_override(raw, key, text)
    for section in {k.rsplit(".", 1)[0] for k in overridden if k.endswith(".name")}:
        if f"{section}.kwargs" not in overridden and isinstance(raw.get(section), dict):
            raw[section].pop("kwargs", None)  # the preset's kwargs belong to the preset's model
    return build(root_cls, raw)
