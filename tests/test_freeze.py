"""Transfer-learning controls: model.freeze until model.unfreeze_epoch, optim.backbone_lr_factor, and the
classifier head they are defined by (runner/finetune.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.dist_helpers import error_lines
from tests.util import QUIET_LINES, clean_env, ok, run_train, torchrun

# ResNet-9 (BatchNorm) at width 4 on digits: two epochs of 4 steps, a checkpoint at the end of each.
RESNET = ["--config", "digits", *QUIET_LINES, "model.name=resnet9", "model.kwargs={width: 4}", "train.epochs=2",
          "train.limit_train_steps=4", "train.global_batch_size=64", "train.limit_eval_batches=1",
          "checkpoint.keep_last=10"]
HEAD = "net.8.weight"  # ResNet-9's classifier: Linear(8 * width, 10, bias=False), 320 parameters



def build(name: str, kwargs: dict) -> torch.nn.Module:
    from runner.model import create_model

    return create_model(name, kwargs, (1, 28, 28), 10)


def initial_weights(name: str, kwargs: dict) -> dict:
    """The weights a run starts from: the model built right after torch.manual_seed(train.seed)."""
    torch.manual_seed(0)
    return build(name, kwargs).state_dict()


def weights(run_dir: Path, step: int) -> dict:
    return load_file(run_dir / "checkpoints" / f"step_{step:08d}" / "model.safetensors")


def optimizer_state(run_dir: Path, step: int) -> dict:
    return torch.load(run_dir / "checkpoints" / f"step_{step:08d}" / "optimizer.bin", weights_only=True)


def test_frozen_backbone_and_its_batchnorm_stay_fixed_until_the_unfreeze_epoch(train_main):
    result = ok(train_main(RESNET + ["run.name=frozen", "model.freeze=backbone", "model.unfreeze_epoch=1"]))
    assert "26,268 parameters (320 train, 25,948 frozen until epoch 2)" in result.stdout, result.stdout
    run_dir = result.run_root / "frozen"
    start, epoch1, epoch2 = initial_weights("resnet9", {"width": 4}), weights(run_dir, 4), weights(run_dir, 8)
    backbone = [k for k in start if k != HEAD]
    assert any("running_mean" in k for k in backbone) and any("num_batches_tracked" in k for k in backbone)
    # Epoch 1: every backbone tensor, BatchNorm running statistics and batch counters included, is bit-equal
    # to its initial value; the head trained.
    assert [k for k in backbone if not torch.equal(epoch1[k], start[k])] == []
    assert not torch.equal(epoch1[HEAD], start[HEAD])
    # Epoch 2, unfrozen: every backbone tensor has moved.
    assert [k for k in backbone if torch.equal(epoch2[k], epoch1[k])] == []
    # The optimizer kept state for the head (group 0) only while the backbone was frozen.
    frozen_phase, unfrozen_phase = optimizer_state(run_dir, 4), optimizer_state(run_dir, 8)
    head_ids = set(frozen_phase["param_groups"][0]["params"])
    assert len(head_ids) == 1 and set(frozen_phase["state"]) == head_ids
    assert len(unfrozen_phase["state"]) == len(list(build("resnet9", {"width": 4}).parameters()))


def test_backbone_lr_factor_zero_leaves_the_backbone_weights_as_freezing_does(train_main):
    args = ["--config", "digits", *QUIET_LINES, "model.name=simple_cnn", "model.kwargs={width: 4, hidden: 16}",
            "train.epochs=1", "train.limit_train_steps=4", "optim.weight_decay=0.01"]
    result = ok(train_main(args + ["run.name=lr0", "optim.backbone_lr_factor=0"]))
    start, end = initial_weights("simple_cnn", {"width": 4, "hidden": 16}), weights(result.run_root / "lr0", 4)
    head = ["fc2.weight", "fc2.bias"]
    assert [k for k in start if k not in head and not torch.equal(end[k], start[k])] == []
    assert all(not torch.equal(end[k], start[k]) for k in head)
    frozen = ok(train_main(args + ["run.name=frozen", "model.freeze=backbone"]))
    assert "(170 train, 6,624 frozen for the whole run)" in frozen.stdout  # fc2: 16 x 10 + 10
    assert all(torch.equal(end[k], v) for k, v in weights(frozen.run_root / "frozen", 4).items())


def test_a_freeze_prefix_that_matches_no_parameter_is_one_line(train_main):
    result = train_main(["--config", "digits", *QUIET_LINES, "model.name=simple_cnn", "model.freeze=[features, fc3]",
                         "run.name=typo"])
    assert result.returncode == 2
    assert error_lines(result.stderr) == [
        "error: model.freeze: 'fc3' matches no parameter of model simple_cnn (its parameter names start with: fc1, "
        "fc2, features)"], result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (result.run_root / "typo" / "checkpoints").exists()


def test_the_classifier_head_is_found_in_builtin_timm_and_torchvision_models():
    import timm
    import torchvision

    from runner.errors import UserError
    from runner.finetune import classifier_head
    from runner.model import create_model

    builtin = {name: create_model(name, {}, (3, 32, 32), 10) for name in ("linear", "simple_cnn", "resnet9")}
    assert {n: classifier_head(m, 10, n) for n, m in builtin.items()} == {
        "linear": ["fc"], "simple_cnn": ["fc2"], "resnet9": ["net.8"]}
    assert classifier_head(timm.create_model("resnet18", pretrained=False, num_classes=10), 10, "t") == ["fc"]
    assert classifier_head(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10), 10,
                           "t") == ["head"]
    assert classifier_head(torchvision.models.resnet18(num_classes=10), 10, "tv") == ["fc"]
    assert classifier_head(torchvision.models.mobilenet_v3_small(num_classes=10), 10, "tv") == ["classifier.3"]
    assert classifier_head(torchvision.models.squeezenet1_0(num_classes=10), 10, "tv") == ["classifier.1"]  # conv
    with pytest.raises(UserError, match="cannot find the classifier head of model mine"):
        classifier_head(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 32)), 10, "mine")


def test_frozen_batchnorm_keeps_eval_mode_after_train_calls():
    from runner.finetune import Freezing

    model = build("resnet9", {"width": 4})
    Freezing(model, ["net.0"], None, 0, "resnet9").freeze()
    frozen_bn, free_bn = model.net[0][1], model.net[1][1]
    before = frozen_bn.running_mean.clone(), free_bn.running_mean.clone()
    model.train()
    model(torch.randn(4, 1, 28, 28))
    assert not frozen_bn.training and free_bn.training
    assert torch.equal(frozen_bn.running_mean, before[0]) and not torch.equal(free_bn.running_mean, before[1])
    assert not model.net[0][0].weight.requires_grad and model.net[1][0].weight.requires_grad


@pytest.mark.slow
def test_resume_in_the_frozen_and_the_unfrozen_phase_on_two_processes_is_bit_identical(tmp_path):
    """Stops at step 3 (frozen) and step 6 (after the re-wrap for DDP at epoch 2), continued each time."""
    env = clean_env(tmp_path)
    args = RESNET + ["model.freeze=backbone", "model.unfreeze_epoch=1", "train.ema_decay=0.9"]
    ok(run_train(args + ["run.name=whole"], tmp_path, launcher=torchrun(2), env=env))
    for stop in (["train.max_steps=3"], ["train.max_steps=6"], []):
        ok(run_train(args + ["run.name=parts", *stop], tmp_path, launcher=torchrun(2), env=env))
    runs = tmp_path / "runs"
    for name in ("model.safetensors", "ema.safetensors"):
        whole = load_file(runs / "whole" / "checkpoints" / "step_00000008" / name)
        parts = load_file(runs / "parts" / "checkpoints" / "step_00000008" / name)
        assert [k for k in whole if not torch.equal(whole[k], parts[k])] == [], name
    assert [k for k, v in weights(runs / "parts", 3).items() if k != HEAD and not torch.equal(
        v, initial_weights("resnet9", {"width": 4})[k])] == []
