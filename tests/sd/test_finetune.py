"""SD fine-tuning on the tiny SD: the step's targets, the stable validation loss, latent caching, two stages
with resume, weights-only mirroring, the over-fitting flag, and 03_sd_finetune run by papermill."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from sdnb.config import ConfigError
from sdnb.data import CaptionedImage, read_captions, scan
from sdnb.data.images import load_rgb
from sdnb.sd import SDConfig, build_datasets, finetune, load_parts
from sdnb.sd import outputs as sd_outputs
from sdnb.train import read_log

CAPTIONS = ["a red flower in a garden", "a cat on a sofa", "a rocket on a launch pad", "a cup of coffee",
            "galaxies in deep space", "a portrait of an astronaut", "a microscope image of tissue", "a colour wheel"]


@pytest.fixture(scope="module")
def sd_dir(tiny_assets) -> Path:
    return Path(tiny_assets.sd)


@pytest.fixture(scope="module")
def captioned(tiny_assets, tmp_path_factory) -> Path:
    """Eight captioned images of mixed aspect ratios (1:1, 2:1, 1:2) cut from the tiny photos, with .txt sidecars."""
    out = tmp_path_factory.mktemp("captioned")
    photos = [load_rgb(r.path) for r in scan(tiny_assets.photos, progress=False).ok]
    for i, caption in enumerate(CAPTIONS):
        image = photos[i % len(photos)]
        w, h = image.size
        image = image.crop([(0, 0, w, h), (0, 0, w, h // 2), (w // 2, 0, w, h)][i % 3])
        image.thumbnail((160, 160), Image.BICUBIC)
        image.save(out / f"img{i}.jpg", quality=92)
        (out / f"img{i}.txt").write_text(caption)
    return out


def config(run_dir: Path, sd_dir: Path, data_dir: Path, **more) -> SDConfig:
    base = dict(run_dir=str(run_dir), data_dir=str(data_dir), model_id=str(sd_dir), device="cpu", mixed_precision="no",
                resolution=64, max_steps=6, max_epochs=0, lr=1e-4, validate_every=3, checkpoint_every=3,
                checkpoint_minutes=0, log_every=1, val_fraction=0.25, sample_prompts=["a cat", "a rocket"],
                sample_cfg_scales=[7.0, 1.01], sample_steps=2, gradient_checkpointing=False)
    return SDConfig(**{**base, **more})


def test_loss_targets_follow_the_prediction_type_and_min_snr_weights():
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from sdnb.sd.model import diffusion_loss

    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 990])
    for kind in ("epsilon", "v_prediction"):
        sched = DDPMScheduler(prediction_type=kind)
        target = noise if kind == "epsilon" else sched.get_velocity(latents, noise, t)
        perfect = lambda x, t_, s, return_dict: (target,)  # noqa: E731  a model that predicts the target exactly
        assert diffusion_loss(perfect, latents, None, sched, noise, t).abs().max() == 0
        off = lambda x, t_, s, return_dict: (target + 1,)  # noqa: E731  off by one everywhere: MSE 1
        assert torch.allclose(diffusion_loss(off, latents, None, sched, noise, t), torch.ones(3))
        snr = compute_snr(sched, t)
        expected = torch.clamp(snr, max=5.0) / (snr + 1 if kind == "v_prediction" else snr)
        assert torch.allclose(diffusion_loss(off, latents, None, sched, noise, t, snr_gamma=5.0), expected)


def test_stable_validation_loss_is_the_same_twice_for_the_same_weights(sd_dir, captioned):
    from sdnb.sd import BucketDataset
    from sdnb.sd.model import StableValidation

    parts = load_parts(str(sd_dir))
    records = read_captions(captioned, progress=False)[:3]
    val = BucketDataset(records, 64, parts.tokenizer, augment=False)
    first = StableValidation(parts, val, seed=0)
    torch.manual_seed(1)
    a = first(parts.unet)
    torch.manual_seed(2)  # the global RNG does not matter
    assert first(parts.unet) == a
    assert StableValidation(parts, val, seed=0)(parts.unet) == a  # fixed per image, not per evaluator
    assert StableValidation(parts, val, seed=1)(parts.unet) != a
    with torch.no_grad():
        next(parts.unet.parameters()).add_(0.05)
    assert first(parts.unet) != a  # it moves when the weights do


def test_cached_latents_give_the_same_loss_as_encoding_every_step(sd_dir, captioned):
    from torch.utils.data import default_collate

    from sdnb.sd.data import ImageLatents
    from sdnb.sd.model import make_step_fn, trainable_models

    parts = load_parts(str(sd_dir))
    cfg = config(Path("unused"), sd_dir, captioned, crop_jitter=0.0)
    models = trainable_models(parts)
    train_ds, batches, _ = build_datasets(cfg, read_captions(captioned, progress=False), [], parts.tokenizer)
    cached = ImageLatents(train_ds, parts, torch.device("cpu"))
    step = make_step_fn(parts, noise_offset=0.0)
    for indices in batches(0)[:2]:
        losses = []
        for ds in (train_ds, cached):
            torch.manual_seed(0)
            losses.append(step(models, default_collate([ds[i] for i in indices]))["loss"].item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    with pytest.raises(ConfigError, match="cache_latents=True"):
        config(Path("unused"), sd_dir, captioned, cache_latents=True)  # crop jitter is on by default


def test_two_stages_continue_the_step_count_and_the_final_pipeline_loads(sd_dir, captioned, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from sdnb.sd import train_from_config

    run, drive = tmp_path / "run", tmp_path / "drive"
    cfg = config(run, sd_dir, captioned, sync_dir=str(drive), sync_what="weights", keep_checkpoints=1,
                 vae_path=str(sd_dir))  # a folder holding vae/ (as a 02 run holds final/)
    train_from_config(cfg.to_dict())
    rows = read_log(run / "log.csv")
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 3, 6]
    assert sorted(p.name for p in (run / "samples").glob("step-*.png")) == \
        ["step-000000.png", "step-000003.png", "step-000006.png"]
    stage2 = config(run, sd_dir, captioned, sync_dir=str(drive), sync_what="weights", keep_checkpoints=1,
                    resume="latest", max_steps=9, lr=5e-5, vae_path=str(sd_dir))  # the same VAE: a refused change
    train_from_config(stage2.to_dict())
    rows = read_log(run / "log.csv")
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 10))  # the count went on from 6
    assert {r["lr"] for r in rows if "loss" in r and r["step"] > 6} == {5e-5}
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 3, 6, 9]
    assert (run / "checkpoints" / "step-000009").is_dir()
    # weights-only mirror: fp16 UNets (the newest keep_checkpoints) and the final pipeline, no training states
    assert [p.name for p in (drive / "weights").iterdir()] == ["step-000009"]
    assert not (drive / "checkpoints").exists() and (drive / "final" / "model_index.json").exists()
    unet = UNet2DConditionModel.from_pretrained(drive / "weights" / "step-000009" / "unet", variant="fp16")
    pipe = StableDiffusionPipeline.from_pretrained(run / "final")  # final_weights="fp16": loads as fp32
    assert pipe.unet.dtype == torch.float32 and torch.equal(unet.conv_in.weight, pipe.unet.conv_in.weight)
    from safetensors.torch import load_file
    assert {t.dtype for t in load_file(run / "final" / "unet" / "diffusion_pytorch_model.safetensors").values()} == \
        {torch.float16}
    image = pipe("a cat", num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3) and (image == image).all()
    metrics = json.loads((run / "metrics.json").read_text())["training"]
    assert metrics["step"] == 9 and metrics["val_loss_end"] is not None and not metrics["overfitting"]
    assert (run / "grids" / "samples_by_checkpoint.png").stat().st_size > 5_000


def synthetic(folder: Path) -> list:
    """Two captioned images unlike any photo: red/blue stripes and a green checkerboard."""
    import numpy as np

    y, x = np.mgrid[0:128, 0:128]
    stripes = np.zeros((128, 128, 3), np.uint8)
    stripes[..., 0] = 255 * ((y // 8) % 2)
    stripes[..., 2] = 255 - stripes[..., 0]
    checks = np.zeros((128, 128, 3), np.uint8)
    checks[..., 1], checks[..., 0] = 255 * (((x // 8) + (y // 8)) % 2), 128
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for name, array, caption in (("stripes", stripes, "red and blue stripes"), ("checks", checks, "a green checkerboard")):
        Image.fromarray(array).save(folder / f"{name}.png")
        records.append(CaptionedImage(folder / f"{name}.png", caption, 128, 128))
    return records


def test_overfitting_is_flagged_on_a_run_made_to_overfit(sd_dir, tiny_assets, tmp_path):
    """A UNet that has learnt some photos (and so generalises to held-out ones) is fine-tuned at a high lr on two
    unrelated images: the held-out photos' validation loss rises while the training loss falls."""
    from sdnb.sd import overfit_report

    photos = [CaptionedImage(r.path, f"a photograph of a {r.path.stem}", r.width, r.height)
              for r in scan(tiny_assets.photos, progress=False).ok]
    half = len(photos) // 2
    common = dict(crop_jitter=0.0, noise_offset=0.0, sample_prompts=[], cache_latents=True, log_every=5)
    pre = config(tmp_path / "pre", sd_dir, tmp_path, lr=2e-3, max_steps=80, validate_every=0, checkpoint_every=0, **common)
    finetune(pre, load_parts(str(sd_dir)), *build_datasets(pre, photos[:half], []))
    cfg = config(tmp_path / "run", pre.path / "final", tmp_path, lr=3e-3, max_steps=40, validate_every=10,
                 checkpoint_every=10, **common)
    finetune(cfg, load_parts(str(cfg.model_id)), *build_datasets(cfg, synthetic(tmp_path / "two"), photos[half:]))
    report = overfit_report(cfg.path, cfg.overfit_patience)
    rows = read_log(cfg.path / "log.csv")
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert report.overfitting, (str(report), val)
    assert val[-1] > 1.2 * min(val) and report.best_val == min(val) and report.best_step < 40
    assert report.best_weights == cfg.path / "best" and f"best so far: step {report.best_step}" in str(report).lower()
    assert json.loads((cfg.path / "best" / "best.json").read_text())["step"] == report.best_step
    assert report.best_checkpoint is not None and report.best_checkpoint.parent == cfg.path / "checkpoints"


def test_drive_budget_warns_and_picks_weights_when_full_states_do_not_fit(sd_dir, tmp_path, monkeypatch):
    parts = load_parts(str(sd_dir))
    cfg = config(tmp_path / "run", sd_dir, tmp_path, sync_dir=str(tmp_path / "drive"))
    budget = sd_outputs.drive_budget(cfg, parts)
    n = sum(p.numel() for p in parts.unet.parameters())
    assert budget.checkpoint_gb == pytest.approx(n * 12 / 1024 ** 3) and budget.weights_gb == pytest.approx(n * 2 / 1024 ** 3)
    assert budget.sync_what == "full"  # this disk has room
    monkeypatch.setattr(sd_outputs, "_free_gb", lambda path: 2.5 * budget.checkpoint_gb)
    assert sd_outputs.drive_budget(cfg, parts).sync_what == "weights"
    full = sd_outputs.drive_budget(config(tmp_path / "run", sd_dir, tmp_path, sync_dir=str(tmp_path / "drive"),
                                          sync_what="full", keep_checkpoints=3), parts)
    assert "WARNING: sync_dir will run out of space" in str(full)


def test_lora_trains_resumes_bitwise_and_checkpoints_only_the_adapter(sd_dir, captioned, tmp_path, capsys, one_thread):
    """lora_rank=4: 4 steps straight (logged to TensorBoard) vs 2 steps, then resume="latest" to 4 (a validation at
    step 2 in between): the same adapter bitwise, and each checkpoint holds only the adapter and its optimizer state."""
    from safetensors.torch import load_file

    from sdnb.data import split_by_image
    from sdnb.models import load_pipeline
    from tests.helpers import tensorboard_events

    def run(name: str, **more) -> SDConfig:
        cfg = config(tmp_path / name, sd_dir, captioned, **{**dict(lora_rank=4, lr=1e-3, max_steps=4, validate_every=2,
                                                                    checkpoint_every=2, sample_cfg_scales=[7.0]), **more})
        train, val = split_by_image(read_captions(captioned, progress=False), cfg.val_fraction, cfg.seed)
        finetune(cfg, load_parts(str(sd_dir)), *build_datasets(cfg, train, val))
        return cfg

    straight = run("straight", log_with="tensorboard", sample_prompts=["a cat"]).path
    out = capsys.readouterr().out
    assert "LoRA rank 4 (alpha 4) of unet: 9,984 trainable parameters of 802,948 (1.24%)" in out
    assert "Memory plan, SD UNet, on this CPU" in out and "on a 16 GB Tesla T4 (Colab)" in out  # before training
    assert out.index("Memory plan") < out.index("LoRA rank 4 (alpha 4) of unet")
    run("resumed", max_steps=2, sample_prompts=[])
    resumed = run("resumed", resume="latest", sample_prompts=[]).path
    full = run("full", lora_rank=0, lr=1e-4, max_steps=2, sample_prompts=[]).path
    weights = [load_file(p / "final" / "pytorch_lora_weights.safetensors") for p in (straight, resumed)]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    losses = [[(r["step"], r.get("loss"), r.get("val_loss")) for r in read_log(p / "log.csv")] for p in (straight, resumed)]
    assert losses[0] == losses[1] and len(losses[0]) == 7  # 4 losses, validation at 0, 2 and 4

    size = lambda p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file())  # noqa: E731
    lora_ckpt, full_ckpt = straight / "checkpoints" / "step-000004", full / "checkpoints" / "step-000002"
    assert size(lora_ckpt) < 0.1 * size(full_ckpt), (size(lora_ckpt), size(full_ckpt))
    assert all(".lora_" in k for k in load_file(lora_ckpt / "model.safetensors"))
    # final/ and best/ hold the adapter; sdnb.models loads it over its base model
    assert (straight / "best" / "pytorch_lora_weights.safetensors").is_file()
    pipe, base = load_pipeline(str(straight)), load_pipeline(str(sd_dir))
    assert pipe.unet.peft_config and not torch.equal(*(p("a cat", num_inference_steps=2, height=64, width=64,
        output_type="pt", generator=torch.Generator().manual_seed(0)).images for p in (pipe, base)))
    # TensorBoard: the loss, the validation loss and the sample grids, read back with TensorBoard's reader
    scalars, images = tensorboard_events(straight / "sdnb")
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3, 4] and [s for s, _ in scalars["val_loss"]] == [0, 2, 4]
    assert [v for _, v in scalars["loss"]] == pytest.approx([r[1] for r in losses[0] if r[1] is not None])
    assert [s for s, w, h in images["samples"] if w > 64] == [2, 4]


def test_notebook_03_runs_headless_on_the_tiny_model(sd_dir, captioned, tmp_path, tiny_single_file):
    """03 from a base model given as one .safetensors file (its configuration from the pipeline folder, offline),
    training a LoRA; final/ holds the adapter, export/ the kohya file the UIs load."""
    from sdnb.demo import run_notebook
    from sdnb.models import load_pipeline

    params = dict(run_dir=str(tmp_path / "03"), data_dir=str(captioned), model_id=str(tiny_single_file),
                  model_config=str(sd_dir), lora_rank=4, lr=1e-3, device="cpu", mixed_precision="no", sync_dir="", seed=0,
                  resolution=64, max_steps=6, max_epochs=0, validate_every=3, checkpoint_every=3, log_every=1,
                  sample_steps=2, sample_prompts=["a cat", "a rocket"], val_fraction=0.25)
    run_notebook("03_sd_finetune", tmp_path, params)
    run = tmp_path / "03"
    for name in ("dataset", "batches", "loss", "samples_by_checkpoint"):
        assert (run / "grids" / f"{name}.png").stat().st_size > 5_000, name
    assert [r["step"] for r in read_log(run / "log.csv") if "val_loss" in r] == [0, 3, 6]
    assert sorted(p.name for p in (run / "final").iterdir()) == ["pytorch_lora_weights.safetensors", "sdnb_lora.json"]
    assert json.loads((run / "final" / "sdnb_lora.json").read_text())["model_id"] == str(tiny_single_file)
    assert load_pipeline(str(run)).unet.peft_config  # the single-file base with the adapter
    assert (run / "export" / "03-lora.safetensors").stat().st_size > 10_000


def test_sd15_full_states_fit_a_15_gb_drive_with_8bit_adamw_and_an_fp16_final(sd_dir, tmp_path, monkeypatch):
    """SD 1.5's real shapes (on the meta device): two full checkpoints with 8-bit AdamW and the fp16 final pipeline fit
    the 15 GB of a free Google Drive; with AdamW or an fp32 final they do not. Printed in GiB, as computed."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdnb.demo.fullsize import SD15_TEXT_ENCODER, SD15_UNET, SD15_VAE
    from sdnb.sd.model import SDParts

    with torch.device("meta"):
        parts = SDParts(UNet2DConditionModel.from_config(SD15_UNET), AutoencoderKL.from_config(SD15_VAE),
                        CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER)), None, None, None)
    monkeypatch.setattr(sd_outputs, "_free_gb", lambda path: 15e9 / 1024 ** 3)  # a free Google Drive
    monkeypatch.setattr(sd_outputs, "resolve_optimizer", lambda name, device: name)  # as on a GPU with bitsandbytes
    budget = lambda **kw: sd_outputs.drive_budget(config(tmp_path / "run", sd_dir, tmp_path,  # noqa: E731
                                                         sync_dir=str(tmp_path / "drive"), **kw), parts)
    assert budget(optimizer="adamw8bit").sync_what == "full"
    assert budget(optimizer="adamw").sync_what == budget(optimizer="adamw8bit", final_weights="fp32").sync_what == \
        "weights"
    text = str(budget(optimizer="adamw8bit"))
    assert "one checkpoint (full training state): 4.80 GiB" in text and "final pipeline: 1.99 GiB" in text
    assert " GB" not in text


def test_halved_weights_load_as_fp32_or_as_the_fp16_variant(tmp_path):
    from diffusers import AutoencoderKL

    from sdnb.demo.models import tiny_vae

    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "a")
    vae.save_pretrained(tmp_path / "b")
    sd_outputs.halve_weights(tmp_path / "a")
    sd_outputs.halve_weights(tmp_path / "b", keep_fp32=True)
    half, full = AutoencoderKL.from_pretrained(tmp_path / "a"), AutoencoderKL.from_pretrained(tmp_path / "b")
    variant = AutoencoderKL.from_pretrained(tmp_path / "b", variant="fp16", dtype=torch.float16)
    weight = vae.decoder.conv_out.weight
    assert half.dtype == torch.float32 and torch.equal(half.decoder.conv_out.weight, weight.half().float())
    assert torch.equal(full.decoder.conv_out.weight, weight)
    assert torch.equal(variant.decoder.conv_out.weight, weight.half())
    assert (tmp_path / "a" / "diffusion_pytorch_model.safetensors").stat().st_size < \
        0.6 * (tmp_path / "b" / "diffusion_pytorch_model.safetensors").stat().st_size
