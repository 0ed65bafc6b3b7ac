"""One command-line entry for every command (train, evaluate, predict, doctor, ...).

It owns what all of them share: reading argv, `--help`, `--debug`, and turning an error into one line on
stderr and an exit code (2 bad input, 3 lost rank, 75 preempted, returned by the command itself). Nothing
here imports torch, so `--help` and config errors are answered in the time Python and PyYAML take to start.
"""
from __future__ import annotations

import errno
import os
import sys
import traceback
from dataclasses import dataclass, field
from typing import Callable

from runner.config import parse_command_line
from runner.errors import EXIT_LOST_RANK, EXIT_USER_ERROR, UserError

# errno values that mean "the disk or its permissions", which the user can fix: exit 2, not a traceback.
DISK_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EPERM)
# A path that cannot be a file the user meant: a bad name, not a bug.
PATH_ERRNOS = (errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.EIO, errno.ENOENT)
LOST_PEER_SIGNS = ("Connection closed by peer", "Connection reset", "Timed out", "timed out", "Broken pipe")


def rank_prefix() -> str:
    """Errors from other ranks say whose they are; the main process speaks plainly."""
    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
    return f"[rank {rank}] " if rank not in ("", "0") else ""


MAX_ERROR_CHARS = 1000


def say_error(message: str) -> None:
    """One line, whatever the message holds: newlines escaped, the middle of a huge one cut out."""
    line = message.replace("\r", "\\r").replace("\n", "\\n")
    if len(line) > MAX_ERROR_CHARS:
        line = line[:MAX_ERROR_CHARS // 2] + " [...] " + line[-MAX_ERROR_CHARS // 2:]
    print(f"error: {rank_prefix()}{line}", file=sys.stderr, flush=True)


def lost_another_rank(error: BaseException) -> bool:
    """A collective failed because a peer died or stalled (only once a process group exists)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return False
    return isinstance(error, torch.distributed.DistError) or any(s in str(error) for s in LOST_PEER_SIGNS)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


@dataclass
class Command:
    """A command's documentation (its module docstring, printed by --help), its flags ("--name": "value" or
    "switch"), and the function that runs it with (options, overrides) and returns the exit code."""
    doc: str
    flags: dict[str, str]
    run: Callable[[dict, list], int]
    positional: bool = False      # bare arguments (paths) are collected in options["args"]
    epilog: Callable[[], str] = field(default=lambda: "")

    def main(self, argv: list[str] | None = None) -> int:
        code = self.run_guarded(sys.argv[1:] if argv is None else list(argv))
        if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and "torch.distributed" in sys.modules:
            # The interpreter's teardown after a gloo process group sometimes aborts ("terminate called
            # without an active exception"), turning a finished rank into a crash: everything is written
            # and flushed by now, so leave at once.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code

    def run_guarded(self, argv: list[str]) -> int:
        debug = "--debug" in argv
        try:
            if "--help" in argv or "-h" in argv:
                print((self.doc or "").strip() + self.epilog())
                return 0
            flags = {**self.flags, "--debug": "switch"}
            options, overrides = parse_command_line(argv, flags, positional=self.positional)
            return self.run(options, overrides)
        except UserError as e:
            if debug:
                traceback.print_exc()
            say_error(str(e))
            return EXIT_USER_ERROR
        except KeyboardInterrupt:
            say_error("interrupted")
            return 130
        except Exception as e:
            if debug:
                traceback.print_exc()
            if lost_another_rank(e):
                say_error(f"another rank died or stalled longer than dist.timeout_s ({type(e).__name__}: "
                          f"{first_line(e)})")
                sys.stderr.flush()
                os._exit(EXIT_LOST_RANK)  # a normal exit would tear the broken process group down and may hang
            if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
                verb = "write" if e.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT) else "access"
                say_error(f"cannot {verb} {e.filename or 'a file'}: {e.strerror}; files already written are kept")
                return EXIT_USER_ERROR
            if isinstance(e, OSError) and e.filename and e.errno in PATH_ERRNOS:
                say_error(f"cannot access {e.filename}: {e.strerror}")
                return EXIT_USER_ERROR
            if isinstance(e, MemoryError):
                say_error("out of memory; a setting asks for more than this machine has (--debug shows where)")
                return EXIT_USER_ERROR
            if debug:
                return 1
            raise
