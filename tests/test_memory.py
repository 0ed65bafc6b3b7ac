"""Out of memory never ends a run and never changes the experiment: train.micro_batch_size=auto and
eval.batch_size=auto (runner/memory.py).

The model under test is a user model (`model.name=oomnet:OomNet`, a module file in the test's directory)
that makes a real allocation the CPU allocator refuses ("DefaultCPUAllocator: can't allocate memory") when
a training micro-batch holds more than `limit` samples: in its forward or in its backward, on some ranks
(from RANK) or all, and from its N-th training forward on with a lower limit (to fail first in the middle
of an accumulation window). With `batchnorm: true` it has buffers, which DDP broadcasts in a forward: a
forward that fails on one rank alone must not leave the ranks disagreeing about that broadcast.
Multi-process runs are real gloo processes under torchrun, each bounded by dist.timeout_s and a subprocess
timeout, so a hang fails the test instead of stalling it.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.dist_helpers import final_checkpoint, read_weights
from tests.util import PYTHON, REPO, clean_env, ok, torchrun

OOMNET = '''
import os

import torch
from torch import nn


def run_out_of_memory():
    torch.empty(2**50, dtype=torch.uint8)  # a petabyte: the CPU allocator refuses it


class FailInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        run_out_of_memory()
        return grad


class OomNet(nn.Module):
    def __init__(self, in_shape, num_classes, limit=10**9, ranks=(), phase="forward", later_limit=None,
                 later_from_call=0, eval_limit=10**9, batchnorm=False):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_shape[0]) if batchnorm else nn.Identity()  # buffers DDP broadcasts
        self.fc = nn.Linear(int(torch.tensor(in_shape).prod()), num_classes)
        self.limit, self.ranks, self.phase = limit, list(ranks), phase
        self.later_limit, self.later_from_call, self.eval_limit = later_limit, later_from_call, eval_limit
        self.rank = int(os.environ.get("RANK", "0"))
        self.calls = 0  # training forwards on this rank

    def forward(self, x):
        out = self.fc(self.norm(x).flatten(1))
        if not self.training:
            if len(x) > self.eval_limit:
                run_out_of_memory()
            return out
        call, self.calls = self.calls, self.calls + 1
        later = self.later_limit is not None and call >= self.later_from_call
        if len(x) > (self.later_limit if later else self.limit) and (not self.ranks or self.rank in self.ranks):
            if self.phase == "forward":
                run_out_of_memory()
            out = FailInBackward.apply(out)
        return out
'''

# Global batch 64 on digits: auto starts at 64 per rank on 1 process, 32 on 2. Crops and flips on: a redone
# window must draw the same ones.
BASE = ["--config", "digits", "log.trackers=[]", "log.plot=false", "log.progress=lines", "model.name=oomnet:OomNet",
        "train.global_batch_size=64", "train.epochs=1", "train.limit_train_steps=4", "dist.timeout_s=60",
        "data.crop_padding=2", "data.flip=true"]
TIMEOUT = 240


@pytest.fixture
def user_dir(tmp_path) -> Path:
    (tmp_path / "oomnet.py").write_text(OOMNET)
    return tmp_path


def launch(user_dir: Path, args: list[str], world: int = 1) -> subprocess.CompletedProcess:
    """runner/train.py from the user's directory (where oomnet.py is), as a real process or torchrun."""
    launcher = torchrun(world) if world > 1 else [PYTHON]
    return subprocess.run(launcher + [str(REPO / "runner/train.py"), *BASE, *args, f"run.root={user_dir / 'runs'}"],
                          cwd=user_dir, env=clean_env(user_dir), capture_output=True, text=True, timeout=TIMEOUT)



def max_relative_difference(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)) for k in a)


def run_summary(user_dir: Path, name: str) -> dict:
    return json.loads((user_dir / "runs" / name / "summary.json").read_text())


def weights(user_dir: Path, name: str) -> dict:
    return read_weights(final_checkpoint(user_dir / "runs" / name))


def shrink_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("out of memory at micro batch")]


def test_auto_micro_batch_shrinks_on_one_process_and_ends_as_the_run_that_fits(user_dir, train_main, monkeypatch):
    monkeypatch.chdir(user_dir)
    auto = ok(train_main(BASE + ["model.kwargs={limit: 16}", "train.micro_batch_size=auto", "run.name=auto"],
                         run_root=user_dir / "runs"))
    assert shrink_lines(auto.stdout) == [
        "out of memory at micro batch 64 on rank 0: micro 32 x accumulation 2 from step 1",
        "out of memory at micro batch 32 on rank 0: micro 16 x accumulation 4 from step 1"], auto.stdout
    ok(train_main(BASE + ["train.micro_batch_size=16", "run.name=fits"], run_root=user_dir / "runs"))
    assert max_relative_difference(weights(user_dir, "auto"), weights(user_dir, "fits")) <= 1e-5
    summary = run_summary(user_dir, "auto")
    assert (summary["micro_batch_size"], summary["gradient_accumulation_steps"]) == (16, 4)
    state = json.loads((final_checkpoint(user_dir / "runs" / "auto") / "run_state.json").read_text())
    assert state["micro_batch"] == 16
    assert len(summary["throughput"]["peak_memory_mb_per_rank"]) == 1


def test_a_resume_after_the_shrink_starts_small_and_ends_bit_identical(user_dir, train_main, monkeypatch):
    monkeypatch.chdir(user_dir)
    run = BASE + ["model.kwargs={limit: 16}", "train.micro_batch_size=auto", "checkpoint.every_steps=1"]
    ok(train_main(run + ["run.name=whole"], run_root=user_dir / "runs"))
    first = ok(train_main(run + ["run.name=parts", "train.max_steps=2"], run_root=user_dir / "runs"))
    assert len(shrink_lines(first.stdout)) == 2
    resumed = ok(train_main(run + ["run.name=parts", "train.max_steps=4"], run_root=user_dir / "runs"))
    assert shrink_lines(resumed.stdout) == [], "the resumed run must start at the micro batch that fit"
    assert "micro 16 x accumulation 4 x world 1" in resumed.stdout, resumed.stdout
    whole, parts = weights(user_dir, "whole"), weights(user_dir, "parts")
    assert all((whole[k] == parts[k]).all() for k in whole), "a resume after the shrink is not bit-identical"


def test_when_one_sample_does_not_fit_one_line_exit_2_and_the_checkpoint_is_kept(user_dir, train_main, monkeypatch):
    monkeypatch.chdir(user_dir)
    result = train_main(BASE + ["model.kwargs={later_limit: 0, later_from_call: 2}", "train.micro_batch_size=auto",
                                "checkpoint.every_steps=1", "run.name=huge"], run_root=user_dir / "runs")
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: out of memory at micro batch 1 on rank 0: "), lines
    assert "oomnet:OomNet" in lines[0] and "[1, 1, 28, 28]" in lines[0] and "peak memory rank 0" in lines[0]
    assert "at step 3" in lines[0] and "step_00000002" in lines[0]
    assert final_checkpoint(user_dir / "runs" / "huge").name == "step_00000002"
    assert len(shrink_lines(result.stdout)) == 6  # 64, 32, 16, 8, 4, 2: each halved before giving up


def test_auto_eval_batch_halves_and_gives_the_same_metrics(user_dir, train_main, monkeypatch):
    monkeypatch.chdir(user_dir)
    auto = ok(train_main(BASE + ["model.kwargs={eval_limit: 100}", "eval.batch_size=auto", "run.name=auto"],
                         run_root=user_dir / "runs"))
    assert "out of memory evaluating at batch 1024: eval batch 64 from now on" in auto.stdout, auto.stdout
    ok(train_main(BASE + ["eval.batch_size=7", "run.name=fixed"], run_root=user_dir / "runs"))
    assert run_summary(user_dir, "auto")["final"] == run_summary(user_dir, "fixed")["final"]


@pytest.mark.parametrize("bad, expected", [
    (["train.micro_batch_size=most"], "train.micro_batch_size='most': expected an integer or auto"),
    (["train.micro_batch_size=auto", "train.gradient_accumulation_steps=2"], "leave it 0"),
    (["eval.batch_size=0"], "eval.batch_size=0: expected an integer >= 1 or auto"),
])
def test_auto_settings_refuse_what_contradicts_them(train_main, bad, expected):
    result = train_main(["--config", "digits", *bad])
    assert result.returncode == 2 and expected in result.stderr, result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("case, kwargs, final_micro", [
    # Rank 1 alone, in the forward of the step that syncs gradients (accumulation 1: every micro-step syncs),
    # with BatchNorm buffers: the running statistics must end equal too.
    ("one rank", "{limit: 8, ranks: [1], batchnorm: true}", 8),
    # Every rank, in the backward: 32 -> 16 -> 8 in step 1 (first in its syncing micro-step), then in step 2
    # first in the second of four micro-steps, the middle of the window.
    ("every rank", "{limit: 8, later_limit: 4, later_from_call: 7, phase: backward}", 4),
])
def test_two_processes_shrink_together_and_end_as_the_run_that_fits(user_dir, case, kwargs, final_micro):
    auto = ok(launch(user_dir, [f"model.kwargs={kwargs}", "train.micro_batch_size=auto", "run.name=auto"], world=2))
    lines = shrink_lines(auto.stdout)
    assert lines[-1].startswith(f"out of memory at micro batch {2 * final_micro} on rank "), auto.stdout
    if case == "one rank":
        assert all(" on rank 1: " in line for line in lines), lines
    else:
        assert all(" on rank 0, 1: " in line for line in lines), lines
        assert lines[-1].endswith("from step 2"), lines
    batchnorm = ["model.kwargs={batchnorm: true}"] if "batchnorm" in kwargs else []
    ok(launch(user_dir, [f"train.micro_batch_size={final_micro}", "run.name=fits", *batchnorm], world=2))
    auto_weights, fits_weights = weights(user_dir, "auto"), weights(user_dir, "fits")
    assert auto_weights.keys() == fits_weights.keys()
    assert max_relative_difference(auto_weights, fits_weights) <= 1e-5
    summary = run_summary(user_dir, "auto")
    assert summary["micro_batch_size"] == final_micro
    fits = run_summary(user_dir, "fits")
    assert all(summary["final"][split]["accuracy"] == fits["final"][split]["accuracy"] for split in fits["final"])
    assert len(summary["throughput"]["peak_memory_mb_per_rank"]) == 2
    assert "peak memory rank 0 " in auto.stdout and ", rank 1 " in auto.stdout
