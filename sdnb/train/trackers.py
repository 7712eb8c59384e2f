"""Pictures for the optional trackers (`log_with`): the loop logs its numbers itself (`accelerator.log`, at every
log.csv row); stages call `log_images` with what they draw (sample grids, held-out reconstructions).

TensorBoard writes under `run_dir/sdnb/` (accelerate's `project_dir` / the run name); W&B runs offline unless a key
is configured (`sdnb.train.logs.prepare_tracker`)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from accelerate import Accelerator
from PIL import Image


def log_images(accelerator: Accelerator, images: Mapping[str, Image.Image], step: int) -> None:
    """Log PIL images under their names at `step` to every tracker of the run (none: nothing happens)."""
    for tracker in accelerator.trackers if accelerator.is_main_process else []:
        if tracker.name == "tensorboard":
            arrays = {k: np.asarray(v.convert("RGB"))[None] for k, v in images.items()}
            tracker.log_images(arrays, step, dataformats="NHWC")
            tracker.writer.flush()
        elif tracker.name == "wandb":
            tracker.log_images({k: [v.convert("RGB")] for k, v in images.items()}, step)
