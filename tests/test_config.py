"""Config errors become exit code 2 and one `error:` line naming the key or file; good configs resolve."""
from __future__ import annotations

import pytest
import torch
import yaml

import models
from runner import optim as optimlib
from runner import schedule as schedulelib
from runner.data import splits as datalib


def error_line(result) -> str:
    """The single stderr line of a failed run; asserts exit 2, no traceback and nothing else on stderr."""
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def write(path, text: str):
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------- as a process

def test_cli_config_error_is_one_line_and_exit_2(cli, tmp_path):
    """The real script: exit status 2, one line, no traceback, nothing written."""
    result = cli(["--config", "digits", "optm.lr=1"])
    line = error_line(result)
    assert "optm.lr" in line and "did you mean optim.lr" in line
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------- unknown keys

@pytest.mark.parametrize("override, unknown, suggestion", [
    ("optim.lrr=0.1", "optim.lrr", "optim.lr"),          # a key inside a section
    ("optm.lr=1", "optm.lr", "optim.lr"),                # a misspelled section
    ("trian.epochs=2", "trian.epochs", "train.epochs"),
    ("train.epoch=3", "train.epoch", "train.epochs"),
    ("data.nmae=mnist", "data.nmae", "data.name"),
    ("resum=none", "resum", "resume"),                   # a top-level key
])
def test_unknown_key_suggests_the_closest(train_main, override, unknown, suggestion):
    line = error_line(train_main(["--config", "digits", override]))
    assert f"unknown config key {unknown}" in line
    assert f"did you mean {suggestion}?" in line


def test_unknown_key_without_a_close_match_lists_the_valid_keys(train_main):
    line = error_line(train_main(["--config", "digits", "optim.zzzzzzz=1"]))
    assert "optim.zzzzzzz" in line
    for key in ("optim.lr", "optim.momentum", "optim.name"):
        assert key in line


def test_unknown_key_inside_a_yaml_file(train_main, tmp_path):
    cfg = write(tmp_path / "bad.yaml", "base: digits\ntrain:\n  epochs: 2\noptim:\n  lrr: 0.1\n")
    line = error_line(train_main(["--config", cfg]))
    assert "optim.lrr" in line and "did you mean optim.lr?" in line


def test_misspelled_section_inside_a_yaml_file(train_main, tmp_path):
    cfg = write(tmp_path / "bad.yaml", "trainn:\n  epochs: 2\n")
    line = error_line(train_main(["--config", cfg]))
    assert "trainn.epochs" in line and "did you mean train.epochs?" in line


# ---------------------------------------------------------------------------------------------- types and bounds

@pytest.mark.parametrize("override, key, fragment", [
    ("train.epochs=abc", "train.epochs", "expected an integer"),
    ("train.epochs=1.5", "train.epochs", "expected an integer"),
    ("optim.lr=fast", "optim.lr", "expected a number"),
    ("data.flip=sometimes", "data.flip", "expected true or false"),
    ("train=5", "train", "expected a section"),
])
def test_wrong_type(train_main, override, key, fragment):
    line = error_line(train_main(["--config", "digits", override]))
    assert key in line and fragment in line
    assert override.split("=", 1)[1] in line  # the offending value is shown


@pytest.mark.parametrize("override, bound", [
    ("optim.lr=0", "must be > 0"),
    ("optim.lr=-0.1", "must be > 0"),
    ("train.micro_batch_size=-4", "must be >= 0"),      # 0 is allowed: global / world
    ("train.global_batch_size=-1", "must be >= 0"),
    ("train.epochs=0", "must be >= 1"),
    ("train.epochs=-1", "must be >= 1"),
])
def test_zero_or_negative_values(train_main, tmp_path, override, bound):
    result = train_main(["--config", "digits", override])
    line = error_line(result)
    assert override.split("=")[0] in line and bound in line
    assert not result.run_root.exists()


def float_keys() -> dict[str, bool]:
    """Every float setting of the root config (key -> whether it is a list of floats), found by walking its
    sections' type hints."""
    import dataclasses
    import typing

    from runner.plan import Config

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(hint):
                yield from walk(hint, f"{prefix}{f.name}.")
            elif hint is float or float in typing.get_args(hint):
                yield prefix + f.name, typing.get_origin(hint) is list
    return dict(walk(Config, ""))


def test_nan_and_infinity_are_refused_for_every_float_key(train_main):
    keys = float_keys()
    assert "optim.lr" in keys and len(keys) >= 5
    for key, is_list in keys.items():
        for text in ("nan", "inf", "-inf", ".nan", "-.inf", "1e999", "1" + "0" * 400):
            value = f"[0.5, {text}]" if is_list else text
            line = error_line(train_main(["--config", "digits", f"{key}={value}", "--print-config"]))
            assert key in line and "finite number" in line, (key, text, line)


@pytest.mark.parametrize("override", [f"train.seed={2 ** 64}", f"train.epochs={2 ** 70}",
                                      f"data.num_workers={-2 ** 63}", "train.seed=1.0e+300"])
def test_integers_beyond_64_bits_are_refused(train_main, override):
    result = train_main(["--config", "digits", override])
    line = error_line(result)
    assert override.split("=")[0] in line and "out of range" in line
    assert not result.run_root.exists()


def test_a_seed_beyond_what_torch_and_numpy_take(train_main):
    line = error_line(train_main(["--config", "digits", "train.seed=100000000000000"]))
    assert "train.seed=100000000000000" in line and "must be <=" in line


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


@pytest.mark.parametrize("key, valid", [
    ("optim.name", optimlib.NAMES),
    ("schedule.name", schedulelib.NAMES),
    ("data.name", datalib.NAMES),
    ("model.name", list(models.REGISTRY)),
])
def test_unknown_name_lists_the_valid_ones(train_main, key, valid):
    line = error_line(train_main(["--config", "digits", f"{key}=nosuchthing"]))
    assert key in line and "nosuchthing" in line
    for name in valid:
        assert name in line, (name, line)


def test_float_key_accepts_exponent_notation(train_main, tmp_path):
    """PyYAML reads `1e-3` (no dot) as a string; a float key must still take it, on the command line and in
    a file."""
    result = train_main(["--config", "digits", "optim.lr=1e-3", "optim.eps=2e-7", "--print-config"])
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["optim"]["lr"] == pytest.approx(1e-3) and isinstance(resolved["optim"]["lr"], float)
    assert resolved["optim"]["eps"] == pytest.approx(2e-7)

    cfg = write(tmp_path / "exp.yaml", "base: digits\noptim:\n  lr: 5e-4\n")
    result = train_main(["--config", cfg, "--print-config"])
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["optim"]["lr"] == pytest.approx(5e-4)


# ---------------------------------------------------------------------------------------------- config files

def test_yaml_syntax_error_reports_line_and_column(train_main, tmp_path):
    # line 4 opens a flow sequence that line 5 never closes properly
    cfg = write(tmp_path / "broken.yaml", "data:\n  name: digits\ntrain:\n  epochs: [1, 2\n  seed: 3\n")
    expected = None
    try:
        yaml.safe_load(cfg.read_text())
    except yaml.YAMLError as e:
        expected = (e.problem_mark.line + 1, e.problem_mark.column + 1)
    assert expected is not None
    line = error_line(train_main(["--config", cfg]))
    assert str(cfg) in line and "YAML syntax error" in line
    assert f"line {expected[0]}, column {expected[1]}" in line


def test_yaml_tab_indentation_reports_its_line(train_main, tmp_path):
    cfg = write(tmp_path / "tabs.yaml", "train:\n  epochs: 2\n\tseed: 3\n")
    line = error_line(train_main(["--config", cfg]))
    assert str(cfg) in line and "line 3" in line and "column" in line


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_config_file(train_main, tmp_path, text):
    cfg = write(tmp_path / "empty.yaml", text)
    line = error_line(train_main(["--config", cfg]))
    assert str(cfg) in line and "empty" in line


def test_config_file_that_is_not_a_mapping(train_main, tmp_path):
    cfg = write(tmp_path / "list.yaml", "- train\n- epochs\n")
    line = error_line(train_main(["--config", cfg]))
    assert str(cfg) in line and "mapping" in line


def test_config_path_that_does_not_exist(train_main, tmp_path):
    missing = tmp_path / "nowhere" / "cfg.yaml"
    line = error_line(train_main(["--config", missing]))
    assert str(missing) in line and "does not exist" in line


def test_unknown_preset_lists_the_presets(train_main):
    from runner.config import presets

    line = error_line(train_main(["--config", "digitz"]))
    assert "digitz" in line
    assert presets() and all(p in line for p in presets())


def test_base_chain_that_loops(train_main, tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\ntrain:\n  epochs: 2\n")
    write(tmp_path / "b.yaml", "base: a.yaml\ntrain:\n  seed: 1\n")
    line = error_line(train_main(["--config", tmp_path / "a.yaml"]))
    assert "loops" in line


def test_user_yaml_with_base_overrides_a_key(train_main, tmp_path):
    cfg = write(tmp_path / "mine.yaml", "base: digits\ntrain:\n  epochs: 3\noptim:\n  lr: 0.02\n")
    result = train_main(["--config", cfg, "--print-config", "train.seed=7"])
    assert result.returncode == 0, result.stderr
    mine = yaml.safe_load(result.stdout)
    base = yaml.safe_load(train_main(["--config", "digits", "--print-config"]).stdout)
    assert (mine["train"]["epochs"], mine["optim"]["lr"], mine["train"]["seed"]) == (3, 0.02, 7)
    assert base["train"]["epochs"] != 3 and base["optim"]["lr"] != 0.02
    # everything not overridden comes from the base preset
    for section in ("data", "model", "schedule", "eval", "log"):
        assert mine[section] == base[section], section
    assert mine["optim"]["momentum"] == base["optim"]["momentum"]


def test_user_yaml_with_base_trains(train_main, tmp_path):
    """A user file on top of a preset runs, and the run directory is named after the file."""
    cfg = write(tmp_path / "quick.yaml", "base: digits\ntrain:\n  epochs: 1\n  limit_train_steps: 3\n"
                                         "log:\n  trackers: []\n  plot: false\n")
    result = train_main(["--config", cfg])
    assert result.returncode == 0, result.stderr
    saved = yaml.safe_load((result.run_root / "quick" / "config.yaml").read_text())
    assert saved["train"]["limit_train_steps"] == 3 and saved["data"]["name"] == "digits"


# ---------------------------------------------------------------------------------------------- --print-config

def test_print_config_prints_resolved_yaml_and_exits_0(train_main, tmp_path):
    result = train_main(["--config", "mnist_cnn", "--print-config", "train.epochs=7", "optim.lr=0.003"])
    assert result.returncode == 0 and result.stderr == ""
    resolved = yaml.safe_load(result.stdout)
    assert resolved["train"]["epochs"] == 7 and resolved["optim"]["lr"] == 0.003
    assert resolved["optim"]["name"] == "adam" and resolved["model"]["name"] == "simple_cnn"  # from the preset
    assert resolved["train"]["global_batch_size"] == 64 and resolved["model"]["kwargs"] == {"dropout": 0.25}
    from runner.train import Config
    from runner.config import all_keys, flatten

    assert set(flatten(resolved)) == set(all_keys(Config))  # every key, resolved
    assert not result.run_root.exists()

    # The printed config is itself a valid config file that resolves to the same thing.
    again = write(tmp_path / "printed.yaml", result.stdout)
    second = train_main(["--config", again, "--print-config"])
    assert second.returncode == 0 and second.stdout == result.stdout


def test_print_config_still_checks_the_config(train_main):
    line = error_line(train_main(["--config", "digits", "--print-config", "optim.lr=-1"]))
    assert "optim.lr" in line


# ---------------------------------------------------------------------------------------------- batch sizes

def test_global_batch_that_does_not_divide(train_main):
    result = train_main(["--config", "digits", "train.global_batch_size=100", "train.micro_batch_size=32"])
    line = error_line(result)
    assert "train.global_batch_size=100" in line and "train.micro_batch_size=32" in line
    lower = 100 // 32 * 32
    assert f"{lower} or {lower + 32}" in line  # the nearest valid global batches: 96 or 128
    divisors = [m for m in range(1, 101) if 100 % m == 0]
    assert str(divisors[-4:]) in line          # micro batches that do divide 100
    assert not result.run_root.exists()


def test_accumulation_that_contradicts_the_global_batch(train_main):
    line = error_line(train_main(["--config", "digits", "train.global_batch_size=64",
                                  "train.micro_batch_size=16", "train.gradient_accumulation_steps=2"]))
    assert "train.gradient_accumulation_steps=2" in line and "4" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is only refused on a host without CUDA")
def test_fp16_refused_without_a_gpu(train_main):
    result = train_main(["--config", "digits", "train.mixed_precision=fp16"])
    line = error_line(result)
    assert "train.mixed_precision=fp16" in line and "bf16" in line
    assert not result.run_root.exists()


def test_bad_input_does_not_damage_an_existing_run(train_main, tmp_path):
    """A mistake on the command line leaves an earlier run's files exactly as they were."""
    run_dir = tmp_path / "runs" / "digits"
    run_dir.mkdir(parents=True)
    files = {"config.yaml": "train: {epochs: 1}\n", "metrics.jsonl": '{"step": 1}\n', "summary.json": "{}"}
    for name, text in files.items():
        (run_dir / name).write_text(text)
    for bad in (["optim.lr=0"], ["train.global_batch_size=100", "train.micro_batch_size=32"],
                ["model.kwargs={in_features: 100}"]):
        error_line(train_main(["--config", "digits", *bad]))
        assert sorted(p.name for p in run_dir.iterdir()) == sorted(files)
        for name, text in files.items():
            assert (run_dir / name).read_text() == text


def test_yaml_words_stay_strings_for_string_keys(train_main, tmp_path):
    """YAML 1.1 reads `no` as false and `007` as 7; string keys must keep what the user typed."""
    from runner import config as configlib
    from runner.train import Config

    cfg = configlib.load(Config, "digits", [("train.mixed_precision", "no"), ("run.name", "007"),
                                            ("model.kwargs.in_features", "784")])
    assert cfg.train.mixed_precision == "no" and cfg.run.name == "007"
    assert cfg.model.kwargs["in_features"] == 784
    f = tmp_path / "c.yaml"
    f.write_text("base: digits\ntrain:\n  mixed_precision: no\n")
    assert configlib.load(Config, str(f), []).train.mixed_precision == "no"


def test_the_config_check_knows_every_built_in_model():
    """models.REGISTRY names the built-in models without importing torch; every name must pass the config
    check and stand for a model class."""
    from torch import nn

    from runner.model import ModelConfig, model_builder

    for name in models.REGISTRY:
        ModelConfig(name=name).validate()
        assert issubclass(model_builder(name), nn.Module), name
