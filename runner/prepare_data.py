"""Build a dataset's cache ahead of training, for example on a login node before a job starts.

    python runner/prepare_data.py --config PRESET_OR_FILE [data.key=value ...]

With data.name=folder it scans data.root, decodes every image once and writes the cache that training
then reads (in data.cache_dir, by default <data.root>/.cache); with data.loader=torchvision it checks every
image and caches the decisions and normalisation, not the pixels. A cache that is up to date is reused.
For the built-in datasets it checks the files (downloading them first with data.download=true).
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import this repo's packages, not runner/*.py as top level
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from runner import config as configlib  # noqa: E402
from runner.cli import Command  # noqa: E402


def run(options: dict, overrides: list) -> int:
    from runner.data.splits import load_splits
    from runner.model import pretrained_preprocessing
    from runner.plan import Config

    cfg = configlib.load(Config, options.get("--config", "digits"), overrides)
    splits = load_splits(cfg.data, cfg.train.seed, pretrained_preprocessing(cfg.model))  # the size training uses
    names = splits.class_names
    shown = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
    eval_part = "" if splits.eval_split == "test" else f", {splits.eval_split} {len(splits.eval)}"
    print(f"{cfg.data.name}: train {len(splits.train)}{eval_part}, test {len(splits.test)} | images "
          f"{'x'.join(map(str, splits.in_shape))} | classes {shown} | mean "
          f"{', '.join(f'{m:.4f}' for m in splits.mean)} std {', '.join(f'{s:.4f}' for s in splits.std)}")
    if splits.description:
        print(splits.description)
    return 0


COMMAND = Command(__doc__, {"--config": "value"}, run)


def main(argv=None) -> int:
    return COMMAND.main(argv)


if __name__ == "__main__":
    sys.exit(main())
