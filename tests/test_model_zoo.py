"""The zoo of the field: timm and torchvision models by name, factory functions, starting from weights (a
file, another run, the libraries' pretrained weights), preprocessing that follows the model, and the
one-line refusals. Weights are made locally; nothing is downloaded (HF_HUB_OFFLINE=1, caches under tmp)."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests import sample_files
from tests.util import QUIET
from tests.dist_helpers import final_checkpoint, read_weights
from tests.util import error_line
from tests.util import clean_env, read_jsonl, run_train, summary, torchrun

SHORT = QUIET + ["train.epochs=1", "train.global_batch_size=12", "data.val_fraction=0", "train.seed=3"]


class WrappedResNet18(nn.Module):
    """torchvision's ResNet-18 in a user's class, for grey images: at 28x28 its last feature map is 1x1."""

    def __init__(self, in_shape, num_classes):
        super().__init__()
        from torchvision.models import resnet18

        self.net = resnet18(num_classes=num_classes)
        self.net.conv1 = nn.Conv2d(in_shape[0], 64, 7, 2, 3, bias=False)

    def forward(self, x):
        return self.net(x)


def write_images(root: Path, classes: list[str], n_train: int = 8, n_test: int = 4, size=(16, 16)) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for label, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(sample_files.class_image(rng, label, size)).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """3 classes of 16x16 colour PNGs, 8 train and 4 test each."""
    return write_images(tmp_path_factory.mktemp("zoo_images"), sample_files.CLASSES)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Library caches under tmp and no downloads. huggingface_hub reads HF_HOME and HF_HUB_OFFLINE once, at
    import, so an in-process run gets them as its constants."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path


def folder_args(root: Path, tmp_path: Path, *more: str) -> list[str]:
    return ["--config", "folder", f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", *SHORT, *more]


def run_dir_of(result, name: str) -> Path:
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    return result.run_root / name


@pytest.mark.parametrize("model", ["timm:test_resnet", "torchvision:mobilenet_v3_small", "torchvision.models:resnet18"])
def test_library_models_and_factory_functions_train_one_epoch(train_main, images, offline, model):
    result = train_main(folder_args(images, offline, f"model.name={model}", "run.name=zoo", "checkpoint.every_epochs=0"))
    run = run_dir_of(result, "zoo")
    assert summary(run)["stopped"] == "completed" and summary(run)["epochs_completed"] == 1
    assert f"model {model}:" in result.stdout


def test_a_resnet18_wrapped_in_a_class_trains_at_28x28(train_main):
    """FLOPs are counted in eval mode on two samples: a batch of one in train mode made BatchNorm refuse the
    1x1 feature map (a traceback, exit 1)."""
    result = train_main(["--config", "digits", "model.name=tests.test_model_zoo:WrappedResNet18",
                         "train.fast_dev_run=1", "eval.batch_size=64", *QUIET])
    assert result.returncode == 0, result.stderr[-3000:]
    flops = float(result.stdout.split(" MFLOP/sample")[0].rsplit(" ", 1)[1])
    assert flops > 0


def source_run(train_main, root: Path, tmp_path: Path, model: str, name: str = "source") -> Path:
    return run_dir_of(train_main(folder_args(root, tmp_path, f"model.name={model}", f"run.name={name}")), name)


def test_fine_tuning_for_another_class_count_reinitialises_exactly_the_head(train_main, images, offline):
    from runner.model import ModelConfig, build_model

    source = source_run(train_main, images, offline, "timm:test_resnet")
    two = write_images(offline / "two", ["bird", "frog"])
    result = train_main(folder_args(two, offline, "model.name=timm:test_resnet", f"model.weights={source}",
                                    "run.name=target"))
    run_dir_of(result, "target")
    said = [line for line in result.stdout.splitlines() if "re-initialised" in line]
    assert said == [f"model.weights={source}: classifier head fc re-initialised for 2 classes (the weights have 3)"]
    # The weights the run starts from, built by the same code: all but the head are the source's.
    lines = []
    model = build_model(ModelConfig(name="timm:test_resnet", weights=str(source)), (3, 16, 16), 2, "folder",
                        initial_weights=True, log=lines.append)
    started, ended = model.state_dict(), read_weights(source / "checkpoints" / "last")
    assert set(started) == set(ended)
    differing = sorted(k for k in started if started[k].shape != ended[k].shape or not torch.equal(started[k],
                                                                                                   ended[k]))
    assert differing == ["fc.bias", "fc.weight"] and started["fc.weight"].shape == (2, 96)


def last_eval(run: Path, first: bool = False) -> dict:
    events = [e for e in read_jsonl(run / "metrics.jsonl") if e["split"] == "test"]
    return events[0 if first else -1]["metrics"]


def test_same_class_count_and_a_tiny_lr_starts_where_the_source_ended(train_main, images, offline):
    source = source_run(train_main, images, offline, "simple_cnn")
    result = train_main(folder_args(images, offline, "model.name=simple_cnn", "optim.lr=1e-12",
                                    f"model.weights={source / 'checkpoints' / 'last'}", "run.name=target"))
    target = run_dir_of(result, "target")
    assert "re-initialised" not in result.stdout
    before, after = last_eval(source), last_eval(target, first=True)
    assert after["accuracy"] == before["accuracy"]
    assert after["loss"] == pytest.approx(before["loss"], rel=1e-5)
    scratch = run_dir_of(train_main(folder_args(images, offline, "model.name=simple_cnn", "optim.lr=1e-12",
                                                "run.name=scratch")), "scratch")
    assert last_eval(scratch, first=True)["loss"] != pytest.approx(before["loss"], rel=1e-3)  # the weights matter


def plant_pickle(path: Path, marker: Path) -> Path:
    class Plant:
        def __reduce__(self):
            return open, (str(marker), "w")

    path.write_bytes(pickle.dumps({"fc.weight": Plant()}))
    return path


@pytest.mark.parametrize("case, says", [
    ("wrong_keys", "does not fit the model (missing: conv1.0.weight"),
    ("missing", "model.weights='{tmp}/nothing.safetensors' does not exist"),
    ("pickle", "loads with weights_only=True; nothing in it was run"),
    ("shape", "model timm:test_convnext does not accept folder images of shape 3x16x16 (Calculated padded"),
])
def test_bad_start_weights_or_model_is_one_line_and_writes_nothing(train_main, images, offline, case, says):
    from safetensors.torch import save_file

    marker = offline / "pickle_ran"
    weights = {"wrong_keys": offline / "cnn.safetensors", "missing": offline / "nothing.safetensors",
               "pickle": plant_pickle(offline / "planted.pt", marker), "shape": None}[case]
    if case == "wrong_keys":
        save_file(nn.Linear(4, 3).state_dict(), str(weights))
    model = "timm:test_convnext" if case == "shape" else "timm:test_resnet"
    extra = [f"model.weights={weights}"] if weights else []
    result = train_main(folder_args(images, offline, f"model.name={model}", *extra))
    assert says.format(tmp=offline) in error_line(result)
    assert not marker.exists()
    assert not result.run_root.exists()


def plant_hf_cache(hf_home: Path, repo: str, state: dict) -> None:
    """A Hugging Face hub cache entry as a download leaves it: refs/main naming a snapshot."""
    from safetensors.torch import save_file

    entry, revision = hf_home / "hub" / f"models--{repo.replace('/', '--')}", "0" * 40
    (entry / "snapshots" / revision).mkdir(parents=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(revision)
    save_file(state, str(entry / "snapshots" / revision / "model.safetensors"))


def test_timm_pretrained_weights_set_the_preprocessing(train_main, images, offline):
    """timm's test_resnet was trained at 160x160 with mean = std = 0.5: the run resizes to that and records it;
    evaluate.py then preprocesses as training did. Without the cached file, one line names it."""
    import timm

    from runner.evaluate import main as evaluate_main

    args = folder_args(images, offline, "model.name=timm:test_resnet", "model.pretrained=true", "run.name=tp")
    assert "models--timm--test_resnet.r160_in1k" in error_line(train_main(args))
    assert not (offline / "runs").exists()
    torch.manual_seed(0)
    plant_hf_cache(offline / "hf_home", "timm/test_resnet.r160_in1k", timm.create_model("test_resnet").state_dict())
    done = train_main(args)
    run = run_dir_of(done, "tp")
    assert "classifier head fc re-initialised for 3 classes (the weights have 1000)" in done.stdout
    card = json.loads((run / "data.json").read_text())
    assert card["in_shape"] == [3, 160, 160] and card["mean"] == [0.5] * 3 and card["std"] == [0.5] * 3
    assert evaluate_main(["--checkpoint", str(run)]) == 0
    evaluated = json.loads((run / f"eval-{final_checkpoint(run).name}-test.json").read_text())["metrics"]
    assert evaluated["loss"] == pytest.approx(summary(run)["final"]["test"]["loss"], rel=1e-5)


def test_torchvision_pretrained_weights_from_its_cache(train_main, images, offline):
    """torchvision's file in torch hub's cache is used (here one made locally); data.image_size set by the user
    wins over the weights' 224, their mean and std are kept."""
    from torchvision.models import resnet18

    torch.manual_seed(0)
    planted = resnet18().state_dict()
    (offline / "torch_home" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(planted, offline / "torch_home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    result = train_main(folder_args(images, offline, "model.name=torchvision:resnet18", "model.pretrained=true",
                                    "data.image_size=24", "optim.lr=1e-12", "run.name=tv"))
    run = run_dir_of(result, "tv")
    assert "torchvision:resnet18 pretrained weights: classifier head fc re-initialised for 3 classes" in result.stdout
    card = json.loads((run / "data.json").read_text())
    assert card["in_shape"] == [3, 24, 24] and card["mean"] == pytest.approx([0.485, 0.456, 0.406])
    ended = read_weights(final_checkpoint(run))
    assert torch.allclose(ended["layer4.1.conv2.weight"], planted["layer4.1.conv2.weight"], atol=1e-6)


def test_a_scalar_image_size_resizes_on_both_data_paths_alike(train_main):
    """digits (28x28) at data.image_size=20: a square, resized on the device path and in the DataLoader path."""
    ends = {}
    for loader in ("device", "torchvision"):
        result = train_main(["--config", "digits", "data.image_size=20", f"data.loader={loader}", "model.kwargs={}",
                             "train.max_steps=5", f"run.name={loader}", *QUIET])
        run = run_dir_of(result, loader)
        assert json.loads((run / "data.json").read_text())["in_shape"] == [1, 20, 20]
        ends[loader] = read_weights(final_checkpoint(run))
    assert ends["device"]["fc.weight"].shape == (10, 400)
    assert torch.allclose(ends["device"]["fc.weight"], ends["torchvision"]["fc.weight"], atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("model", [
    # LayerNorm, no BatchNorm
    ["model.name=timm:test_vit", "model.kwargs={img_size: 16, patch_size: 4}"],
    # No BatchNorm (per-rank statistics differ by design), no dropout (per-rank draws); resized to fit its pools
    ["model.name=torchvision:squeezenet1_1", "model.kwargs={dropout: 0.0}", "data.image_size=32"],
], ids=["timm", "torchvision"])
def test_a_library_model_ends_the_same_on_one_and_two_processes(images, tmp_path, model):
    """A timm and a torchvision model under torchrun: the same weights as one process."""
    args = folder_args(images, tmp_path, *model, "optim.name=sgd", "optim.lr=0.05")
    env = clean_env(tmp_path, HF_HUB_OFFLINE=1)
    for name, launcher in (("one", None), ("two", torchrun(2))):
        done = run_train(args + [f"run.name={name}"], tmp_path, launcher=launcher, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (read_weights(final_checkpoint(tmp_path / "runs" / n)) for n in ("one", "two"))
    assert summary(tmp_path / "runs" / "two")["world_size"] == 2
    # SGD: an attention key bias gets a gradient of pure rounding noise (softmax ignores it), which Adam scales
    # up to full steps (3e-4 apart measured); with SGD the comparison is about the run, not that noise.
    for key in one:
        difference = ((one[key] - two[key]).norm() / one[key].norm()).item()
        assert difference < 1e-4, (key, difference)


def test_a_changed_weights_file_is_another_experiment(train_main, tmp_path):
    """The weights file's sha256 is in the fingerprint (recorded as model.weights_sha256): the same config over
    a changed file gets a new run directory; over the same file, the finished run is found and left alone."""
    from safetensors.torch import save_file

    from models.linear import LinearClassifier

    weights = tmp_path / "start.safetensors"
    args = ["--config", "digits", f"model.weights={weights}", "train.max_steps=2", *QUIET]
    names = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        save_file(LinearClassifier().state_dict(), str(weights))
        result = train_main(args)
        assert result.returncode == 0, result.stderr[-3000:]
        names.append(sorted(p.name for p in result.run_root.iterdir()))
    assert names == [["digits"], ["digits"], ["digits", "digits-2"]]
    assert "has already finished" in train_main(args).stdout
    recorded = (result.run_root / "digits-2" / "config.yaml").read_text()
    from runner.checkpoint import sha256

    assert f"weights_sha256: {sha256(weights)}" in recorded


@pytest.mark.parametrize("overrides, says", [
    (["model.name=simple_cnn", "model.pretrained=true"], "model.pretrained=true needs a timm:<name> or torchvision"),
    (["model.name=timm:test_resnet", "model.pretrained=true", "model.weights=w.safetensors"],
     "model.pretrained=true and model.weights are both set"),
    (["model.name=timm:no_such_net"], "timm has no model no_such_net"),
    (["model.name=torchvision:resnet18"], "set data.channels=3"),
])
def test_pretrained_and_names_that_cannot_work_are_one_line(train_main, overrides, says):
    """Config errors, an unknown timm name, and a torchvision model on grey digits (it says which key to set)."""
    result = train_main(["--config", "digits", *overrides, *QUIET])
    assert says in error_line(result)
    assert not result.run_root.exists()
