"""Reading YAML that may be hostile or broken (config files, sweep files, overrides) as plain data.

Every way a file can be wrong ends in one ConfigError line: not a regular file, too large, not UTF-8, a
syntax error, a tag that would build an object, a key given twice, nesting or aliases that would hang
whatever walks the value.
"""
from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import yaml

from runner.errors import ConfigError, first_line, shown

# Limits on what a config may hold, so that a hostile or broken file ends in one line, not a hang or a
# traceback: a config is a page of YAML, a few levels deep.
MAX_CONFIG_BYTES = 1 << 20
MAX_DEPTH = 20             # sections, kwargs, and lists inside them
MAX_VALUES = 100_000       # counted after YAML aliases are expanded ("billion laughs" stops here)


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
        problem = getattr(e, "problem", None) or first_line(e)
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
