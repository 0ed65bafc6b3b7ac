"""Models (runner/model.py, models/): user models from the current directory and PYTHONPATH, model names
and kwargs that are refused, a model that does not fit the data, and FLOP counting.
"""
from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

import models
from runner.model import ModelConfig, create_model, flops_per_sample, model_builder

from tests.util import (BIN, DIGITS, PYTHON, QUIET, REPO, clean_env, error_line, ok, one_error_line, read_jsonl,
                        run_train, summary)


MYNET = '''
from torch import nn


class MyNet(nn.Module):
    def __init__(self, in_shape, num_classes, width=8):
        super().__init__()
        c, h, w = in_shape
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, width), nn.ReLU(), nn.Linear(width, num_classes))

    def forward(self, x):
        return self.net(x)
'''


@pytest.fixture
def user_dir(tmp_path) -> Path:
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "mynet.py").write_text(MYNET)
    return folder


USER_RUN = DIGITS + ["model.name=mynet:MyNet", "train.epochs=1", "train.limit_train_steps=2"]


USER_MODEL = """
import json, os
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, in_shape, num_classes, hidden=8):
        super().__init__()
        with open(os.environ["TINYNET_LOG"], "a") as f:
            f.write(json.dumps({"in_shape": list(in_shape), "num_classes": num_classes, "hidden": hidden}) + "\\n")
        c, h, w = in_shape
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.net(x)
"""


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["script", "console script"])
def test_user_model_imports_from_the_current_directory(user_dir, tmp_path, entry):
    program = [PYTHON, str(REPO / "runner/train.py")] if entry == "script" else [str(BIN / "runner-train")]
    result = subprocess.run(program + USER_RUN + ["run.name=mine", f"run.root={tmp_path / 'runs'}"], cwd=user_dir,
                            env=clean_env(tmp_path), capture_output=True, text=True, timeout=300)
    ok(result)
    saved = yaml.safe_load((tmp_path / "runs" / "mine" / "config.yaml").read_text())
    assert saved["model"]["kwargs"] == {}, "the preset's model.kwargs must not reach another model"


def test_unknown_user_model_kwargs_are_refused_in_one_line(user_dir, train_main, monkeypatch):
    monkeypatch.chdir(user_dir)
    refused = train_main(USER_RUN + ["model.kwargs={depth: 3}", "run.name=mine"])
    assert refused.returncode == 2
    assert "depth" in one_error_line(refused.stderr)


def test_user_model_from_pythonpath(tmp_path):
    package = tmp_path / "usercode" / "mymodels"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "tiny.py").write_text(USER_MODEL)
    log = tmp_path / "constructed.jsonl"
    env = clean_env(tmp_path, PYTHONPATH=tmp_path / "usercode", TINYNET_LOG=log)
    hidden = 12
    result = ok(run_train(["--config", "digits", "model.name=mymodels.tiny:TinyNet",
                           f"model.kwargs={{hidden: {hidden}}}", "train.epochs=1", "train.limit_train_steps=3",
                           *QUIET], tmp_path, env=env))
    built = read_jsonl(log)
    assert built and all(b == {"in_shape": [1, 28, 28], "num_classes": 10, "hidden": hidden} for b in built)
    parameters = 784 * hidden + hidden + hidden * 10 + 10
    assert f"model mymodels.tiny:TinyNet: {parameters:,} parameters" in result.stdout
    s = summary(tmp_path / "runs" / "digits")
    assert s["steps"] == 3 and math.isfinite(s["final"]["test"]["loss"])


@pytest.mark.parametrize("name", [":X", ".foo:X", "models.linear:", "a/b:X", "models..linear:X"])
def test_a_malformed_user_model_name(train_main, name):
    result = train_main(["--config", "digits", f"model.name={name}"])
    line = error_line(result)
    assert f"model.name={name!r}" in line and "package.module:Class" in line
    assert not [p for p in result.run_root.rglob("*") if p.is_file()]  # nothing written


@pytest.mark.parametrize("kwargs, says", [("{in_features: -5}", "negative dimension"),
                                          ("{dropout: 1.5}", "dropout probability")])
def test_a_model_that_refuses_its_kwargs(train_main, kwargs, says):
    """A constructor that raises RuntimeError or ValueError on bad sizes: one line naming model.kwargs."""
    model = "linear" if "in_features" in kwargs else "simple_cnn"
    line = error_line(train_main(["--config", "digits", f"model.name={model}", f"model.kwargs={kwargs}"]))
    assert "model.kwargs=" in line and says in line


def test_the_config_check_knows_every_built_in_model():
    """models.REGISTRY names the built-in models without importing torch; every name must pass the config
    check and stand for a model class."""
    from torch import nn

    for name in models.REGISTRY:
        ModelConfig(name=name).validate()
        assert issubclass(model_builder(name), nn.Module), name


@pytest.mark.parametrize("args, fragments", [
    (["--config", "mnist", "data.name=cifar10"], ["linear", "cifar10", "3x32x32"]),
    (["--config", "digits", "model.kwargs={in_features: 3072}"], ["linear", "digits", "1x28x28"]),
])
def test_images_that_do_not_fit_the_model_fail_before_training(train_main, cifar_root, args, fragments):
    """E.g. CIFAR's 3x32x32 into the 784-input linear net: one line before any step, no run directory."""
    root = [f"data.root={cifar_root}"] if "data.name=cifar10" in args else []  # digits reads no data.root
    result = train_main(args + root + QUIET)
    line = error_line(result)
    assert all(f in line for f in fragments), line
    assert "step" not in result.stdout
    assert not (result.run_root / args[1]).exists()


@pytest.mark.parametrize("name, shape", [("linear", (1, 28, 28)), ("simple_cnn", (3, 32, 32)),
                                         ("resnet9", (3, 32, 32))])
def test_flop_count_matches_torchs_flop_counter(name, shape):
    """The header's FLOPs come from hooks (fast start-up); they must equal FlopCounterMode's count."""
    from torch.utils.flop_counter import FlopCounterMode

    model = create_model(name, {}, shape, 10)
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(2, *shape)).sum().backward()
    assert flops_per_sample(model, shape) == counter.get_total_flops() / 2

