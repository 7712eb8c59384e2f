"""The VAE stage on the tiny default: what trains, the losses, cached latents, the module entry point."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from safetensors.torch import load_file

from sdnb.metrics import LPIPS
from sdnb.models import load_vae
from sdnb.vae import VAEConfig, finetune, prepare_data
from sdnb.vae.finetune import held_out_metrics
from sdnb.vae.model import VAEWithPosterior, prepare_for_training, vae_loss


def small_config(tiny_assets, run_dir, **overrides) -> VAEConfig:
    values = dict(run_dir=str(run_dir), image_dir=str(tiny_assets.fundus_train), val_image_dir=str(tiny_assets.fundus_val),
                  model_id=str(tiny_assets.sd), patch_size=32, patches_per_epoch=64, n_val_patches=8, max_steps=30,
                  batch_size=4, lr=1e-3, device="cpu", mixed_precision="no", checkpoint_every=0,
                  checkpoint_minutes=0, log_every=5, validate_every=0)
    return VAEConfig(**{**values, **overrides})


def test_lpips_term_carries_gradient(tiny_assets):
    vae = prepare_for_training(load_vae(str(tiny_assets.sd)), "all")
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    losses = vae_loss(VAEWithPosterior(vae), images, LPIPS(pretrained_backbone=False), mse_weight=0, l1_weight=0,
                      lpips_weight=1.0, kl_weight=0)
    losses["loss"].backward()
    grads = [p.grad.abs().sum() for p in vae.decoder.parameters() if p.grad is not None]
    assert grads and sum(grads) > 0  # a perceptual term under no_grad would train nothing


def test_decoder_only_on_cached_latents_keeps_the_encoder_and_improves(tiny_assets, tmp_path):
    cfg = small_config(tiny_assets, tmp_path / "run", recipe="ft-mse", cache_latents=True, ema=False, lr=2e-3)
    data = prepare_data(cfg)
    lpips = LPIPS(pretrained_backbone=False)
    before = held_out_metrics(load_vae(cfg.model_id), data.val_patches, lpips)
    result = finetune(cfg, data.train_images, data.val_patches)
    base = load_file(tiny_assets.sd / "vae" / "diffusion_pytorch_model.safetensors")
    tuned = load_file(result.final_dir / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(base[k], tuned[k]) for k in base if k.startswith(("encoder.", "quant_conv.")))
    assert any(not torch.equal(base[k], tuned[k]) for k in base if k.startswith("decoder."))
    after = held_out_metrics(load_vae(str(result.final_dir)), data.val_patches, lpips)
    assert after["psnr"] > before["psnr"] + 1.0, (before, after)


def test_module_entry_point_trains_from_the_saved_config(tiny_assets, tmp_path):
    cfg = small_config(tiny_assets, tmp_path / "run", max_steps=4, n_val_patches=4, ema=False)
    path = cfg.save()
    done = subprocess.run([sys.executable, "-m", "sdnb.train", str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Memory plan, SD VAE (encoder and decoder), on a 16 GB Tesla T4 (Colab)" in done.stdout
    vae = load_vae(str(tmp_path / "run"))  # a run folder loads through its final/
    assert vae.config.latent_channels == 4
    assert json.loads(path.read_text())["stage"] == "vae"


def test_cached_latents_encode_only_what_the_run_uses(tiny_assets, tmp_path):
    """A 2-step run of batch 4 encodes 8 patches of a pool of 64 up front; any other patch asked for later is encoded
    then, the same as if the whole pool had been cached."""
    from sdnb.train.batches import items_used
    from sdnb.vae.data import PatchDataset, PatchLatents

    cfg = small_config(tiny_assets, tmp_path / "run", recipe="ft-mse", cache_latents=True)
    data = prepare_data(cfg)
    vae = load_vae(cfg.model_id)
    patches = PatchDataset(data.train_images, cfg.patch_size, cfg.patches_per_epoch, seed=cfg.seed)
    used = items_used(len(patches), 4, cfg.seed, micro_batches=2)
    assert len(used) == 8 and len(items_used(64, 4, 0, micro_batches=100)) == 64
    short = PatchLatents(patches, vae, needed=used, progress=False)
    assert len(short) == 64 and sorted(short.cache) == used
    whole = PatchLatents(patches, vae, progress=False)
    other = next(i for i in range(64) if i not in used)
    for i in (used[0], other):
        assert all(torch.allclose(short[i][k], whole[i][k], atol=1e-5) for k in ("images", "mean", "std"))
