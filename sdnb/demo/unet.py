"""Brief pre-training of the embedded default's tiny UNet and text encoder on the captioned natural photos, so that
the base model draws photo-like colour layouts (SD was pre-trained on natural photos too) and fine-tuning it on
another set (03) visibly moves its samples.

The step is diffusers' train_text_to_image step (encode, noise, predict, loss against the noise), on VAE latents
of a pool of random 64 px photo crops drawn once, with 10% of captions dropped so that classifier-free guidance has
an unconditional branch to work with (as in SD's training, Rombach et al. 2022).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.optimization import get_cosine_schedule_with_warmup
from tqdm.auto import tqdm

from sdnb.demo.sets import random_crops

UNET_STEPS = 150  # steps of batch 8 at 64 px, one thread
UNET_BATCH, UNET_CROPS, UNET_LR, CAPTION_DROPOUT = 8, 32, 2e-3, 0.1


@torch.no_grad()
def _latent_pool(vae, images: list, rng: np.random.Generator, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of the VAE on UNET_CROPS random crops of each image (image i's at i * UNET_CROPS...)."""
    crops = random_crops(images, UNET_CROPS, size, rng, min_side=0.6)
    x = torch.from_numpy(np.stack([np.asarray(c) for c in crops])).permute(0, 3, 1, 2).float() / 127.5 - 1
    dists = [vae.encode(chunk).latent_dist for chunk in x.split(64)]
    return torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])


def pretrain_unet(unet, text_encoder, tokenizer, vae, scheduler_config: dict, images: list, captions: list[str],
                  steps: int = UNET_STEPS, seed: int = 0, progress: bool = True) -> dict:
    """Train `unet` and `text_encoder` (its token embeddings frozen) in place on `images` (PIL) with `captions`;
    the VAE stays frozen. Returns what was measured."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: more threads only add overhead, and results stay machine-independent
    try:
        mean, std = _latent_pool(vae, images, rng)
        owner = torch.arange(len(images)).repeat_interleave(UNET_CROPS)
        ids = tokenizer(list(captions) + [""], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        noise_scheduler = DDPMScheduler.from_config(scheduler_config)
        text_encoder.get_input_embeddings().requires_grad_(False)
        params = list(unet.parameters()) + [p for p in text_encoder.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=UNET_LR, weight_decay=0.0)
        schedule = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=10, num_training_steps=steps)
        unet.train()
        text_encoder.train()
        for _ in tqdm(range(steps), desc="tiny UNet on photos", disable=not progress):
            # encode: a posterior sample of pooled crops; their captions, 10% dropped (the last row: "")
            j = torch.randint(len(mean), (UNET_BATCH,), generator=g)
            z = (mean[j] + std[j] * torch.randn(mean[j].shape, generator=g)) * vae.config.scaling_factor
            rows = torch.where(torch.rand(UNET_BATCH, generator=g) < CAPTION_DROPOUT, len(captions), owner[j])
            states = text_encoder(ids, return_dict=False)[0][rows]
            # noise, predict, loss (epsilon, SD v1's prediction type)
            noise = torch.randn(z.shape, generator=g)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (UNET_BATCH,), generator=g)
            pred = unet(noise_scheduler.add_noise(z, noise, t), t, states, return_dict=False)[0]
            loss = F.mse_loss(pred, noise)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        unet.eval()
        text_encoder.eval()
    finally:
        torch.set_num_threads(threads)
    text_encoder.get_input_embeddings().requires_grad_(True)
    return {"steps": steps, "final_loss": round(loss.item(), 5), "images": len(images)}
