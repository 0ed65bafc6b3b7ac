"""`runner <command> ...`: one command with subcommands (the `runner` entry point and `python -m runner`)."""
from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

from tests.util import PYTHON, REPO, clean_env

COMMANDS = ("train", "evaluate", "predict", "prepare-data", "doctor", "sweep", "compare")


def runner(args: list[str], tmp_path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "runner", *args], cwd=REPO, env=clean_env(tmp_path), capture_output=True,
                          text=True, timeout=timeout)


def test_the_runner_entry_point_is_python_m_runner():
    section = (REPO / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n[")[0]
    scripts = dict(re.findall(r'^([\w-]+) = "([^"]+)"', section, re.M))  # tomllib is Python 3.11+
    assert scripts["runner"] == "runner.__main__:main"
    assert all(scripts[f"runner-{name}"].endswith(":main") for name in COMMANDS), "the old names stay as aliases"


def test_help_lists_every_command_without_importing_torch(tmp_path):
    probe = ("import sys, runpy; sys.argv = ['runner', '--help']\n"
             "try:\n    runpy.run_module('runner', run_name='__main__')\nexcept SystemExit as e:\n    code = e.code\n"
             "print('torch imported' if 'torch' in sys.modules else 'no torch'); sys.exit(code)")
    result = subprocess.run([PYTHON, "-c", probe], cwd=REPO, env=clean_env(tmp_path), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    listed = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")]
    assert listed == list(COMMANDS), result.stdout
    assert result.stdout.rstrip().endswith("no torch")


@pytest.mark.parametrize("command, says", [
    ("train", "Train an image classifier"), ("evaluate", "Evaluate a checkpoint"),
    ("predict", "Classify image files"), ("prepare-data", "Build a dataset's cache"),
    ("doctor", "Preflight check of a launch"), ("sweep", "Run one config many times"),
    ("compare", "Compare runs"),
])
def test_each_command_has_its_own_help(tmp_path, command, says):
    result = runner([command, "--help"], tmp_path)
    assert result.returncode == 0 and result.stdout.startswith(says), (result.stdout[:300], result.stderr)


def test_an_unknown_command_is_one_line(tmp_path):
    result = runner(["trian", "--config", "digits"], tmp_path)
    assert result.returncode == 2 and result.stderr.splitlines() == [
        "error: unknown command 'trian' (did you mean train?); commands: " + ", ".join(COMMANDS)], result.stderr
    bare = runner([], tmp_path)
    assert bare.returncode == 2 and "usage: runner <command>" in bare.stderr


def test_runner_train_trains_and_errors_are_the_commands_own(tmp_path):
    result = runner(["train", "--config", "digits", "train.fast_dev_run=2", "log.trackers=[]", "log.plot=false",
                     "log.progress=lines"], tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fast_dev_run" in result.stdout and "test  accuracy" in result.stdout
    bad = runner(["train", "--config", "digits", "optim.lrr=0.1"], tmp_path)
    assert bad.returncode == 2 and bad.stderr.splitlines() == [
        "error: unknown config key optim.lrr; did you mean optim.lr?"], bad.stderr


def test_error_lines_from_ranks_printing_at_once_never_run_together(tmp_path):
    """Every rank of a launch may report the same bad setting at the same moment into one unbuffered stream
    (launchers set PYTHONUNBUFFERED): each line must arrive whole."""
    # Both start writing at the same moment (a time given to both), so that their writes overlap.
    script = ("import sys, time; from runner.cli import say_error\n"
              "while time.time() < float(sys.argv[2]): pass\n"
              "for i in range(3000): say_error('x' * 200 + f' {i}', sys.argv[1])\n")
    env = {**clean_env(tmp_path), "PYTHONUNBUFFERED": "1"}
    # Both write into one pipe, as the ranks of a launch share the launcher's stderr.
    read, write = os.pipe()
    start = str(time.time() + 2)
    writers = [subprocess.Popen([PYTHON, "-c", script, str(rank), start], cwd=REPO, env=env, stderr=write)
               for rank in (0, 1)]
    os.close(write)
    with open(read, "rb") as stream:
        lines = stream.read().decode().splitlines()
    assert all(w.wait(60) == 0 for w in writers)
    pattern = re.compile(r"error: (\[rank 1\] )?x{200} \d+")
    assert len(lines) == 6000 and all(pattern.fullmatch(line) for line in lines), \
        [line for line in lines if not pattern.fullmatch(line)][:3]
