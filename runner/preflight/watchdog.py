"""The doctor's watchdog, and the line it says when a phase stalls."""
import os
import threading

from runner.cli import say_error
from runner.errors import EXIT_LOST_RANK


class Watchdog:
    """Ends this process when one phase (joining, one collective) outlasts the timeout: gloo and NCCL do
    not honour their own timeout in every situation, and a doctor that hangs is worse than none."""

    def __init__(self, seconds: float, rank: int):
        self.seconds, self.rank = seconds, rank
        self.timer: threading.Timer | None = None

    def arm(self, failure: str, seconds: float | None = None) -> None:
        """From now on, `failure` (what did not happen) ends the process after `seconds` (default: the timeout)."""
        self.disarm()
        self.timer = threading.Timer(self.seconds if seconds is None else max(0.0, seconds), self.fire, [failure])
        self.timer.daemon = True
        self.timer.start()

    def disarm(self) -> None:
        if self.timer:
            self.timer.cancel()

    def fire(self, failure: str) -> None:
        say_error(failure, self.rank)
        os._exit(EXIT_LOST_RANK)


def stalled(what: str, timeout: float) -> str:
    return f"check '{what}' failed: not done within --timeout {timeout:g} s (another rank died or stalled)"
