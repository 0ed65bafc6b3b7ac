"""Preemption: SIGUSR1/SIGTERM/SIGINT (or the loss of the launcher) set a flag; all ranks save and exit
together.

The handler only sets a flag, because saving inside a handler races with the step in progress. The loop
(runner/loop.py) sends the flag with the step's loss in an all-reduce it starts without waiting, and reads
the sum one step later (on GPUs: at the next log, eval or save boundary). Every rank reads the same sum at
the same step, so all stop at that step and save the same checkpoint, and none is left blocked in a
collective. A second signal exits at once (the same signal delivered twice within DUPLICATE_WINDOW_S counts
once). Ctrl-C (SIGINT) stops the same way, without a requeue, and exits 130 as an interrupted command does;
a second Ctrl-C exits at once (one within CTRL_C_REPEAT_S is the same keypress passed on by a launcher).
The handlers stay until the process is gone: see exit_keeping_handlers.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time


SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)  # installed in this order: SIGUSR1 last


received: int | None = None  # the first SIGUSR1/SIGTERM/SIGINT, if any
received_at = 0.0
# Slurm signals every process of a step, and launchers pass signals on too: the same signal again within
# this many seconds is the same event arriving twice, not a second request.
DUPLICATE_WINDOW_S = 2.0
# A terminal's Ctrl-C reaches every process of the group, and torchrun passes it on to its ranks again
# within milliseconds; a person who presses Ctrl-C a second time to quit does so later than this.
CTRL_C_REPEAT_S = 0.5


def handle(signum, frame):
    global received, received_at
    if received is not None:
        window = CTRL_C_REPEAT_S if signum == signal.SIGINT else DUPLICATE_WINDOW_S
        if signum == received and time.monotonic() - received_at < window:
            return
        os._exit(128 + signum)
    received, received_at = signum, time.monotonic()


def should_requeue() -> bool:
    """SIGUSR1 is the time-limit warning (`--signal=USR1@N`): requeue. SIGTERM is `scancel` or Slurm's own
    preemption, which requeues by itself when it wants to: save, exit, and leave the decision to Slurm."""
    return received == signal.SIGUSR1


def install() -> None:
    """Called before torch is imported: a signal during the slow startup is kept, not fatal."""
    global launcher_pid
    for sig in SIGNALS:
        # `nohup` and a shell's background jobs ignore SIGINT: keep that. A stop signal is always ours, even
        # when a wrapper ignored it for itself (launch/slurm_task.sh ignores USR1 so that the shell survives).
        if sig != signal.SIGINT or signal.getsignal(sig) != signal.SIG_IGN:
            signal.signal(sig, handle)
    # Under torchrun or accelerate launch, a launcher that dies (a SIGUSR1 kills it at once) leaves its ranks
    # running unobserved: they notice that their parent changed and stop as if signalled.
    launcher_pid = os.getppid() if os.environ.get("TORCHELASTIC_RUN_ID") else None


launcher_pid: int | None = None


def stop_requested() -> bool:
    """A signal arrived, or the launcher that started this rank is gone. Cheap: called every step."""
    global received, received_at
    if received is None and launcher_pid is not None and os.getppid() != launcher_pid:
        received, received_at = LAUNCHER_GONE, time.monotonic()
    return received is not None


LAUNCHER_GONE = -1


def signal_name() -> str:
    stop_requested()  # the ranks share a launcher: another rank may have noticed its exit first
    if received == LAUNCHER_GONE:
        return "the exit of its launcher"
    return signal.Signals(received).name if received else "a signal on another rank"


def exit_code(preempted: int) -> int:
    """Ctrl-C exits as an interrupted command does (130), after saving; a preemption exits `preempted`."""
    return 128 + signal.SIGINT if received == signal.SIGINT else preempted


def exit_keeping_handlers(code: int) -> None:
    """Leave now, if a stop signal arrived. Python's own exit puts the default handlers back before it tears
    torch down, which takes a while; a repeat of the signal in that time would kill the process (128+N)
    instead of counting as the same event. Everything is written and flushed by now."""
    if received is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def slurm_job_id() -> str | None:
    """This job's id as `scontrol requeue` needs it: `<array>_<task>` for array jobs."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def requeue_slurm_job(log=print) -> bool:
    """Ask Slurm to requeue this job (argument list, never a shell string). True if it was asked."""
    job = slurm_job_id()
    if not job:
        return False
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        log("error: cannot requeue: scontrol is not on PATH (inside a container?); resubmit the job to resume")
        return False
    log(f"requeueing Slurm job {job}")
    result = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True)
    if result.returncode != 0:
        log(f"error: scontrol requeue {job} failed: {result.stderr.strip()}")
        return False
    sys.stdout.flush()
    return True
