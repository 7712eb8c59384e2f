"""The one training loop (`Trainer`), its config (`TrainConfig`), checkpoints, the CSV log and the Drive mirror.

It knows nothing of VAEs or UNets: a stage brings models, a dataset and a step function.
`python -m sdnb.train run_dir/config.json` continues or starts the run a notebook configured.
"""

from sdnb.train.config import TrainConfig
from sdnb.train.logs import plot_losses, read_log
from sdnb.train.loop import Trainer
from sdnb.train.parts import NonFiniteLossError, TrainResult

__all__ = ["NonFiniteLossError", "TrainConfig", "TrainResult", "Trainer", "plot_losses", "read_log"]
