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
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def plot_run(run_dir: Path) -> Path:
    records = read_metrics(run_dir)
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] in ("val", "test", "overfit")]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    panels = [
        (axes[0, 0], "train loss", train, lambda r: r["metrics"]["loss"]),
        (axes[0, 1], "eval loss", evals, lambda r: r["metrics"]["loss"]),
        (axes[1, 0], "eval accuracy", evals, lambda r: r["metrics"]["accuracy"]),
        (axes[1, 1], "learning rate", train, lambda r: r["lr"]),
    ]
    for ax, title, rows, value in panels:
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if rows:
            ax.plot([r["step"] for r in rows], [value(r) for r in rows], marker="." if len(rows) < 50 else None)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(run_dir.name)
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "metrics.jsonl").is_file():
        print("usage: python runner/plot.py RUN_DIR (a directory holding metrics.jsonl)", file=sys.stderr)
        sys.exit(2)
    print(plot_run(Path(sys.argv[1])))
