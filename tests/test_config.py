"""The config (runner/config.py and each section's checks): presets, YAML files and overrides, and every
way a config can be wrong, each ending in one `error:` line and exit 2 before anything starts. Config
files are untrusted too: devices, FIFOs, directories, duplicate keys, aliases that expand without end,
nesting past any sane depth, values that cannot convert, megabyte-long values.
"""
from __future__ import annotations

import subprocess

import pytest
import torch
import yaml

import models
from runner import config as configlib, optim as optimlib, schedule as schedulelib
from runner.data import splits as datalib
from runner.config import all_keys, flatten, presets
from runner.plan import Config

from tests.util import PYTHON, REPO, clean_env, error_line, make_unreadable, write


def float_keys() -> dict[str, bool]:
    """Every float setting of the root config (key -> whether it is a list of floats), found by walking its
    sections' type hints."""
    import dataclasses
    import typing

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(hint):
                yield from walk(hint, f"{prefix}{f.name}.")
            elif hint is float or float in typing.get_args(hint):
                yield prefix + f.name, typing.get_origin(hint) is list
    return dict(walk(Config, ""))


def billion_laughs(levels: int = 9) -> str:
    """A flow-style YAML list whose aliases expand to 10**levels values while the text stays short."""
    items = ["&a0 [" + ", ".join(["lol"] * 10) + "]"]
    items += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "[" + ", ".join(items) + "]"


@pytest.mark.parametrize("preset", configlib.presets())
def test_every_preset_pins_the_global_batch_and_holds_out_val(preset):
    cfg = configlib.load(Config, preset, [])
    assert cfg.train.global_batch_size > 0, f"{preset} does not pin train.global_batch_size"
    assert cfg.train.micro_batch_size == 0, f"{preset} pins the micro batch: it would change with the world"
    assert cfg.train.gradient_accumulation_steps == 0
    assert cfg.data.val_fraction > 0, f"{preset} holds out no validation split"


@pytest.mark.parametrize("kind, says", [("directory", "is a directory"), ("fifo", "named pipe"),
                                        ("endless device", "character device"), ("io error", "cannot read")])
def test_a_config_path_that_is_not_a_file(train_main, tmp_path, kind, says):
    path = tmp_path / "cfg.yaml"
    make_unreadable(path, kind)
    result = train_main(["--config", path])
    line = error_line(result)
    assert str(path) in line and says in line and "does not exist" not in line
    assert not result.run_root.exists()


def test_config_dev_null(train_main):
    line = error_line(train_main(["--config", "/dev/null"]))
    assert "/dev/null" in line and "character device" in line and "does not exist" not in line


def test_a_folder_named_like_a_preset_does_not_hide_it(train_main, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits").mkdir()
    result = train_main(["--config", "digits", "--print-config"])
    assert result.returncode == 0 and "name: digits" in result.stdout


def test_a_config_file_that_is_not_utf8(train_main, tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("run:\n  name: caf\u00e9\n".encode("latin-1"))
    line = error_line(train_main(["--config", path]))
    assert str(path) in line and "UTF-8" in line


def test_a_huge_config_file(train_main, tmp_path):
    path = write(tmp_path / "huge.yaml", "base: digits\n" + "# padding\n" * 200_000)
    line = error_line(train_main(["--config", path]))
    assert str(path) in line and "at most" in line


def test_a_key_given_twice(train_main, tmp_path):
    path = write(tmp_path / "twice.yaml", "base: digits\noptim:\n  lr: 0.1\n  momentum: 0.5\n  lr: 0.2\n")
    line = error_line(train_main(["--config", path]))
    assert str(path) in line and "'lr' appears twice" in line and "lines 3 and 5" in line
    line = error_line(train_main(["--config", "digits", "model.kwargs={width: 4, width: 8}"]))
    assert "model.kwargs" in line and "'width' appears twice" in line


def test_a_merge_key_is_not_a_duplicate(train_main, tmp_path):
    """YAML's `<<:` merge may be overridden key by key: that is not a key given twice."""
    path = write(tmp_path / "merge.yaml", "base: digits\noptim:\n  <<: {lr: 0.1, momentum: 0.5}\n  lr: 0.2\n")
    result = train_main(["--config", path, "--print-config"])
    assert result.returncode == 0, result.stderr
    optim = yaml.safe_load(result.stdout)["optim"]
    assert (optim["lr"], optim["momentum"]) == (0.2, 0.5)


@pytest.mark.parametrize("where", ["file", "override"])
def test_aliases_that_expand_without_end(train_main, tmp_path, where):
    """A "billion laughs" value: refused quickly, in one short line, whatever key it was given for."""
    if where == "file":
        path = write(tmp_path / "laughs.yaml", f"base: digits\nmodel:\n  kwargs: {{x: {billion_laughs()}}}\n")
        args = ["--config", path, "--print-config"]
    else:
        args = ["--config", "digits", f"data.synthetic_shape={billion_laughs()}"]
    line = error_line(train_main(args))
    assert "100,000 values" in line and len(line) < 600


@pytest.mark.parametrize("text", ["model:\n  kwargs: &k {x: *k}\n", "data:\n  synthetic_shape: &s [1, *s]\n",
                                  "data:\n  synthetic_shape: " + "[" * 3000 + "]" * 3000 + "\n",
                                  "data:\n  synthetic_shape: " + "[" * 40 + "]" * 40 + "\n"])
def test_a_value_nested_too_deep_or_inside_itself(train_main, tmp_path, text):
    path = write(tmp_path / "deep.yaml", "base: digits\n" + text)
    line = error_line(train_main(["--config", path, "--print-config"]))
    assert str(path) in line and "nests deeper than" in line


@pytest.mark.parametrize("text, says", [("run:\n  name: 2024-13-45\n", "month"),
                                        ("train:\n  seed: " + "9" * 5000 + "\n", "4300 digits")])
def test_a_value_yaml_cannot_convert(train_main, tmp_path, text, says):
    path = write(tmp_path / "values.yaml", "base: digits\n" + text)
    line = error_line(train_main(["--config", path]))
    assert str(path) in line and says in line and len(line) < 600


def test_long_values_are_cut_in_the_error_line(train_main):
    line = error_line(train_main(["--config", "digits", "data.name=" + "x" * 100_000]))
    assert "data.name=" in line and len(line) < 600


def test_a_section_check_that_echoes_a_long_value_stays_short(train_main):
    """data.synthetic_shape is checked by its section, which echoes the list: the line keeps both ends."""
    line = error_line(train_main(["--config", "digits", "data.synthetic_shape=[" + "1, " * 20_000 + "1]"]))
    assert line.startswith("error: data.synthetic_shape=") and "[channels, height, width]" in line
    assert len(line) < 1100


def test_a_key_with_a_newline_stays_on_one_line(train_main, tmp_path):
    path = write(tmp_path / "newline.yaml", 'base: digits\n"optim\\nlr": 1\n')
    line = error_line(train_main(["--config", path]))
    assert "optim\\nlr" in line


def test_help_print_config_and_config_errors_need_no_torch(tmp_path):
    """Answered in the time Python and PyYAML take to start: torch is not imported on these paths."""
    bad = write(tmp_path / "twice.yaml", "train:\n  seed: 1\n  seed: 2\n")
    script = ("import sys; from runner.train import main\n"
              f"codes = [main(a) for a in ([\"--help\"], [\"--print-config\"], [\"optim.lr=nan\"], "
              f"[\"--config\", {str(bad)!r}], [\"--config\", \"/dev/null\"])]\n"
              "print(codes, 'torch' in sys.modules)")
    result = subprocess.run([PYTHON, "-c", script], cwd=REPO, env=clean_env(tmp_path), capture_output=True,
                            text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "[0, 0, 2, 2, 2] False", result.stderr


def test_a_file_in_the_working_directory_does_not_shadow_a_library(tmp_path):
    """A stray yaml.py where the user happens to stand must not run in place of PyYAML."""
    marker = tmp_path / "code_ran"
    (tmp_path / "yaml.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    result = subprocess.run([PYTHON, str(REPO / "runner/train.py"), "--config", "digits", "--print-config"],
                            cwd=tmp_path, env=clean_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert not marker.exists() and result.returncode == 0, result.stderr[-2000:]


def test_cli_config_error_is_one_line_and_exit_2(cli, tmp_path):
    """The real script: exit status 2, one line, no traceback, nothing written."""
    result = cli(["--config", "digits", "optm.lr=1"])
    line = error_line(result)
    assert "optm.lr" in line and "did you mean optim.lr" in line
    assert not (tmp_path / "runs").exists()


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


def test_print_config_prints_resolved_yaml_and_exits_0(train_main, tmp_path):
    result = train_main(["--config", "mnist_cnn", "--print-config", "train.epochs=7", "optim.lr=0.003"])
    assert result.returncode == 0 and result.stderr == ""
    resolved = yaml.safe_load(result.stdout)
    assert resolved["train"]["epochs"] == 7 and resolved["optim"]["lr"] == 0.003
    assert resolved["optim"]["name"] == "adam" and resolved["model"]["name"] == "simple_cnn"  # from the preset
    assert resolved["train"]["global_batch_size"] == 64 and resolved["model"]["kwargs"] == {"dropout": 0.25}

    assert set(flatten(resolved)) == set(all_keys(Config))  # every key, resolved
    assert not result.run_root.exists()

    # The printed config is itself a valid config file that resolves to the same thing.
    again = write(tmp_path / "printed.yaml", result.stdout)
    second = train_main(["--config", again, "--print-config"])
    assert second.returncode == 0 and second.stdout == result.stdout


def test_print_config_still_checks_the_config(train_main):
    line = error_line(train_main(["--config", "digits", "--print-config", "optim.lr=-1"]))
    assert "optim.lr" in line


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
    cfg = configlib.load(Config, "digits", [("train.mixed_precision", "no"), ("run.name", "007"),
                                            ("model.kwargs.in_features", "784")])
    assert cfg.train.mixed_precision == "no" and cfg.run.name == "007"
    assert cfg.model.kwargs["in_features"] == 784
    f = tmp_path / "c.yaml"
    f.write_text("base: digits\ntrain:\n  mixed_precision: no\n")
    assert configlib.load(Config, str(f), []).train.mixed_precision == "no"

