"""Stage 03, Stable Diffusion: fine-tune SD 1.5's UNet on captioned photos in aspect buckets, with a stable
validation loss, the best weights kept, and fixed sample prompts at every checkpoint. The verbs 03_sd_finetune
calls."""

from sdnb.sd.buckets import BucketDataset
from sdnb.sd.config import SDConfig
from sdnb.sd.data import build_datasets
from sdnb.sd.finetune import finetune, train_from_config
from sdnb.sd.model import SDParts, load_parts
from sdnb.sd.outputs import drive_budget, overfit_report, training_summary
from sdnb.sd.plot import plot_validation, show_batches
from sdnb.sd.samples import sample_sheet

__all__ = ["BucketDataset", "SDConfig", "SDParts", "build_datasets", "drive_budget", "finetune", "load_parts",
           "overfit_report", "plot_validation", "sample_sheet", "show_batches", "training_summary",
           "train_from_config"]
