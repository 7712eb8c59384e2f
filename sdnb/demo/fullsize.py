"""The real model shapes of what sdnb loads by default, as config dicts: random-initialised models of these shapes
(`python -m sdnb.tiny DIR --full-size`) run the notebooks at real scale offline.

Sources (the public ``config.json`` files these dicts copy; keys that only record versions are left out):

- SD v1.5: https://huggingface.co/runwayml/stable-diffusion-v1-5 (mirror: stable-diffusion-v1-5/stable-diffusion-v1-5),
  ``unet/config.json``, ``vae/config.json``, ``text_encoder/config.json`` (CLIP ViT-L/14's text tower, as in
  openai/clip-vit-large-patch14), ``scheduler/scheduler_config.json`` (PNDM). The same shapes appear in diffusers'
  ``scripts/convert_original_stable_diffusion_to_diffusers.py`` (v1-inference.yaml) and in open-mmlab/mmagic's
  ``configs/stable_diffusion/stable-diffusion_ddim_denoisingunet.py``.
  Parameters: UNet 859,520,964; VAE 83,653,863; text encoder 123,060,480.
- BLIP-base captioner: https://huggingface.co/Salesforce/blip-image-captioning-base ``config.json`` (ViT-B/16 at
  384 px, BERT-base text decoder, vocabulary 30524 = bert-base-uncased + [DEC] + [ENC]); ~224 M parameters.
- CLIP ViT-L/14 (04's CLIP score): https://huggingface.co/openai/clip-vit-large-patch14 ``config.json``; ~428 M.
"""

from __future__ import annotations

SD15_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

SD15_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "scaling_factor": 0.18215,  # diffusers' default, as SD v1 was trained with (the hub file predates the key)
}

# SD v1.5's text_encoder/config.json (its bos/eos/pad ids 0/2/1 are as shipped; with eos_token_id 2, transformers
# pools at the highest token id, i.e. at <|endoftext|> 49407, as CLIP did).
SD15_TEXT_ENCODER = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}

SD15_SCHEDULER = {  # scheduler/scheduler_config.json: PNDMScheduler (load with `from_config`: it ignores clip_sample)
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

SD15_TOKENIZER_MAX_LENGTH = 77

BLIP_BASE = {
    "text_config": {
        "vocab_size": 30524,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 512,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "initializer_range": 0.02,
        "bos_token_id": 30522,
        "sep_token_id": 102,
        "pad_token_id": 0,
    },
    "vision_config": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "image_size": 384,
        "patch_size": 16,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-05,
        "initializer_range": 0.02,
    },
    "projection_dim": 512,
    "image_text_hidden_size": 256,
    "logit_scale_init_value": 2.6592,
}
BLIP_BASE_IMAGE_SIZE = 384

CLIP_VIT_L14 = {
    "text_config": {
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "projection_dim": 768,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    },
    "vision_config": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 224,
        "patch_size": 14,
        "hidden_act": "quick_gelu",
        "projection_dim": 768,
    },
    "projection_dim": 768,
    "logit_scale_init_value": 2.6592,
}
CLIP_VIT_L14_IMAGE_SIZE = 224

# Parameter counts of the real checkpoints (what a model built from these dicts must have).
PARAMS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480, "blip": 223_971_644,
          "clip": 427_616_513}
