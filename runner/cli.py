"""One command-line entry for every command (train, evaluate, predict, doctor, ...).

It owns what all of them share: reading argv, `--help`, `--debug`, and turning an error into one line on
stderr and an exit code (2 bad input, 3 lost rank, 75 preempted, returned by the command itself). Nothing
here imports torch, so `--help` and config errors are answered in the time Python and PyYAML take to start.
"""
from __future__ import annotations

import errno
import os
import sys
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from runner.errors import (EXIT_LOST_RANK, EXIT_USER_ERROR, ConfigError, UserError, cut_middle, first_line,
                           lost_another_rank, shown)

# errno values that mean "the disk or its permissions", which the user can fix: exit 2, not a traceback.
DISK_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EPERM)
# A path that cannot be a file the user meant: a bad name, not a bug.
PATH_ERRNOS = (errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.EIO, errno.ENOENT)


def say_error(message: str, rank: int | str | None = None) -> None:
    """One line, whatever the message holds: newlines escaped, the middle of a huge one cut out. Errors from
    other ranks say whose they are (`rank` defaults to the launcher's); the main process speaks plainly."""
    if rank is None:
        rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
    who = f"[rank {rank}] " if str(rank) not in ("", "0") else ""
    line = cut_middle(message.replace("\r", "\\r").replace("\n", "\\n"))
    # One write, newline included: ranks printing at once must not run their lines together.
    sys.stderr.write(f"error: {who}{line}\n")
    sys.stderr.flush()


def parse_command_line(argv: list[str], flags: dict[str, str],
                       positional: bool = False) -> tuple[dict, list[tuple[str, str]]]:
    """Split argv into known `--flags` and `section.key=value` overrides (also `--section.key value`).

    `flags` maps each flag to "value" (takes an argument) or "switch". With `positional`, other bare
    arguments (paths) are collected in options["args"], and so is an argument holding `=` that names an
    existing path.
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
        elif "=" in arg and not (positional and os.path.lexists(arg)):  # `x=1.png` that exists is a path
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


def quiet_disk_errors_in_threads(args) -> None:
    """A writer thread that hits a full or read-only disk (TensorBoard's) hands its error to the main thread
    at the next write, which reports it in one line; the thread's own traceback would follow that line."""
    if isinstance(args.exc_value, OSError) and args.exc_value.errno in DISK_ERRNOS:
        return
    threading.__excepthook__(args)


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
        threading.excepthook = quiet_disk_errors_in_threads
        code = self.run_guarded(sys.argv[1:] if argv is None else list(argv))
        world = os.environ.get("WORLD_SIZE", "1").strip()  # checked by the command; here it may be anything
        if world.isdigit() and int(world) > 1 and "torch.distributed" in sys.modules:
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


# ---------------------------------------------------------------------------------------------- `runner CMD`

# Each subcommand is a module with a `main(argv)`; it is imported only when it runs, so `runner --help` and a
# mistyped command stay fast.
SUBCOMMANDS = {"train": "runner.train", "evaluate": "runner.evaluate", "predict": "runner.predict",
               "prepare-data": "runner.prepare_data", "doctor": "runner.doctor", "sweep": "runner.sweep",
               "compare": "runner.compare"}
USAGE = "usage: runner <command> [--help] [arguments]"


def summary_line(module: str) -> str:
    """The first line of a module's docstring, read without importing it."""
    import ast
    import importlib.util

    source = Path(importlib.util.find_spec(module).origin).read_text()
    return (ast.get_docstring(ast.parse(source)) or "").splitlines()[0]


def runner_help() -> str:
    width = max(map(len, SUBCOMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {summary_line(module)}" for name, module in SUBCOMMANDS.items())
    return (f"{USAGE}\n\n{rows}\n\n`runner <command> --help` tells each command's arguments. The scripts under "
            f"runner/ take the same arguments (python runner/train.py ..., accelerate launch runner/train.py ...).")


def dispatch(argv: list[str] | None = None) -> int:
    """`runner <command> ...`: the command's own main() with the rest of the arguments."""
    import difflib
    import importlib

    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("--help", "-h", "help"):
        print(runner_help(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else EXIT_USER_ERROR
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        close = difflib.get_close_matches(name, SUBCOMMANDS, n=1)
        say_error(f"unknown command {shown(name)}" + (f" (did you mean {close[0]}?)" if close else "")
                  + f"; commands: {', '.join(SUBCOMMANDS)}")
        return EXIT_USER_ERROR
    return importlib.import_module(SUBCOMMANDS[name]).main(rest)
