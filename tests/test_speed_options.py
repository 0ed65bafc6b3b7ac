"""Speed options on the CPU: bf16, channels_last, threads, torch.compile, the torchvision loader's workers,
and the checks that refuse an option where it cannot help.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file

from runner import distributed
from runner.distributed import communication_note

from tests.util import QUIET, final_weights, ok, run_train, summary


TINY_CNN = ["--config", "digits", "model.name=simple_cnn", "model.kwargs={width: 4, hidden: 16}", "train.epochs=1",
            "train.limit_train_steps=4", "train.limit_eval_batches=1", "train.micro_batch_size=16"] + QUIET


def weights(run_dir):
    last = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    return load_file(last / "model.safetensors")


def close(a: dict, b: dict, tol: float) -> bool:
    return all((a[k] - b[k]).abs().max() <= tol * (1 + b[k].abs().max()) for k in a)


def test_bf16_on_cpu(train_main, tmp_path):
    """bf16 autocast runs on the CPU: the run completes, and the numbers differ slightly from fp32."""
    args = ["--config", "digits", "train.epochs=1", "train.limit_train_steps=5", *QUIET]
    bf16 = ok(train_main(args + ["train.mixed_precision=bf16", "dist.allow_emulated_bf16=true"], run_root=tmp_path / "bf16"))
    fp32 = ok(train_main(args, run_root=tmp_path / "fp32"))
    assert "precision bf16" in bf16.stdout
    run_dir = bf16.run_root / "digits"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["mixed_precision"] == "bf16"
    assert math.isfinite(summary(run_dir)["final"]["test"]["loss"])
    low, full = final_weights(run_dir), final_weights(fp32.run_root / "digits")
    assert all(w.dtype == torch.float32 for w in low.values())  # master weights stay fp32
    diff = max((low[k] - full[k]).abs().max().item() for k in full)
    assert 0 < diff < 0.05, diff  # autocast really ran in bf16, and it still trained the same model


def test_channels_last_and_threads_match_the_default(train_main):
    base = train_main(TINY_CNN + ["run.name=base"])
    fast = train_main(TINY_CNN + ["run.name=cl", "model.channels_last=true", "dist.threads=1",
                                  "dist.cudnn_benchmark=false"])
    assert base.returncode == fast.returncode == 0, fast.stderr
    import torch
    assert torch.get_num_threads() == 1
    assert close(weights(base.run_root / "base"), weights(fast.run_root / "cl"), 1e-4)


def test_bf16_with_channels_last_trains(train_main):
    result = train_main(TINY_CNN + ["run.name=bf16", "train.mixed_precision=bf16", "model.channels_last=true",
                                    "dist.allow_emulated_bf16=true"])
    assert result.returncode == 0, result.stderr
    assert "precision bf16" in result.stdout


@pytest.mark.slow
def test_torch_compile_runs_on_cpu(tmp_path):
    result = run_train(TINY_CNN + ["run.name=compiled", "model.compile=true"], tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "compiled" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["final"]["test"]["samples"] == 256


def test_torchvision_loader_with_persistent_workers(train_main):
    result = train_main(TINY_CNN + ["run.name=workers", "data.loader=torchvision", "data.num_workers=2",
                                    "data.persistent_workers=true", "data.pin_memory=true", "train.epochs=2",
                                    "data.crop_padding=2", "data.flip=true"])
    assert result.returncode == 0, result.stderr
    assert json.loads((result.run_root / "workers" / "summary.json").read_text())["steps"] == 8


def test_sync_batchnorm_is_refused_on_cpu(train_main):
    result = train_main(TINY_CNN + ["run.name=syncbn", "model.sync_batchnorm=true"])
    assert result.returncode == 2 and "model.sync_batchnorm" in result.stderr and "CUDA" in result.stderr


def test_bf16_is_refused_on_a_cpu_without_native_bf16(train_main, tmp_path, monkeypatch):
    """Emulated bf16 runs several times slower than fp32: a speed option must never be a slowdown."""
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 avx512f\n")
    monkeypatch.setattr(distributed, "CPUINFO", fake)
    refused = train_main(TINY_CNN + ["run.name=emulated", "train.mixed_precision=bf16"])
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "no native bf16" in refused.stderr and "dist.allow_emulated_bf16=true" in refused.stderr
    assert not (refused.run_root / "emulated").exists()
    fake.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n")
    assert train_main(TINY_CNN + ["run.name=native", "train.mixed_precision=bf16"]).returncode == 0


def test_communication_bound_note_only_where_the_all_reduce_dominates():
    import torch

    cpu = torch.device("cpu")
    linear, cnn = (31_360 * 16, 7_850), (35_003_904 * 32, 545_098)  # (FLOPs per micro-step, parameters)
    assert communication_note(2, *linear, cpu) and "1 process" in communication_note(2, *linear, cpu)
    assert communication_note(2, *cnn, cpu) is None
    assert communication_note(1, *linear, cpu) is None

