"""User errors: one clear line and exit code 2, never a traceback (unless --debug)."""

EXIT_USER_ERROR = 2
# A run stopped by SIGUSR1/SIGTERM after saving a checkpoint: "try again later" (sysexits EX_TEMPFAIL).
# Wrappers and torchrun --max-restarts treat it as a restartable failure.
EXIT_PREEMPTED = 75
# Another rank died or stalled past dist.timeout_s: this one stops rather than wait forever.
EXIT_LOST_RANK = 3


class UserError(Exception):
    """A mistake in the input (config, data, checkpoint, launch) that the user can fix."""
