"""Compare runs: which config keys differ, which run is best, and whether its lead is more than noise.

One row per run: the differing config keys, best and final metrics (each column says its split), steps,
wall time and img/s.

    python runner/compare.py runs/lr-seed-*                 # directories (or a quoted glob: 'runs/lr-*')
    python runner/compare.py runs/a runs/b --out runs/ab    # writes runs/ab.csv, runs/ab.md, runs/ab.png

Prints one table, best run first by the monitored metric (eval.monitor of the runs' configs) on the held-out
split, then how far the best run leads the next one: in samples of that split and against the standard
error of the difference ("+1 of 143 samples: within noise"). Runs that differ only in `train.seed` are
also summarised as a group (mean ± standard deviation over the seeds, and how many). The table is written
as CSV and Markdown, plus one PNG with each run's eval accuracy, eval loss and train loss against step.
Runs without summary.json (still running, or preempted) are shown with what their metrics.jsonl holds so
far; a run whose files hold JSON of the wrong shape is listed as unreadable, with the reason.

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
from dataclasses import dataclass  # noqa: E402

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
    problem: str | None = None      # why the run's files cannot be read (then nothing else is used)
    best: tuple[float, int] | None = None  # (value, step) of the monitored metric

    @property
    def name(self) -> str:
        return self.path.name

    def eval_records(self) -> list[dict]:
        """Evaluations during training (val, or test when there is no val), not the final ones."""
        evals = [r for r in self.records if r["split"] != "train" and not r["split"].startswith("final_")]
        keep = eval_split([self])
        return [r for r in evals if r["split"] == keep]

    def train_records(self) -> list[dict]:
        return [r for r in self.records if r["split"] == "train"]


class Unreadable(Exception):
    """A run file that is valid JSON of the wrong shape: the run is listed with this reason."""


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


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_record(record, where: str) -> dict:
    if not isinstance(record, dict):
        raise Unreadable(f"{where} is a JSON {type(record).__name__}, not a record")
    if not isinstance(record.get("step"), int) or not isinstance(record.get("split"), str):
        raise Unreadable(f"{where} lacks an integer step or a split name")
    if not isinstance(record.get("metrics"), dict):
        raise Unreadable(f"{where}: metrics is not a mapping")
    if not isinstance(record.get("throughput") or {}, dict):
        raise Unreadable(f"{where}: throughput is not a mapping")
    return record


def read_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:  # the line being written, or one cut short by a kill
            continue
        records.append(check_record(record, f"{path.name} line {number}"))
    return records


def read_summary(path: Path) -> dict | None:
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):  # absent, or being written
        return None
    if not isinstance(summary, dict):
        raise Unreadable(f"{path.name} is a JSON {type(summary).__name__}, not a summary")
    final = summary.get("final") or {}
    if not isinstance(final, dict) or not all(isinstance(m, dict) for m in final.values()):
        raise Unreadable(f"{path.name}: final is not a mapping of split to metrics")
    for part in ("best", "throughput"):
        if not isinstance(summary.get(part) or {}, dict):
            raise Unreadable(f"{path.name}: {part} is not a mapping")
    return summary


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
    try:
        return Run(path, config, read_records(path / "metrics.jsonl"), read_summary(path / "summary.json"))
    except Unreadable as e:
        return Run(path, config, [], None, problem=str(e))


# ---------------------------------------------------------------------------------------------- the table

def monitored(runs: list[Run]) -> str:
    metrics = [r.config.get("eval.monitor") for r in runs if r.config.get("eval.monitor")]
    return max(set(metrics), key=metrics.count) if metrics else "accuracy"


def eval_split(runs: list[Run]) -> str:
    """The held-out split evaluated during training (val; test for runs without one)."""
    splits = {r["split"] for run in runs for r in run.records
              if r["split"] != "train" and not r["split"].startswith("final_")}
    return "val" if "val" in splits or not splits else min(splits)


def best_of(run: Run, metric: str) -> tuple[float, int] | None:
    best = (run.summary or {}).get("best") or {}
    if best.get("metric") == metric and is_number(best.get("value")):
        return best["value"], best.get("step")
    values = [(r["metrics"][metric], r["step"]) for r in run.eval_records() if is_number(r["metrics"].get(metric))]
    if not values:
        return None
    return (min if metric in LOWER_IS_BETTER else max)(values, key=lambda v: v[0])


def differing_keys(runs: list[Run]) -> list[str]:
    keys = sorted({k for r in runs for k in r.config} - set(NOT_COMPARED))
    missing = object()
    return [k for k in keys if len({json.dumps(r.config.get(k, missing), default=str) for r in runs}) > 1]


def final_split(runs: list[Run]) -> str:
    """The split of the final metrics columns: test when the runs have it."""
    splits = {s for r in runs for s in ((r.summary or {}).get("final") or {})}
    return "test" if "test" in splits or not splits else min(splits)


def images_per_second(run: Run):
    if run.summary:
        return (run.summary.get("throughput") or {}).get("img_per_s")
    speeds = [r["throughput"]["img_per_s"] for r in run.train_records() if (r.get("throughput") or {}).get("img_per_s")]
    return speeds[-1] if speeds else None


def build_row(run: Run, metric: str, keys: list[str], splits: tuple[str, str]) -> dict:
    held_out, final_name = splits
    final = ((run.summary or {}).get("final") or {}).get(final_name) or {}
    train = run.train_records()
    summary = run.summary or {}
    status = f"unreadable: {run.problem}" if run.problem else summary.get("stopped", "incomplete")
    row = {"run": run.name, "status": status}
    row.update({k: run.config.get(k, "") for k in keys})
    row[f"best {held_out} {metric}"] = run.best[0] if run.best else None
    row["best step"] = run.best[1] if run.best else None
    row[f"final {final_name} accuracy"] = final.get("accuracy")
    row[f"final {final_name} loss"] = final.get("loss")
    row["steps"] = summary.get("steps", train[-1]["step"] if train else (run.records[-1]["step"] if run.records else 0))
    row["epochs"] = summary.get("epochs_completed", train[-1].get("epoch") if train else None)
    row["wall s"] = summary.get("wall_seconds")
    row["img/s"] = images_per_second(run)
    return row


def sort_runs(runs: list[Run], metric: str) -> list[Run]:
    sign = 1 if metric in LOWER_IS_BETTER else -1
    return sorted(runs, key=lambda r: (r.best is None, sign * r.best[0] if r.best else 0, r.name))


def eval_samples(run: Run) -> int | None:
    """How many samples the run's evaluations covered (the held-out split's size)."""
    counts = [r["metrics"]["samples"] for r in run.eval_records() if isinstance(r["metrics"].get("samples"), int)]
    return counts[-1] if counts else None


def lead(ranked: list[Run], metric: str, split: str) -> str | None:
    """How far the best run leads the next, and whether that is more than the evaluation's noise: for an
    accuracy, in samples and against the standard error of the difference of two proportions."""
    if len(ranked) < 2 or ranked[1].best is None:
        return None
    first, second = ranked[0], ranked[1]
    difference = first.best[0] - second.best[0]
    head = f"best: {first.name} ({split} {metric} {first.best[0]:.4g}) vs {second.name} ({second.best[0]:.4g})"
    samples = eval_samples(first)
    if "accuracy" not in metric or not samples:
        return f"{head}: {difference:+.4g}"
    p1, p2 = first.best[0], second.best[0]
    error = math.sqrt((p1 * (1 - p1) + p2 * (1 - p2)) / samples)
    verdict = "within noise" if abs(difference) < 2 * error else "more than 2 standard errors"
    return (f"{head}: {round(difference * samples):+d} of {samples} {split} samples: {verdict} (difference "
            f"{difference:+.4f}, standard error {error:.4f})")


def seed_groups(runs: list[Run], metric: str, split: str) -> list[dict]:
    """Runs whose configs differ only in train.seed, as one row each: mean ± std of the best metric over
    the seeds, and how many seeds."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        if run.best is not None:
            same = {k: v for k, v in run.config.items() if k not in ("train.seed", *NOT_COMPARED)}
            groups.setdefault(json.dumps(same, sort_keys=True, default=str), []).append(run)
    rows = []
    for members in groups.values():
        if len(members) < 2:
            continue
        values = [m.best[0] for m in members]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        rows.append((mean, {"group": " ".join(sorted(m.name for m in members)), "seeds": len(members),
                            f"best {split} {metric}": f"{mean:.4f} ± {std:.4f}"}))
    sign = 1 if metric in LOWER_IS_BETTER else -1
    return [row for _, row in sorted(rows, key=lambda r: sign * r[0])]


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

LINE_STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "v", "D", "x", "P", "*")


def plot(runs: list[Run], split: str, out: Path) -> None:
    """Eval accuracy, eval loss and train loss of every run. Runs whose curves coincide stay visible: each
    run has its own colour, line style and marker, drawn at a few points only."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), constrained_layout=True)
    panels = ((axes[0], f"{split} accuracy", Run.eval_records, "accuracy"),
              (axes[1], f"{split} loss", Run.eval_records, "loss"),
              (axes[2], "train loss (mean over each log window)", Run.train_records, "loss"))
    for i, run in enumerate(r for r in runs if not r.problem):
        label = run.name if run.summary else f"{run.name} (incomplete)"
        style = {"color": f"C{i % 10}", "linestyle": LINE_STYLES[i % len(LINE_STYLES)],
                 "marker": MARKERS[i % len(MARKERS)], "markerfacecolor": "none", "label": label}
        for ax, _, records, key in panels:
            points = [(r["step"], r["metrics"][key]) for r in records(run) if is_number(r["metrics"].get(key))]
            if points:
                ax.plot(*zip(*points), markevery=max(1, len(points) // 8), **style)
    for ax, title, _, _ in panels:
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.savefig(out, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- the command

def report(runs: list[Run], metric: str, split: str, keys: list[str]) -> tuple[str, list[dict]]:
    """The printed text (the table, the best run's lead, the seed groups) and the table's rows."""
    rows = [build_row(r, metric, keys, (split, final_split(runs))) for r in runs]
    lines = [f"{len(runs)} runs, best {split} {metric} first; differing config keys: {', '.join(keys) or 'none'}",
             markdown(rows).rstrip("\n")]
    readable = [r for r in runs if not r.problem]
    why = lead(readable, metric, split)
    if why:
        lines.append(why)
    groups = seed_groups(readable, metric, split)
    if groups:
        lines += ["runs that differ only in train.seed (mean ± standard deviation over the seeds):",
                  markdown(groups).rstrip("\n")]
    return "\n".join(lines) + "\n", rows


def run(options: dict, overrides: list) -> int:
    if overrides:
        raise UserError(f"unexpected argument {overrides[0][0]}={overrides[0][1]}; give run directories")
    if not options["args"]:
        raise UserError("give run directories (or a glob): python runner/compare.py runs/sweep-*")
    runs = [read_run(path) for path in expand(options["args"])]
    metric, split = monitored(runs), eval_split(runs)
    for r in runs:
        r.best = None if r.problem else best_of(r, metric)
    runs = sort_runs(runs, metric)
    keys = differing_keys(runs)
    text, rows = report(runs, metric, split, keys)
    prefix = Path(options.get("--out", "comparison"))
    if prefix.parent != Path("."):
        prefix.parent.mkdir(parents=True, exist_ok=True)
    print(text, end="")
    outputs = [prefix.with_name(prefix.name + ext) for ext in (".csv", ".md", ".png")]
    outputs[0].write_text(csv_text(rows))
    outputs[1].write_text(text)
    plot(runs, split, outputs[2])
    print("wrote " + ", ".join(str(p) for p in outputs))
    return 0


COMMAND = Command(__doc__, {"--out": "value"}, run, positional=True)


def main(argv=None) -> int:
    return COMMAND.main(argv)


if __name__ == "__main__":
    sys.exit(main())
