"""User errors: one clear line and exit code 2, never a traceback (unless --debug); and how an error line
echoes what it is about (a value, a name, another exception) so that it stays one readable line.
"""
from __future__ import annotations

import reprlib
import sys
from typing import Any

EXIT_USER_ERROR = 2
# A run stopped by SIGUSR1/SIGTERM after saving a checkpoint: "try again later" (sysexits EX_TEMPFAIL).
# Wrappers and torchrun --max-restarts treat it as a restartable failure.
EXIT_PREEMPTED = 75
# Another rank died or stalled past dist.timeout_s: this one stops rather than wait forever.
EXIT_LOST_RANK = 3

SHOWN_CHARS = 200          # an echoed value is cut here, so an error stays one readable line
MAX_ERROR_CHARS = 1000     # and a whole error line here, whatever a section's check echoes
LOST_PEER_SIGNS = ("Connection closed by peer", "Connection reset", "Timed out", "timed out", "Broken pipe")


class UserError(Exception):
    """A mistake in the input (config, data, checkpoint, launch) that the user can fix."""


class ConfigError(UserError):
    """A mistake in the config. Its message is made one line of at most MAX_ERROR_CHARS, keeping both ends
    (the key, and what is allowed): a section's check may echo a value of any length."""

    def __init__(self, message: str):
        super().__init__(cut_middle(" ".join(str(message).splitlines())))


def cut_middle(text: str) -> str:
    """`text` cut to MAX_ERROR_CHARS by taking out its middle: the start names the key or file, the end
    says what is allowed."""
    if len(text) <= MAX_ERROR_CHARS:
        return text
    head, marker = MAX_ERROR_CHARS * 2 // 3, " [...] "
    return text[:head] + marker + text[head + len(marker) - MAX_ERROR_CHARS:]


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


def first_line(error: BaseException) -> str:
    """Another exception as an error line quotes it: its first line, clipped; its type when it says nothing."""
    text = str(error).strip()
    return clip(text.splitlines()[0]) if text else type(error).__name__


def lost_another_rank(error: BaseException) -> bool:
    """A collective failed because a peer died or stalled (only once a process group exists)."""
    torch = sys.modules.get("torch")  # never imported here: before a run starts there is no process group
    if torch is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return False
    return isinstance(error, torch.distributed.DistError) or any(s in str(error) for s in LOST_PEER_SIGNS)
