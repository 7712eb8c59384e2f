"""Stage 02, the VAE: fine-tune SD's VAE on random patches of large images and show, on held-out images, what
changed. The verbs 02_vae_finetune calls; 04_compare reads `compare_vaes` and friends from here too."""

from sdnb.vae.compare import (VAEComparison, compare_vaes, held_out_images, load_vaes, reconstruct_image,
                              whole_images)
from sdnb.vae.config import VAE_RECIPES, VAEConfig
from sdnb.vae.control import control_config, control_run, verdict
from sdnb.vae.data import VAEData, prepare_data
from sdnb.vae.finetune import finetune, finetune_control, train_from_config
from sdnb.vae.model import reconstruct
from sdnb.vae.plot import preview_mask, preview_patches, whole_image_figures
from sdnb.vae.tiling import decode_tiled, encode_tiled

__all__ = ["VAEComparison", "VAEConfig", "VAEData", "VAE_RECIPES", "compare_vaes", "control_config", "control_run",
           "decode_tiled", "encode_tiled", "finetune", "finetune_control", "held_out_images", "load_vaes", "prepare_data",
           "preview_mask", "preview_patches", "reconstruct", "reconstruct_image", "train_from_config", "verdict",
           "whole_image_figures", "whole_images"]
