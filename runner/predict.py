"""Classify image files with a trained run.

    python runner/predict.py --checkpoint PATH FILES_OR_DIRS... [--top K] [--json] [--batch-size N]
                             [--weights raw|ema]

--checkpoint takes a checkpoint directory, <run>/checkpoints/best or last, or a run directory (its best
checkpoint, else its last). --weights chooses the training weights (raw) or their moving average (ema,
the default when the run kept one: train.ema_decay > 0). Folders are searched recursively for image
files; other files in them are skipped. Prints one line per image:

    path<TAB>class<TAB>probability

with --top K the K most likely classes, each as class<TAB>probability, most likely first; with --json one
JSON object per line: {"path": ..., "predictions": [{"class": ..., "probability": ...}, ...]}.
In the tab-separated lines, a backslash, TAB, newline or carriage return in a path or class name is
written as \\\\, \\t, \\n or \\r, so every image stays one line of tab-separated fields. A file whose name
holds `=` (x=1.png) is read as a file when it exists.
Each image is preprocessed as in training, from the run's data.json: converted to its channels, resized to
its image size, normalised with its mean and std.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import this repo's packages, not runner/*.py as top level
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import json  # noqa: E402
import os  # noqa: E402

from runner.cli import Command  # noqa: E402
from runner.errors import UserError  # noqa: E402

def image_files(args: list[str]) -> list[Path]:
    """The files named, and the image files under the folders named, in order; a missing path is an error."""
    from runner.data.images import image_suffixes

    if not args:
        raise UserError("no images given: name image files or folders after --checkpoint PATH")
    suffixes, files = image_suffixes(), []
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise UserError(f"{path} holds no image files")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path} does not exist")
    return files


def load_model(checkpoint: Path, run_dir: Path, card: dict, weights: str):
    from runner.ema import load_chosen_weights
    from runner.model import build_model, load_weights
    from runner.plan import load_run_config

    cfg = load_run_config(run_dir, [])
    model = build_model(cfg.model, tuple(card["in_shape"]), len(card["class_names"]), cfg.data.name)
    return load_chosen_weights(load_weights(model, checkpoint, cfg.model.name), checkpoint, weights).eval()


def predict(model, files: list[Path], card: dict, top: int, batch_size: int):
    """Yields (path, [(class, probability), ...]) per file, most likely first."""
    import torch

    from runner.data.images import decode_image

    channels, size = card["in_shape"][0], tuple(card["in_shape"][1:])
    mean = torch.tensor(card["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(card["std"]).view(1, -1, 1, 1)
    for begin in range(0, len(files), batch_size):
        part = files[begin:begin + batch_size]
        images = torch.stack([torch.from_numpy(decode_image(f, channels, size)) for f in part])
        with torch.no_grad():
            probs = model((images.float() / 255 - mean) / std).float().softmax(1)
        values, indices = probs.topk(top, dim=1)
        for path, p, i in zip(part, values.tolist(), indices.tolist()):
            yield path, [(card["class_names"][c], q) for c, q in zip(i, p)]


TSV_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def tsv_field(text) -> str:
    """A path or class name as one field of a tab-separated line: C-style backslash escapes, so a TAB or a
    newline in a name cannot split the line."""
    return str(text).translate(TSV_ESCAPES)


def positive(options: dict, flag: str, default: int) -> int:
    text = options.get(flag, str(default))
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"{flag}={text}: expected a positive integer")
    return int(text)


def run(options: dict, overrides: list) -> int:
    from runner.checkpoint import find, run_dir_of
    from runner.data.splits import read_data_card
    from runner.ema import choose_weights

    if overrides:
        raise UserError(f"predict takes no config overrides ({overrides[0][0]}=...); the run's config.yaml is used")
    if "--checkpoint" not in options:
        raise UserError("--checkpoint PATH is required: a run directory or one of its checkpoints")
    top, batch_size = positive(options, "--top", 1), positive(options, "--batch-size", 64)
    files = image_files(options["args"])
    checkpoint = find(options["--checkpoint"])
    run_dir = run_dir_of(checkpoint)
    card = read_data_card(run_dir)
    model = load_model(checkpoint, run_dir, card, choose_weights(checkpoint, options.get("--weights")))
    top = min(top, len(card["class_names"]))
    try:
        for path, ranked in predict(model, files, card, top, batch_size):
            if options.get("--json"):
                print(json.dumps({"path": str(path),
                                  "predictions": [{"class": c, "probability": p} for c, p in ranked]}))
            else:
                print("\t".join([tsv_field(path)] + [f"{tsv_field(c)}\t{p:.4f}" for c, p in ranked]))
        sys.stdout.flush()
    except BrokenPipeError:  # the reader (head, grep -m) has had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


COMMAND = Command(__doc__, {"--checkpoint": "value", "--top": "value", "--json": "switch", "--batch-size": "value",
                            "--weights": "value"},
                  run, positional=True)


def main(argv=None) -> int:
    return COMMAND.main(argv)


if __name__ == "__main__":
    sys.exit(main())
