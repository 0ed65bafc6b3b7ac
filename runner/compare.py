"""Compare runs: the config keys that differ, best and final metrics, steps, wall time and img/s.

    python runner/compare.py runs/lr-seed-*                 # directories (or a quoted glob: 'runs/lr-*')
    python runner/compare.py runs/a runs/b --out runs/ab    # writes runs/ab.csv, runs/ab.md, runs/ab.png

Prints one table, best run first by the monitored metric (eval.monitor of the runs' configs), and writes it
as CSV and Markdown, plus one PNG with each run's eval accuracy and train loss against step. Runs without
summary.json (still running, or preempted) are shown with what their metrics.jsonl holds so far.

Flags:
  --out PREFIX   where to write PREFIX.csv, PREFIX.md and PREFIX.png (default: comparison)
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import this repo's packages, not runner/*.py as top level
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import csv  # noqa: E402
import glob  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # headless: no display on clusters
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from runner.cli import Command  # noqa: E402
from runner.config import flatten  # noqa: E402
from runner.errors import UserError, first_line  # noqa: E402

RUN_FILES = ("config.yaml", "metrics.jsonl")
NOT_COMPARED = ("run.name",)  # differs by construction; the row's label already says it
LOWER_IS_BETTER = ("loss",)


@dataclass
class Run:
    path: Path
    config: dict                    # flattened config.yaml ({} when absent)
    records: list[dict]             # metrics.jsonl, lines cut short skipped
    summary: dict | None            # None: still running or stopped before the end
    best: tuple[float, int] | None = None  # (value, step) of the monitored metric
    row: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    def eval_records(self) -> list[dict]:
        """Evaluations during training (val, or test when there is no val), not the final ones."""
        evals = [r for r in self.records if r.get("split") not in ("train", None)
                 and not str(r["split"]).startswith("final_")]
        splits = {r["split"] for r in evals}
        keep = "val" if "val" in splits else min(splits) if splits else None
        return [r for r in evals if r["split"] == keep]

    def train_records(self) -> list[dict]:
        return [r for r in self.records if r.get("split") == "train"]


# ---------------------------------------------------------------------------------------------- reading

def expand(arguments: list[str]) -> list[Path]:
    """Arguments as given, a glob pattern expanded to the directories it matches; each run once."""
    paths: list[Path] = []
    for argument in arguments:
        if glob.has_magic(argument):
            matches = sorted(Path(p) for p in glob.glob(argument) if Path(p).is_dir())
            if not matches:
                raise UserError(f"{argument} matches no directory")
            paths += matches
        else:
            paths.append(Path(argument))
    unique = {}
    for path in paths:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def read_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # the line being written, or one cut short by a kill
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def read_summary(path: Path) -> dict | None:
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):  # absent, or being written
        return None
    return summary if isinstance(summary, dict) else None


def read_run(path: Path) -> Run:
    if not path.is_dir():
        raise UserError(f"{path} is not a run directory ({'no such directory' if not path.exists() else 'a file'})")
    if not any((path / name).is_file() for name in RUN_FILES):
        raise UserError(f"{path} is not a run directory: it holds neither {' nor '.join(RUN_FILES)}")
    config = {}
    if (path / "config.yaml").is_file():
        try:
            raw = yaml.safe_load((path / "config.yaml").read_text())
        except yaml.YAMLError as e:
            raise UserError(f"{path / 'config.yaml'} is not valid YAML: {first_line(e)}") from None
        config = flatten(raw) if isinstance(raw, dict) else {}
    return Run(path, config, read_records(path / "metrics.jsonl"), read_summary(path / "summary.json"))


# ---------------------------------------------------------------------------------------------- the table

def monitored(runs: list[Run]) -> str:
    metrics = [r.config.get("eval.monitor") for r in runs if r.config.get("eval.monitor")]
    return max(set(metrics), key=metrics.count) if metrics else "accuracy"


def best_of(run: Run, metric: str) -> tuple[float, int] | None:
    best = (run.summary or {}).get("best") or {}
    if best.get("metric") == metric and isinstance(best.get("value"), (int, float)):
        return best["value"], best.get("step")
    values = [(r["metrics"][metric], r["step"]) for r in run.eval_records()
              if isinstance(r.get("metrics", {}).get(metric), (int, float))]
    if not values:
        return None
    return (min if metric in LOWER_IS_BETTER else max)(values, key=lambda v: v[0])


def differing_keys(runs: list[Run]) -> list[str]:
    keys = sorted({k for r in runs for k in r.config} - set(NOT_COMPARED))
    missing = object()
    return [k for k in keys if len({json.dumps(r.config.get(k, missing), default=str) for r in runs}) > 1]


def final_metrics(run: Run) -> tuple[str, dict]:
    final = (run.summary or {}).get("final") or {}
    split = "test" if "test" in final else next(iter(final), "")
    return split, final.get(split) or {}


def images_per_second(run: Run):
    if run.summary:
        return (run.summary.get("throughput") or {}).get("img_per_s")
    speeds = [r["throughput"]["img_per_s"] for r in run.train_records() if (r.get("throughput") or {}).get("img_per_s")]
    return speeds[-1] if speeds else None


def build_row(run: Run, metric: str, keys: list[str]) -> dict:
    split, final = final_metrics(run)
    train = run.train_records()
    summary = run.summary or {}
    row = {"run": run.name, "status": summary.get("stopped", "incomplete") if run.summary else "incomplete"}
    row.update({k: run.config.get(k, "") for k in keys})
    row[f"best {metric}"] = run.best[0] if run.best else None
    row["best step"] = run.best[1] if run.best else None
    row["final split"] = split
    row["final accuracy"] = final.get("accuracy")
    row["final loss"] = final.get("loss")
    row["steps"] = summary.get("steps", train[-1]["step"] if train else (run.records[-1]["step"] if run.records else 0))
    row["epochs"] = summary.get("epochs_completed", train[-1].get("epoch") if train else None)
    row["wall s"] = summary.get("wall_seconds")
    row["img/s"] = images_per_second(run)
    return row


def sort_runs(runs: list[Run], metric: str) -> list[Run]:
    sign = 1 if metric in LOWER_IS_BETTER else -1
    return sorted(runs, key=lambda r: (r.best is None, sign * r.best[0] if r.best else 0, r.name))


def cell(value) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def markdown(rows: list[dict]) -> str:
    header = list(rows[0])
    table = [header] + [[cell(row[k]) for k in header] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in table]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else json.dumps(v) if isinstance(v, (list, dict)) else v
                         for k, v in row.items()})
    return out.getvalue()


# ---------------------------------------------------------------------------------------------- the plot

def plot(runs: list[Run], out: Path) -> None:
    fig, (accuracy, loss) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    for i, run in enumerate(runs):
        label = run.name if run.summary else f"{run.name} (incomplete)"
        style = {"color": f"C{i % 10}", "linestyle": "-" if run.summary else "--", "label": label}
        evals = [r for r in run.eval_records() if "accuracy" in r.get("metrics", {})]
        train = [r for r in run.train_records() if "loss" in r.get("metrics", {})]
        accuracy.plot([r["step"] for r in evals], [r["metrics"]["accuracy"] for r in evals],
                      marker="o" if len(evals) < 30 else None, **style)
        loss.plot([r["step"] for r in train], [r["metrics"]["loss"] for r in train],
                  marker="." if len(train) < 30 else None, **style)
    for ax, title in ((accuracy, "eval accuracy"), (loss, "train loss")):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    accuracy.legend(fontsize="small")
    fig.savefig(out, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- the command

def run(options: dict, overrides: list) -> int:
    if overrides:
        raise UserError(f"unexpected argument {overrides[0][0]}={overrides[0][1]}; give run directories")
    if not options["args"]:
        raise UserError("give run directories (or a glob): python runner/compare.py runs/sweep-*")
    runs = [read_run(path) for path in expand(options["args"])]
    metric = monitored(runs)
    for r in runs:
        r.best = best_of(r, metric)
    runs = sort_runs(runs, metric)
    keys = differing_keys(runs)
    rows = [build_row(r, metric, keys) for r in runs]
    prefix = Path(options.get("--out", "comparison"))
    if prefix.parent != Path("."):
        prefix.parent.mkdir(parents=True, exist_ok=True)
    table = markdown(rows)
    print(f"{len(runs)} runs, best {metric} first; differing config keys: {', '.join(keys) or 'none'}")
    print(table, end="")
    outputs = [prefix.with_name(prefix.name + ext) for ext in (".csv", ".md", ".png")]
    outputs[0].write_text(csv_text(rows))
    outputs[1].write_text(table)
    plot(runs, outputs[2])
    print("wrote " + ", ".join(str(p) for p in outputs))
    return 0


COMMAND = Command(__doc__, {"--out": "value"}, run, positional=True)


def main(argv=None) -> int:
    return COMMAND.main(argv)


if __name__ == "__main__":
    sys.exit(main())
