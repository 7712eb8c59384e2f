"""Training logs: `run_dir/log.csv`, the progress bar, optional trackers and the loss plot.

The CSV is the record both notebooks read back (`plot_losses`). Rows are appended; when a new
column appears (validation values arrive later than training losses) or when a resumed run cuts
the log back to its checkpoint's step, the whole file is rewritten atomically (temporary file,
then `os.replace`), so a killed process leaves at worst one torn last line, which readers drop.
"""

from __future__ import annotations

import csv
import io
import math
import netrc
import os
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
from tqdm.auto import tqdm

FIRST_COLUMNS = ("step", "epoch")
EXPLOSION = 100.0  # a loss 100x its lowest logged value has diverged (lr=1 took the tiny VAE from 0.2 to 45,217)


def read_log(path: str | Path) -> list[dict[str, float]]:
    """Rows of a log.csv as dicts of floats (empty cells are left out). A torn last line is dropped."""
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text()
    if text and not text.endswith("\n"):  # the process died in the middle of a line
        text = text[: text.rfind("\n") + 1]
    rows = []
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    for values in reader:
        if not header or len(values) != len(header):
            continue
        row = {k: float(v) for k, v in zip(header, values) if v != ""}
        if "step" in row:
            row["step"] = int(row["step"])  # written back as it was: "10", not "10.0"
            rows.append(row)
    return rows


class CSVLog:
    """Append-only CSV log whose columns may grow; `enabled=False` (ranks other than 0) makes it a no-op."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self.rows: list[dict[str, float]] = read_log(self.path) if enabled else []
        self.columns: list[str] = list(FIRST_COLUMNS)
        for row in self.rows:
            self._add_columns(row)

    def _add_columns(self, row: dict[str, Any]) -> bool:
        new = [k for k in row if k not in self.columns]
        self.columns += new
        return bool(new)

    def _rewrite(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, self.columns)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.path)

    def append(self, row: dict[str, float]) -> None:
        """Add one row (step, epoch and any values); rewrites the file if it brings new columns."""
        if not self.enabled:
            return
        self.rows.append(dict(row))
        if self._add_columns(row) or not self.path.exists():
            self._rewrite()
            return
        line = io.StringIO()
        csv.DictWriter(line, self.columns).writerow(row)
        with open(self.path, "a", newline="") as f:
            f.write(line.getvalue())

    def truncate(self, step: int) -> None:
        """Drop the rows after `step` (a resumed run continues from its checkpoint's step)."""
        if not self.enabled:
            return
        kept = [r for r in self.rows if r["step"] <= step]
        if len(kept) != len(self.rows) or self.path.exists():
            self.rows = kept
            self._rewrite()


class RunLog(CSVLog):
    """The loop's log.csv: each row also goes to the tracker (`accelerator.log`) and asks the mirror for a copy."""

    def __init__(self, path: str | Path, enabled: bool, accelerator: Any = None):
        super().__init__(path, enabled)
        self.accelerator, self.mirror, self.exploded = accelerator, None, ""

    def append(self, row: dict[str, float]) -> None:
        super().append(row)
        if self.accelerator is not None:
            self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=int(row["step"]))
        if self.mirror:
            self.mirror.request("log")

    def explosion(self, lr: float) -> str:
        """Once per run: a warning when the last row's loss is EXPLOSION times its lowest logged value, else ''."""
        losses = [r["loss"] for r in self.rows if "loss" in r and math.isfinite(r["loss"])]
        if self.exploded or len(losses) < 2 or min(losses) <= 0 or losses[-1] < EXPLOSION * min(losses):
            return ""
        self.exploded = (f"WARNING: the loss exploded: {losses[-1]:.4g} at step {self.rows[-1]['step']}, "
                         f"{losses[-1] / min(losses):.0f}x its lowest value so far ({min(losses):.4g}). The learning "
                         f"rate is probably too high (lr={lr:g}): stop, lower lr (or raise warmup_steps), and resume "
                         "from a checkpoint saved before the rise")
        return self.exploded


class LossWindow:
    """Means of the losses over the steps between two log rows, and the images/s over the same steps."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps, self.seconds, self.images = 0, 0.0, 0

    def add(self, values: dict[str, float]) -> None:
        """One optimizer step's values (not called for skipped steps)."""
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1

    def timed(self, seconds: float, images: int) -> None:
        """Time spent in forward/backward/step and the images it processed (skipped steps included)."""
        self.seconds += seconds
        self.images += images

    def row(self) -> dict[str, float]:
        """The means (none if every step was skipped) and images_per_s."""
        means = {k: v / self.steps for k, v in self.sums.items()} if self.steps else {}
        return {**means, "images_per_s": round(self.images / max(self.seconds, 1e-9), 3)}

    def state_dict(self) -> dict[str, Any]:
        return {"sums": self.sums, "counts": [self.steps, self.seconds, self.images]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums = dict(state["sums"])
        self.steps, self.seconds, self.images = state["counts"]


def progress_bar(total: int, initial: int = 0, disable: bool = False) -> tqdm:
    """A tqdm.auto bar over optimizer steps that refreshes at most every 5 s (readable in papermill logs)."""
    return tqdm(total=total, initial=initial, disable=disable, desc="train", unit="step",
                mininterval=5.0, dynamic_ncols=True)


def prepare_tracker(log_with: str) -> str | None:
    """Check an accelerate tracker name ('' = none); W&B runs offline unless a key is configured."""
    if not log_with:
        return None
    if log_with not in ("tensorboard", "wandb"):
        raise ValueError(f"log_with={log_with!r}: expected '', 'tensorboard' or 'wandb'")
    module = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}[log_with]
    try:
        __import__(module)
    except ImportError as err:
        raise ImportError(f"log_with={log_with!r} needs the {log_with} package (pip install {log_with}), "
                          f"or set log_with='' to log to log.csv only") from err
    if log_with == "wandb" and not _wandb_key_configured():
        os.environ.setdefault("WANDB_MODE", "offline")  # never prompt for a login in a headless run
    return log_with


def _wandb_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _smoothed(values: list[float], smooth: float) -> list[float]:
    """Exponential moving average with bias correction (as TensorBoard's smoothing slider)."""
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        avg = smooth * avg + (1 - smooth) * v
        weight = smooth * weight + (1 - smooth)
        out.append(avg / weight if weight else v)
    return out


def plot_losses(log_csv: str | Path, smooth: float = 0.9, loss: str = "loss"):
    """Plot the training loss (raw and smoothed) and the `val_*` curves of a log.csv; returns the Figure."""
    rows = read_log(log_csv)
    train = [(r["step"], r[loss]) for r in rows if loss in r and math.isfinite(r[loss])]
    val_cols = sorted({k for r in rows for k in r if k.startswith("val_")})
    fig, axes = plt.subplots(1, 2 if val_cols else 1, figsize=(11 if val_cols else 6, 3.6), squeeze=False)
    ax = axes[0, 0]
    if train:
        steps, values = zip(*train)
        ax.plot(steps, values, alpha=0.3, color="C0", label=f"{loss} (raw)")
        ax.plot(steps, _smoothed(list(values), smooth), color="C0", label=f"{loss} (smoothed {smooth})")
        ax.legend()
    ax.set(xlabel="step", ylabel=loss, title="training loss")
    ax.grid(alpha=0.3)
    if val_cols:
        ax = axes[0, 1]
        for i, col in enumerate(val_cols):
            points = [(r["step"], r[col]) for r in rows if col in r]
            ax.plot(*zip(*points), marker="o", color=f"C{i + 1}", label=col)
        ax.set(xlabel="step", title="validation")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig
