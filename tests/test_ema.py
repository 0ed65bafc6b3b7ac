"""The exponential moving average of the weights (train.ema_decay, runner/ema.py): its update, its
checkpoint and resume, its evaluation beside the weights, and evaluate/predict --weights."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from runner.evaluate import main as evaluate_main
from runner.predict import main as predict_main
from tests.conftest import reset_accelerate
from tests.dist_helpers import error_lines
from tests.util import QUIET_LINES, clean_env, ok, read_jsonl, run_train, summary, torchrun

# Two epochs of 6 steps at global batch 64 with an average: a stop at step 5 falls mid-epoch.
AVERAGED = ["--config", "digits", *QUIET_LINES, "train.epochs=2", "train.limit_train_steps=6",
            "train.global_batch_size=64", "train.ema_decay=0.9"]



def tensors(run_dir: Path, step: int, name: str) -> dict:
    return load_file(run_dir / "checkpoints" / f"step_{step:08d}" / name)


def test_the_average_follows_the_warmup_decay_in_float32():
    from runner.ema import EmaWeights, warmup_decay

    source = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)).to(torch.bfloat16)
    ema = EmaWeights(source, 0.5, "cpu")
    assert all(v.dtype == torch.float32 for v in ema.module.state_dict().values() if v.is_floating_point())
    start = ema.module[0].weight.clone()
    with torch.no_grad():
        source[0].weight.add_(1.0)
        source[1].num_batches_tracked.fill_(7)
    ema.update(0)  # the first step: decay min(0.5, 1/10) = 0.1
    assert warmup_decay(0.5, 0) == pytest.approx(0.1) and warmup_decay(0.5, 100) == 0.5
    expected = 0.1 * start + 0.9 * source[0].weight.float()
    assert torch.allclose(ema.module[0].weight, expected, rtol=0, atol=1e-6)
    assert int(ema.module[1].num_batches_tracked) == 7  # integer buffers are copied, not averaged
    ema.update(100)  # settled: decay 0.5
    assert torch.allclose(ema.module[0].weight, 0.5 * expected + 0.5 * source[0].weight.float(), rtol=0, atol=1e-6)


def test_a_resumed_average_continues_bit_identically_and_is_reported(train_main):
    """The trap: a resume that rebuilds the average from the resumed weights (or restarts its warm-up)
    would end elsewhere. Stopping at step 5 and continuing must end bit-equal to the uninterrupted run."""
    whole = ok(train_main(AVERAGED + ["run.name=whole", "eval.monitor=ema_accuracy"]))
    ok(train_main(AVERAGED + ["run.name=parts", "eval.monitor=ema_accuracy", "train.max_steps=5"]))
    at_stop = tensors(whole.run_root / "parts", 5, "ema.safetensors")
    assert not torch.equal(at_stop["fc.weight"], tensors(whole.run_root / "parts", 5, "model.safetensors")["fc.weight"])
    assert "resumed from" in ok(train_main(AVERAGED + ["run.name=parts", "eval.monitor=ema_accuracy"])).stdout
    for name in ("ema.safetensors", "model.safetensors"):
        a, b = tensors(whole.run_root / "whole", 12, name), tensors(whole.run_root / "parts", 12, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    evals = [r for r in read_jsonl(whole.run_root / "whole" / "metrics.jsonl") if r["split"] == "val"]
    assert len(evals) == 2 and all({"accuracy", "loss", "ema_accuracy", "ema_loss", "ema_f1",
                                     "ema_top5_accuracy"} <= set(r["metrics"]) for r in evals)
    assert evals[-1]["metrics"]["ema_loss"] != evals[-1]["metrics"]["loss"]
    best = summary(whole.run_root / "whole")["best"]
    assert best["metric"] == "ema_accuracy" and best["value"] == max(r["metrics"]["ema_accuracy"] for r in evals)
    assert "| ema accuracy " in whole.stdout


def evaluate(capsys, *args: str) -> int:
    reset_accelerate()
    try:
        return evaluate_main(list(args))
    finally:
        reset_accelerate()
        capsys.readouterr()


def test_evaluate_and_predict_take_the_average_by_default_and_raw_weights_when_asked(train_main, capsys, tmp_path):
    from PIL import Image

    run_dir = ok(train_main(AVERAGED + ["run.name=avg", "train.epochs=1"])).run_root / "avg"
    last, final = run_dir / "checkpoints" / "last", summary(run_dir)["final"]["test"]
    assert evaluate(capsys, "--checkpoint", str(last)) == 0
    assert evaluate(capsys, "--checkpoint", str(last), "--weights", "raw") == 0
    averaged = json.loads((run_dir / "eval-step_00000006-test-ema.json").read_text())
    raw = json.loads((run_dir / "eval-step_00000006-test.json").read_text())
    assert (averaged["weights"], raw["weights"]) == ("ema", "raw")
    # Exactly what training reported for the test split at its last step, for each set of weights.
    assert (averaged["metrics"]["loss"], raw["metrics"]["loss"]) == (final["ema_loss"], final["loss"])
    assert averaged["metrics"]["loss"] != raw["metrics"]["loss"]

    image = tmp_path / "digit.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)).save(image)
    probabilities = {}
    for choice in ([], ["--weights", "ema"], ["--weights", "raw"]):
        assert predict_main(["--checkpoint", str(last), "--json", *choice, str(image)]) == 0
        probabilities[tuple(choice)] = json.loads(capsys.readouterr().out)["predictions"][0]["probability"]
    assert probabilities[()] == probabilities[("--weights", "ema")] != probabilities[("--weights", "raw")]


def test_asking_for_an_average_that_is_not_there_is_one_line(train_main, capsys, tmp_path):
    plain = ok(train_main(["--config", "digits", *QUIET_LINES, "run.name=plain", "train.epochs=1",
                           "train.limit_train_steps=2"])).run_root / "plain"
    assert not (plain / "checkpoints" / "last" / "ema.safetensors").exists()
    reset_accelerate()
    assert evaluate_main(["--checkpoint", str(plain), "--weights", "ema"]) == 2
    (tmp_path / "x.png").write_bytes(b"")  # never read: the flag is refused first
    assert predict_main(["--checkpoint", str(plain), "--weights", "best", str(tmp_path / "x.png")]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert lines[0].startswith("error: --weights ema: ") and "holds no EMA weights" in lines[0]
    assert lines[1] == "error: --weights best: expected one of raw, ema"
    refused = {"eval.monitor=ema_accuracy": "error: eval.monitor=ema_accuracy needs train.ema_decay > 0 (the "
                                            "average it monitors)",
               "train.ema_decay=1": "error: train.ema_decay=1.0: must be < 1 (0 turns the average off)"}
    for override, line in refused.items():
        result = train_main(["--config", "digits", override])
        assert result.returncode == 2 and error_lines(result.stderr) == [line]


@pytest.mark.slow
def test_the_average_on_one_and_two_processes_agrees(tmp_path):
    """torchrun with 2 processes against one process: the same average, also across an unfreeze."""
    env = clean_env(tmp_path)
    args = ["--config", "digits", *QUIET_LINES, "model.name=simple_cnn", "model.kwargs={width: 4, hidden: 16}",
            "train.epochs=2", "train.limit_train_steps=4", "train.global_batch_size=64", "train.ema_decay=0.9",
            "model.freeze=[features]", "model.unfreeze_epoch=1"]
    ok(run_train(args + ["run.name=one"], tmp_path, env=env))
    ok(run_train(args + ["run.name=two"], tmp_path, launcher=torchrun(2), env=env))
    runs = tmp_path / "runs"
    for name in ("ema.safetensors", "model.safetensors"):
        one, two = tensors(runs / "one", 8, name), tensors(runs / "two", 8, name)
        assert not torch.equal(one["features.0.weight"], tensors(runs / "one", 4, name)["features.0.weight"])
        difference = max(float((one[k] - two[k]).abs().max() / one[k].abs().max().clamp_min(1e-12)) for k in one)
        print(f"{name}: 1 vs 2 processes, max relative difference {difference:.3g}")
        assert difference <= 1e-5, name
