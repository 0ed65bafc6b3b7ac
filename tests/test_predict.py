"""runner/predict.py: classifying image files with a trained run, as training preprocessed them.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner.data.splits import DataConfig, data_card, load_splits
from runner.predict import main as predict_main

from tests.util import error_line, folder_args


@pytest.mark.slow
def test_predict_classifies_the_training_images(train_main, command, images, tmp_path):
    trained = train_main(folder_args(images, "run.name=model"))
    assert trained.returncode == 0, trained.stderr[-3000:]
    run_dir = tmp_path / "runs" / "model"
    card = json.loads((run_dir / "data.json").read_text())  # what prediction preprocesses with
    assert card.pop("identity")["classes"] == {"cat": 32, "dog": 32, "fish": 32}  # the data's, for the fingerprint
    assert card == data_card(load_splits(DataConfig(name="folder", root=str(images)), seed=0))
    plain = command(predict_main, ["--checkpoint", run_dir, images / "train", images / "test" / "dog" / "000.png"])
    assert plain.returncode == 0, plain.stderr
    rows = [line.split("\t") for line in plain.stdout.splitlines()]
    assert len(rows) == 72 + 1 and all(len(row) == 3 for row in rows)  # notes.txt is not an image
    right = sum(Path(path).parent.name == cls for path, cls, _ in rows)
    assert right >= 0.9 * len(rows) and all(0 < float(p) <= 1 for _, _, p in rows)
    checkpoint = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    ranked = command(predict_main, ["--checkpoint", checkpoint, "--top", "2", "--json", images / "test" / "fish"])
    assert ranked.returncode == 0, ranked.stderr
    records = [json.loads(line) for line in ranked.stdout.splitlines()]
    assert len(records) == 8 and all(len(r["predictions"]) == 2 for r in records)
    for record in records:
        first, second = record["predictions"]
        assert first["class"] != second["class"] and first["probability"] >= second["probability"]
    top3 = command(predict_main, ["--checkpoint", run_dir, "--top", "5", images / "test" / "cat" / "001.jpg"])
    assert [len(line.split("\t")) for line in top3.stdout.splitlines()] == [1 + 2 * 3]  # at most the 3 classes
    for args, named in (([images / "missing.png"], "missing.png"), ([images / "train" / "cat" / "notes.txt"],
                                                                    "notes.txt")):
        line = error_line(command(predict_main, ["--checkpoint", run_dir, *args]))
        assert named in line

