"""02's control run: the same recipe and steps on other images, in its own folder, resumable, measured on the same
held-out images; and the sentence that says where a gain comes from."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sdnb.config import ConfigError
from sdnb.train.resume_check import ConfigChangeError
from sdnb.vae import VAEConfig, control_config, finetune, finetune_control, prepare_data, verdict
from sdnb.vae.compare import _paired
from sdnb.vae.control import control_data, control_run

WEIGHTS = "diffusion_pytorch_model.safetensors"


def small(tiny_assets, run_dir, **overrides) -> VAEConfig:
    values = dict(run_dir=str(run_dir), image_dir=str(tiny_assets.fundus_train), val_image_dir=str(tiny_assets.fundus_val),
                  control_image_dir=str(tiny_assets.photos), model_id=str(tiny_assets.sd), patch_size=32,
                  patches_per_epoch=16, n_val_patches=4, max_steps=4, batch_size=4, lr=1e-3, device="cpu",
                  mixed_precision="no", checkpoint_every=2, checkpoint_minutes=0, log_every=1, validate_every=0,
                  n_bootstrap=0, export_single_file=False)
    return VAEConfig(**{**values, **overrides})


def test_control_trains_in_its_own_folder_on_the_same_held_out_patches_and_resumes(tiny_assets, tmp_path, one_thread):
    cfg = small(tiny_assets, tmp_path / "run")
    cfg.save()
    data = prepare_data(cfg)
    finetune(cfg, data.train_images, data.val_patches)
    tuned = {p.relative_to(cfg.path): p.read_bytes() for p in cfg.path.rglob("*") if p.is_file()}
    result = finetune_control(cfg, data)

    control = cfg.path / "control"
    assert result.final_dir == control / "final" and result.step == cfg.max_steps
    saved = json.loads((control / "config.json").read_text())
    assert saved["is_control"] and saved["run_dir"] == str(control) and saved["image_dir"] == cfg.image_dir
    assert {k: v for k, v in saved.items() if k not in ("run_dir", "is_control")} == \
        {k: v for k, v in cfg.to_dict().items() if k not in ("run_dir", "is_control")}  # the same recipe and steps
    assert (control / "log.csv").is_file() and sorted(p.name for p in (control / "checkpoints").iterdir())
    assert {p.relative_to(cfg.path): p.read_bytes() for p in cfg.path.rglob("*")  # the tuned run is untouched
            if p.is_file() and "control" not in p.relative_to(cfg.path).parts} == tuned
    weights = [load_file(d / "final" / WEIGHTS) for d in (cfg.path, control)]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # other images, other weights

    ccfg = VAEConfig.load(control / "config.json")  # what `python -m sdnb.train run/control/config.json` trains on
    cdata = control_data(ccfg, prepare_data(ccfg))
    assert torch.equal(cdata.val_patches, data.val_patches)
    assert {p.parent for p in cdata.train_paths} == {tiny_assets.photos}

    again = finetune_control(small(tiny_assets, tmp_path / "run", max_steps=6, resume="latest"), data)
    assert again.step == 6 and "resuming from" in (control / "history.log").read_text()


def test_a_resumed_control_refuses_other_control_images_the_tuned_run_does_not(tiny_assets, tmp_path, one_thread):
    cfg = small(tiny_assets, tmp_path / "run", max_steps=2)
    cfg.save()
    data = prepare_data(cfg)
    finetune(cfg, data.train_images, data.val_patches)
    finetune_control(cfg, data)
    other = tmp_path / "other"
    other.mkdir()
    for p in sorted(tiny_assets.photos.iterdir())[:2]:
        (other / p.name).write_bytes(p.read_bytes())
    changed = small(tiny_assets, tmp_path / "run", max_steps=3, resume="latest", control_image_dir=str(other))
    with pytest.raises(ConfigChangeError, match="control_image_dir"):
        finetune_control(changed, data)
    assert finetune(changed, data.train_images, data.val_patches).step == 3  # the tuned run does not read it


def test_control_images_must_not_be_the_domain_images(tiny_assets, tmp_path):
    with pytest.raises(ConfigError, match="control_image_dir="):
        small(tiny_assets, tmp_path, control_image_dir=str(tiny_assets.fundus_train.parent))
    with pytest.raises(ConfigError, match="control_image_dir=''"):
        control_config(small(tiny_assets, tmp_path, control_image_dir=""))
    assert finetune_control(small(tiny_assets, tmp_path, control_image_dir=""), None) is None


def test_04_finds_the_control_beside_a_02_run(tmp_path, capsys):
    (tmp_path / "run" / "control" / "final").mkdir(parents=True)
    assert control_run(str(tmp_path / "run" / "final"), "auto") == str(tmp_path / "run" / "control")
    assert control_run(str(tmp_path / "elsewhere"), "auto") == ""
    assert "no control run" in capsys.readouterr().out
    assert control_run(str(tmp_path / "run"), "some/vae") == "some/vae"


def synthetic(control_psnr: float, control_lpips: float, n: int = 40) -> dict:
    """Per-image metrics of base, fine-tuned (+3 dB, -0.05 LPIPS on every image) and a control, as compare_vaes
    measures them, with noise."""
    rng = np.random.default_rng(0)
    base = {"psnr": rng.normal(20, 1, n), "ssim": rng.uniform(0.5, 0.6, n), "lpips": rng.uniform(0.3, 0.4, n)}

    def shifted(psnr: float, lpips: float) -> dict:
        return {"psnr": base["psnr"] + psnr + rng.normal(0, 0.3, n), "ssim": base["ssim"],
                "lpips": base["lpips"] + lpips + rng.normal(0, 0.01, n)}

    per = {"base": base, "finetuned": shifted(3, -0.05), "control": shifted(control_psnr, control_lpips)}
    out: dict = {"n_images": n, "wins": {}, "difference": {}}
    for a, b in (("finetuned", "base"), ("control", "base"), ("finetuned", "control")):
        out["wins"][f"{a} vs {b}"], out["difference"][f"{a} vs {b}"] = _paired(per[a], per[b], 1000, 0)
    return out


def test_verdict_gain_from_the_domain_data():
    text = verdict(synthetic(1.0, -0.01), ["base", "finetuned", "control"])
    d = synthetic(1.0, -0.01)["difference"]["finetuned vs control"]["psnr"]
    assert f"PSNR {d['value']:+.3g} dB, 95% CI {d['ci95'][0]:+.3g} to {d['ci95'][1]:+.3g}" in text
    assert "beats the base" in text and "better on 100% of images" in text
    assert "the gain over the base comes from the domain data, not just from more training" in text


def test_verdict_gain_from_more_training():
    text = verdict(synthetic(3.0, -0.05), ["base", "finetuned", "control"])  # the control gained as much
    assert "beats the base" in text
    assert "the intervals include 0, so the finetuned VAE does not beat the control" in text
    assert "may be mostly more training, not the domain data" in text
    worse = verdict(synthetic(4.0, -0.07), ["base", "finetuned", "control"])
    assert "the control (the same recipe and steps on other images) is better on PSNR and LPIPS" in worse


def test_verdict_without_a_control_or_intervals():
    metrics = synthetic(1.0, -0.01)
    assert "No control was compared: part of a gain over the base may be just more training" in \
        verdict(metrics, ["base", "finetuned"])
    metrics["difference"]["finetuned vs base"]["psnr"]["ci95"] = None
    assert "no intervals" in verdict(metrics, ["base", "finetuned", "control"])
