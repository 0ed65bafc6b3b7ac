"""Evaluate a checkpoint: the same exactly-reduced metrics as training, plus a confusion matrix.

    python runner/evaluate.py --checkpoint runs/<name>/checkpoints/step_N [--split test] [section.key=value ...]
    accelerate launch --multi_gpu --num_processes 2 runner/evaluate.py --checkpoint ...

The config is the run's own config.yaml (next to its checkpoints), with any overrides applied on top
(`data.root=...` for data that moved). Results go to stdout and to `<run>/eval-<checkpoint>-<split>.json`.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import this repo's packages, not runner/*.py as top level
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import json
import traceback

from safetensors.torch import load_model

from runner import config as configlib
from runner.checkpoint import CheckpointError, read_manifest, verify
from runner.data import TrainOrder, load_splits, make_batches
from runner.distributed import check_launcher_precision, make_accelerator
from runner.errors import EXIT_USER_ERROR, UserError
from runner.metrics import Evaluator
from runner.model import build_model
from runner.rundir import check_fingerprint, fingerprint
from runner.train import Config, evaluate

FLAGS = {"--checkpoint": "value", "--split": "value", "--debug": "switch"}


def run(checkpoint: Path, split_name: str, overrides: list) -> int:
    verify(checkpoint)
    config_file = checkpoint.parent.parent / "config.yaml"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} is missing: cannot tell which model and data {checkpoint} holds")
    cfg = configlib.load(Config, str(config_file), overrides)
    check_fingerprint(read_manifest(checkpoint)["fingerprint"], fingerprint(configlib.to_dict(cfg)), checkpoint)
    check_launcher_precision(cfg.train.mixed_precision)
    acc = make_accelerator(cfg.dist, cfg.train.mixed_precision, 1, checkpoint.parent.parent, [])
    splits = load_splits(cfg.data, cfg.train.seed)
    split = {"test": splits.test, "eval": splits.eval, splits.eval_split: splits.eval}.get(split_name)
    if split is None:
        raise UserError(f"--split {split_name}: this run has the splits test and {splits.eval_split}")
    model = build_model(cfg.model, splits.in_shape, splits.num_classes, cfg.data.name)
    try:
        load_model(model, str(checkpoint / "model.safetensors"))
    except Exception as e:
        raise CheckpointError(f"cannot load {checkpoint / 'model.safetensors'}: {str(e).splitlines()[0]}") from None
    model = acc.prepare(model)
    order = TrainOrder(len(splits.train), cfg.train.seed, cfg.train.global_batch_size or cfg.train.micro_batch_size,
                       cfg.train.micro_batch_size, 1, 0)
    batches = make_batches(cfg.data, splits, order, acc.device, cfg.train.seed, False, cfg.model.channels_last)
    cfg.train.fast_dev_run = cfg.train.limit_eval_batches = 0  # evaluate the whole split
    results = evaluate(Evaluator(splits.num_classes, acc.device, confusion=True), model, batches, split, acc, cfg)
    if acc.is_main_process:
        matrix = results.pop("confusion_matrix")
        print(f"{checkpoint} on {split_name} ({results['samples']} samples, {acc.num_processes} processes)")
        for key in ("accuracy", "top5_accuracy", "precision", "recall", "f1", "loss"):
            print(f"  {key:<14} {results[key]:.6f}")
        print("confusion matrix (rows: true class, columns: predicted)")
        for i, row in enumerate(matrix):
            print(f"  {i:>3} " + " ".join(f"{int(v):>5}" for v in row))
        out = checkpoint.parent.parent / f"eval-{checkpoint.name}-{split_name}.json"
        out.write_text(json.dumps({"checkpoint": str(checkpoint), "split": split_name,
                                   "world_size": acc.num_processes, "metrics": results,
                                   "confusion_matrix": matrix}, indent=1))
        print(f"wrote {out}")
    acc.end_training()
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        options, overrides = configlib.parse_command_line(argv, FLAGS)
        if "--checkpoint" not in options:
            raise UserError("--checkpoint PATH is required (a runs/<name>/checkpoints/step_N directory)")
        return run(Path(options["--checkpoint"]), options.get("--split", "test"), overrides)
    except UserError as e:
        if "--debug" in argv:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
