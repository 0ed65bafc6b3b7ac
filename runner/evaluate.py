"""Evaluate a checkpoint: the same exactly-reduced metrics as training, plus a labelled confusion matrix.

    python runner/evaluate.py --checkpoint runs/<name>/checkpoints/best [--split test] [--weights raw|ema]
                              [section.key=value ...]
    accelerate launch --multi_gpu --num_processes 2 runner/evaluate.py --checkpoint runs/<name>

--checkpoint takes a checkpoint directory, a `checkpoints/best` or `checkpoints/last` handle, or a run
directory (its best checkpoint, else its last). The config is the run's own config.yaml, with any
overrides applied on top (`data.root=...` for data that moved). --weights chooses the training weights
(raw) or their moving average (ema, the default when the run kept one: train.ema_decay > 0). Results go to
stdout and to `<run>/eval-<checkpoint>-<split>.json` (`-ema.json` for the average).
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import this repo's packages, not runner/*.py as top level
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import json  # noqa: E402

from runner.checkpoint import find, read_manifest, run_dir_of  # noqa: E402
from runner.cli import Command  # noqa: E402
from runner.data.identity import KEY as DATA_IDENTITY  # noqa: E402
from runner.ema import choose_weights, load_chosen_weights  # noqa: E402
from runner.errors import UserError  # noqa: E402
from runner.plan import Config, load_run_config  # noqa: E402
from runner.rundir import check_fingerprint, default_fingerprint, fingerprint  # noqa: E402


def evaluate(options: dict, overrides: list) -> int:
    if "--checkpoint" not in options:
        raise UserError("--checkpoint PATH is required (a checkpoint, checkpoints/best|last, or a run directory)")
    checkpoint = find(options["--checkpoint"])
    run_dir = run_dir_of(checkpoint)
    cfg = load_run_config(run_dir, overrides)
    saved = read_manifest(checkpoint)["fingerprint"]
    saved.pop(DATA_IDENTITY, None)  # evaluating on other data of the same config is allowed: a new test set
    check_fingerprint(saved, fingerprint(cfg), default_fingerprint(cfg), checkpoint)
    weights = choose_weights(checkpoint, options.get("--weights"))
    import torch

    from runner.distributed import cpu_threads, is_main_rank, launched_world_size, make_accelerator

    acc = make_accelerator(cfg.dist, cfg.train.mixed_precision, launched_world_size())
    torch.set_num_threads(cpu_threads(cfg.dist.threads))
    results, class_names, split_name = evaluate_checkpoint(cfg, acc, checkpoint, options.get("--split", "test"),
                                                           run_dir, weights)
    if is_main_rank():
        report(checkpoint, run_dir, split_name, acc.num_processes, results, class_names, weights)
    acc.end_training()
    return 0


def evaluate_checkpoint(cfg: Config, acc, checkpoint: Path, split_name: str, run_dir: Path, weights: str = "raw"):
    """The checkpoint's metrics on a split, its images preprocessed as the run's data.json records (size,
    mean, std), so that they are those training saw."""
    from runner.data.batches import make_batches
    from runner.data.splits import load_splits, read_data_card
    from runner.metrics import EvalBatch, Evaluator, evaluate_split, per_class
    from runner.model import build_model, load_weights

    card = read_data_card(run_dir)
    splits = load_splits(cfg.data, cfg.train.seed,
                         {"image_size": card["in_shape"][1:], "mean": card["mean"], "std": card["std"]})
    split = {"test": splits.test, splits.eval_split: splits.eval}.get(split_name)
    if split is None:
        raise UserError(f"--split {split_name}: this run has the splits test and {splits.eval_split}")
    model = build_model(cfg.model, splits.in_shape, splits.num_classes, cfg.data.name)
    model = acc.prepare(load_chosen_weights(load_weights(model, checkpoint, cfg.model.name), checkpoint, weights))
    # Evaluation needs no training order (None); any world size evaluates the whole split, whatever debug
    # limits the run had.
    batches = make_batches(cfg.data, splits, None, acc.device, cfg.train.seed, False, cfg.model.channels_last)
    evaluator = Evaluator(splits.num_classes, acc.device, confusion=True)
    results = evaluate_split(evaluator, model, batches, split, acc, EvalBatch.of(cfg.eval), len(split))
    results["per_class"] = per_class(results, splits.class_names)
    return results, splits.class_names, split_name


def report(checkpoint: Path, run_dir: Path, split_name: str, world: int, results: dict, names: list[str],
           weights: str) -> None:
    matrix = results.pop("confusion_matrix")
    print(f"{checkpoint} ({weights} weights) on {split_name} ({results['samples']} samples, {world} processes)")
    for key in ("accuracy", "top5_accuracy", "precision", "recall", "f1", "loss"):
        print(f"  {key:<14} {results[key]:.6f}")
    width = max(5, *(len(n) for n in names)) + 1
    print("confusion matrix (rows: true class, columns: predicted)")
    print(" " * (width + 2) + "".join(f"{n[:width - 1]:>{width}}" for n in names))
    for name, row in zip(names, matrix):
        print(f"  {name[:width - 1]:>{width}}" + "".join(f"{int(v):>{width}}" for v in row))
    out = run_dir / f"eval-{checkpoint.name}-{split_name}{'-ema' if weights == 'ema' else ''}.json"
    out.write_text(json.dumps({"checkpoint": str(checkpoint), "split": split_name, "weights": weights,
                               "world_size": world,
                               "metrics": results, "class_names": names, "confusion_matrix": matrix}, indent=1))
    print(f"wrote {out}")


COMMAND = Command(__doc__, {"--checkpoint": "value", "--split": "value", "--weights": "value"}, evaluate)


def main(argv=None) -> int:
    return COMMAND.main(argv)


if __name__ == "__main__":
    sys.exit(main())
