"""The tools at their edges: predict's tab-separated output with paths that hold a TAB, a newline or `=`;
doctor's --timeout that is not a finite number, and naming the rank that is really missing at a short
timeout; sweep tasks whose names would collide."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.util import PYTHON, REPO, clean_env, error_line, free_port, ok, run_train


def tool(script: str, args: list, tmp_path: Path, cwd: Path = REPO, env: dict | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, str(REPO / "runner" / script), *map(str, args)], cwd=cwd,
                          env=env or clean_env(tmp_path), capture_output=True, text=True, timeout=timeout)


def save_image(path: Path, level: int) -> Path:
    from PIL import Image

    Image.fromarray(np.full((8, 8, 3), level, np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory) -> Path:
    """A linear model trained on a tiny folder whose two classes are dark and bright images."""
    tmp = tmp_path_factory.mktemp("predict")
    for split, n in (("train", 4), ("test", 2)):
        for label, name in enumerate(("dark", "bright")):
            (tmp / "data" / split / name).mkdir(parents=True)
            for i in range(n):
                save_image(tmp / "data" / split / name / f"{i}.png", 30 + 190 * label)
    ok(run_train(["--config", "folder", f"data.root={tmp / 'data'}", "model.name=linear", "model.kwargs={}",
                  "train.epochs=1", "train.global_batch_size=4", "log.trackers=[]", "log.plot=false",
                  "run.name=pets"], tmp), clean=True)
    return tmp / "runs" / "pets"


def test_predict_escapes_tabs_newlines_and_backslashes_in_paths(folder_run, tmp_path):
    """Before, a TAB or newline in a path split its line. Now one line per image, three TAB-separated fields,
    the path written with C escapes (\\t, \\n, \\\\) that give the name back."""
    images = tmp_path / "to_classify"
    images.mkdir()
    names = ["plain.png", "with\ttab.png", "with\nnewline.png", "back\\slash.png"]
    for name in names:
        save_image(images / name, 220)
    result = ok(tool("predict.py", ["--checkpoint", folder_run, images], tmp_path), clean=True)
    lines = result.stdout.splitlines()
    assert len(lines) == len(names), result.stdout
    read_back = []
    for line in lines:
        fields = line.split("\t")
        assert len(fields) == 3 and fields[1] in ("dark", "bright") and 0 <= float(fields[2]) <= 1, repr(line)
        read_back.append(Path(fields[0].encode().decode("unicode_escape")).name)
    assert sorted(read_back) == sorted(names)


def test_predict_reads_an_existing_file_whose_name_holds_an_equals_sign(folder_run, tmp_path):
    """`x=1.png` was refused as a config override. A file that exists is a path, relative or absolute."""
    save_image(tmp_path / "x=1.png", 220)
    for given, cwd in ((tmp_path / "x=1.png", REPO), ("x=1.png", tmp_path)):
        result = ok(tool("predict.py", ["--checkpoint", folder_run, given], tmp_path, cwd=cwd), clean=True)
        lines = result.stdout.splitlines()
        assert len(lines) == 1 and lines[0].split("\t")[0].endswith("x=1.png"), result.stdout
    line = error_line(tool("predict.py", ["--checkpoint", folder_run, "y=2.png"], tmp_path, cwd=tmp_path))
    assert "y=..." in line, line  # a `key=value` that names no file is still an override, which predict refuses


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e309"])
def test_doctor_refuses_a_timeout_that_is_not_a_finite_number(tmp_path, value):
    """Before: a traceback (OverflowError) or a false "rank 0 did not start". Now a bad flag, exit 2."""
    line = error_line(tool("doctor.py", ["--timeout", value], tmp_path))
    assert "--timeout" in line and value in line, line


def test_doctor_at_a_short_timeout_names_the_rank_that_never_started(tmp_path):
    """Rank 0 of 2 alone with --timeout 0.5, less than importing torch takes: before, rank 0 blamed itself
    ("rank 0 ... did not start"); now it still hosts the check-in, waits a moment, and names rank 1."""
    env = clean_env(tmp_path, RANK=0, WORLD_SIZE=2, LOCAL_RANK=0, LOCAL_WORLD_SIZE=2, MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=free_port())
    result = tool("doctor.py", ["--timeout", "0.5"], tmp_path, env=env, timeout=60)
    line = error_line(result, code=3)
    assert "rank 1 of world size 2 never joined" in line and "rank 0" not in line, line


def sweep_listing(tmp_path: Path, sweep: dict) -> subprocess.CompletedProcess:
    path = tmp_path / "collide.yaml"
    path.write_text(json.dumps(sweep))
    return tool("sweep.py", [path], tmp_path)


@pytest.mark.parametrize("roots", [["a b", "a_b"], ["a b", "a_b", "a_b-0"], ["x/y", "x_y", "x:y", "x y"]],
                         ids=["two", "numbered_name_taken", "four"])
def test_sweep_task_names_never_collide(tmp_path, roots):
    """Values that a run name writes alike ("a b", "a_b") were numbered `-0`, `-1`, which could meet another
    task's own name ("a_b-0"): two tasks shared a run directory. Every task now has a name of its own, and
    the same sweep listed again gives the same names."""
    sweep = {"name": "col", "config": "mnist", "fixed": {"train.epochs": 1}, "grid": {"data.root": roots}}
    listing = ok(sweep_listing(tmp_path, sweep), clean=True).stdout
    names = re.findall(r"^\s*task \d+\s+(\S+)", listing, re.M)
    assert len(names) == len(roots) and len(set(names)) == len(roots), listing
    assert re.findall(r"^\s*task \d+\s+(\S+)", ok(sweep_listing(tmp_path, sweep), clean=True).stdout, re.M) == names


def test_a_sweep_listing_the_same_set_twice_is_refused(tmp_path):
    """Two identical override sets would be the same run in one directory: refused before anything runs."""
    sweep = {"name": "dup", "config": "digits", "runs": [{"optim.lr": 0.1}, {"optim.lr": 0.1}]}
    line = error_line(sweep_listing(tmp_path, sweep))
    assert "tasks 0 and 1" in line and "optim.lr=0.1" in line, line
