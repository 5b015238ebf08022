"""`tinyseek plot RUN_DIR`: training and validation loss, and learning rate, against tokens seen."""

from __future__ import annotations

import argparse
from pathlib import Path

from tinyseek.errors import FileError

PLOT_FILE = "loss.png"


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write the run's loss and learning-rate curves to `output` (default RUN_DIR/loss.png) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tinyseek.train.metrics import read_metrics  # torch, which `tinyseek plot --help` does without

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    if not train and not evals:
        raise FileError(f"{run_dir}: no metrics.jsonl records to plot")
    figure, (loss_axes, lr_axes) = plt.subplots(
        2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    if train:
        loss_axes.plot([r["tokens"] for r in train], [r["loss"] for r in train], label="train", alpha=0.8)
        lr_axes.plot([r["tokens"] for r in train], [r["lr"] for r in train], color="tab:green")
    if evals:
        loss_axes.plot(
            [r["tokens"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation", color="tab:red"
        )
    loss_axes.set_ylabel("cross-entropy (nats/token)")
    loss_axes.set_title(run_dir.resolve().name)
    loss_axes.legend()
    loss_axes.grid(alpha=0.3)
    lr_axes.set_ylabel("learning rate")
    lr_axes.set_xlabel("tokens seen")
    lr_axes.grid(alpha=0.3)
    figure.tight_layout()
    output = Path(output) if output is not None else run_dir / PLOT_FILE
    figure.savefig(output, dpi=120)
    plt.close(figure)
    return output


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tinyseek plot", description=__doc__)
    parser.add_argument("run_dir", help="a run directory (it holds metrics.jsonl)")
    parser.add_argument("--output", "-o", help=f"the PNG to write (default RUN_DIR/{PLOT_FILE})")
    args = parser.parse_args(argv[1:])
    print(plot_run(args.run_dir, args.output))
    return 0
