"""Draw curves.png from a run's metrics.jsonl: train loss, eval loss, eval accuracy and learning rate.

    python runner/plot.py runs/<name>
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import this repo's packages
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import json

import matplotlib

matplotlib.use("Agg")  # headless: no display on clusters
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of metrics.jsonl; a line cut short by a kill, or one that is not a record, is skipped."""
    records = []
    for line in (run_dir / "metrics.jsonl").read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and isinstance(record.get("metrics"), dict):
            records.append(record)
    return records


def resume_steps(records: list[dict]) -> list[int]:
    """Where each later segment of a resumed run took over: the last step the earlier one left on record."""
    steps, last = [], {}
    for r in records:
        segment = r.get("segment", 1)
        if last and segment not in last:
            steps.append(max(last.values()))
        last[segment] = r["step"]
    return steps


def plot_run(run_dir: Path) -> Path:
    records = read_metrics(run_dir)
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] in ("val", "test", "overfit")]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    panels = [
        (axes[0, 0], "train loss (mean over each log window)", train, "loss"),
        (axes[0, 1], f"{evals[0]['split'] if evals else 'eval'} loss", evals, "loss"),
        (axes[1, 0], f"{evals[0]['split'] if evals else 'eval'} accuracy", evals, "accuracy"),
        (axes[1, 1], "learning rate", train, "lr"),
    ]
    resumes = resume_steps(records)
    for ax, title, rows, key in panels:
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        points = [(r["step"], r["lr"] if key == "lr" else r["metrics"].get(key)) for r in rows]
        points = [(s, v) for s, v in points if isinstance(v, (int, float))]
        if points:
            ax.plot(*zip(*points), marker="." if len(points) < 50 else None)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        for i, step in enumerate(resumes):
            ax.axvline(step, color="grey", linestyle=":", label="resumed" if i == 0 else None)
    if resumes:
        axes[0, 0].legend(fontsize="small")
    fig.suptitle(run_dir.name + (f" ({len(resumes) + 1} segments)" if resumes else ""))
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "metrics.jsonl").is_file():
        print("usage: python runner/plot.py RUN_DIR (a directory holding metrics.jsonl)", file=sys.stderr)
        sys.exit(2)
    print(plot_run(Path(sys.argv[1])))
