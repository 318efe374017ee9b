"""Plot a train.py run's metrics.jsonl: training loss, every evaluation loss, and the learning rate.

    gptneox-plot OUTPUT_DIR/metrics.jsonl --output loss.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gptneox.errors import UserError, report_user_error
from gptneox.extras import require
from gptneox.training.metrics import MetricsError, eval_dataset, eval_loss_keys, last_per_step, read_metrics  # noqa: E501
from gptneox.training.output_dir import METRICS_FILE


def plot(records: list[dict], output: Path) -> Path:
    require("matplotlib", "gptneox-plot")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = last_per_step([r for r in records if "loss" in r])
    if not steps:
        raise MetricsError("no training steps (records with a 'loss') to plot")
    figure, (loss_axis, lr_axis) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
    loss_axis.plot([r["step"] for r in steps], [r["loss"] for r in steps], label="train", linewidth=1)
    for key in eval_loss_keys(records):
        points = [(r["step"], r[key]) for r in last_per_step([r for r in records if key in r])]
        loss_axis.plot(*zip(*points), marker="o", markersize=3, label=eval_dataset(key) or "eval (all sets)")
    loss_axis.set_ylabel("loss (mean over trained tokens)")
    loss_axis.legend(fontsize="small")
    loss_axis.grid(alpha=0.3)
    lr_axis.plot([r["step"] for r in steps], [r["lr"] for r in steps], color="tab:gray")
    lr_axis.set_ylabel("learning rate")
    lr_axis.set_xlabel("optimizer step")
    lr_axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(output, dpi=120)
    plt.close(figure)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", type=Path, help="metrics.jsonl written by train.py (or its run directory)")
    parser.add_argument("--output", type=Path, help="PNG path (default: metrics.png beside the input)")
    args = parser.parse_args(argv)
    path = args.metrics / METRICS_FILE if args.metrics.is_dir() else args.metrics
    try:
        if not path.is_file():
            raise MetricsError(f"{path}: no such file")
        written = plot(read_metrics(path), args.output or path.with_suffix(".png"))
    except UserError as err:
        return report_user_error(parser.prog, err)
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
