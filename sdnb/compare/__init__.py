"""Stage 04, the comparison: base vs fine-tuned VAEs on held-out images (the same verb 02 uses, `compare_vaes`)
and base vs fine-tuned pipelines on the same prompts and seeds, by eye and in numbers, into `report.html` and
`metrics.json`. The verbs 04_compare calls."""

from sdnb.compare.browser import Browser
from sdnb.compare.config import CompareConfig
from sdnb.compare.report import samples_grid, write_compare_report
from sdnb.compare.sd import GenerationSetup, generate, prepare_generation, save_samples, sd_metrics
from sdnb.compare.xyz import xyz_sheet
from sdnb.vae.compare import VAEComparison, compare_vaes, held_out_images, load_vaes, whole_images
from sdnb.vae.plot import whole_image_figures

__all__ = ["Browser", "CompareConfig", "GenerationSetup", "VAEComparison", "compare_vaes", "generate",
           "held_out_images", "load_vaes", "prepare_generation", "samples_grid", "save_samples", "sd_metrics",
           "whole_image_figures", "whole_images", "write_compare_report", "xyz_sheet"]
