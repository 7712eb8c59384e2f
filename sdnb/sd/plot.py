"""03's pictures: batches as the model sees them, and the loss curves with the best validation step."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from sdnb.sd.buckets import BucketDataset
from sdnb.sd.outputs import overfit_report
from sdnb.train.logs import plot_losses
from sdnb.viz import wrap


def show_batches(dataset: BucketDataset, batches: Sequence[Sequence[int]], max_per_row: int = 6,
                 size: float = 2.0) -> plt.Figure:
    """A figure with one row per batch: the images as trained, with their bucket and caption."""
    ncols = min(max_per_row, max(len(b) for b in batches))
    fig, axes = plt.subplots(len(batches), ncols, figsize=(size * ncols, size * 1.25 * len(batches)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for row, batch in enumerate(batches):
        for col, index in enumerate(list(batch)[:ncols]):
            rng = dataset.rng(index) if dataset.augment else None
            image = dataset.image(index, rng)
            axes[row, col].imshow(np.asarray(image))
            axes[row, col].set_title(f"{image.width}x{image.height}\n{wrap(dataset.caption(index, rng), 26, 2)}",
                                     fontsize=7)
    fig.tight_layout()
    return fig


def plot_validation(run_dir: str | Path, smooth: float = 0.9, patience: int = 3) -> plt.Figure:
    """The loss plot of log.csv (training raw and smoothed | validation) with the best validation step marked."""
    fig = plot_losses(Path(run_dir) / "log.csv", smooth=smooth)
    report = overfit_report(run_dir, patience)
    if report.best_step is not None and len(fig.axes) > 1:
        fig.axes[1].axvline(report.best_step, color="k", ls="--", lw=0.8, label=f"best: step {report.best_step}")
        fig.axes[1].legend()
    return fig
