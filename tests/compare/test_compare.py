"""04_compare's library on the tiny models: metrics that behave (identical models: PSNR cap, FID 0, KL 0; a damaged
model scores worse), bootstrap intervals, and every way of naming a model (run folders, pipeline folders, hub ids)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from sdnb import metrics, models, stats
from sdnb.compare import sd as compare_sd
from sdnb.compare import xyz
from sdnb.compare.config import SCHEDULERS, CompareConfig
from sdnb.config import ConfigError
from sdnb.demo.clip import build_tiny_clip
from sdnb.vae import compare
from tests.compare.helpers import TinyFeatures, damage


@pytest.fixture(scope="module")
def damaged(tiny_assets, tmp_path_factory):
    """A tiny SD pipeline folder with a noisy UNet, and a VAE folder with a noisy decoder (and a 02-style run folder)."""
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("damaged")
    vae = models.load_vae(str(tiny_assets.sd))
    damage(vae.decoder, 0.5)
    vae.save_pretrained(root / "vae")
    (root / "run02").mkdir()
    shutil.copytree(root / "vae", root / "run02" / "final")
    shutil.copytree(tiny_assets.sd, root / "sd")
    unet = UNet2DConditionModel.from_pretrained(tiny_assets.sd / "unet")
    damage(unet, 3.0).save_pretrained(root / "sd" / "unet")
    (root / "run03").mkdir()
    shutil.copytree(tiny_assets.sd, root / "run03" / "final")
    return root


@pytest.fixture(scope="module")
def clip_dir(tiny_assets, tmp_path_factory):
    """The tiny CLIP of the embedded default (or one built from its SD tokenizer)."""
    found = getattr(tiny_assets, "clip", None)
    return found if found else build_tiny_clip(tiny_assets.sd / "tokenizer", tmp_path_factory.mktemp("clip"))


# --- numbers against references ---

def test_fid_matches_torchmetrics_and_the_bootstrap_formula():
    from torchmetrics.image.fid import FrechetInceptionDistance

    g = torch.Generator().manual_seed(0)
    for n, m in [(12, 20), (80, 90)]:  # fewer samples than features (low-rank path), and more (torchmetrics path)
        a = torch.randn(n, 64, generator=g, dtype=torch.float64)
        b = torch.randn(m, 64, generator=g, dtype=torch.float64) * 1.3 + 0.2
        fid = FrechetInceptionDistance(feature=metrics.PrecomputedFeatures(64)).set_dtype(torch.float64)
        fid.update(a, real=True)
        fid.update(b, real=False)
        reference = float(fid.compute())
        assert metrics.fid_from_features(a, b) == pytest.approx(reference, rel=1e-6)
        assert metrics.fid_resampler(a, b)(np.arange(n), np.arange(m)) == pytest.approx(reference, rel=1e-6)
        assert metrics.fid_from_features(a, a) == pytest.approx(0, abs=1e-6)


def test_bootstrap_intervals_are_seeded_and_cover_the_estimate():
    values = np.random.default_rng(0).normal(3.0, 1.0, 50)
    lo, hi = stats.mean_ci(values, 1000, seed=0)
    assert lo < values.mean() < hi and (lo, hi) == stats.mean_ci(values, 1000, seed=0)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(30, 64, generator=g), torch.randn(40, 64, generator=g) + 0.3
    e = stats.fid_entry(a, b, paired=False, n_bootstrap=300)
    assert e["ci95"][0] <= e["value"] <= e["ci95"][1] and e["n"] == 40 and e["n_ref"] == 30


def test_kid_subset_size_adapts_to_small_sets():
    g = torch.Generator().manual_seed(0)
    kid = metrics.kid_from_features(torch.randn(5, 16, generator=g), torch.randn(7, 16, generator=g) + 2)
    assert kid["subset_size"] == 5 and kid["mean"] > 0


def test_cluster_kl_is_zero_for_identical_sets_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    data = torch.cat([torch.randn(20, 8, generator=g), torch.randn(20, 8, generator=g) + 6])
    shifted = torch.randn(40, 8, generator=g) + 12
    out = compare_sd.cluster_kl({"original": data, "same": data.clone(), "shifted": shifted},
                                [("original", "same"), ("original", "shifted")], n_clusters=3, n_bootstrap=200)
    assert out["original || same"]["value"] == 0
    assert out["original || shifted"]["value"] > 1.0


# --- the VAE comparison ---

def test_vae_comparison_identical_models_and_a_damaged_decoder(tiny_assets, damaged, tmp_path):
    vaes = compare.load_vaes(str(tiny_assets.sd), str(tiny_assets.sd / "vae"), str(damaged / "run02"))
    assert list(vaes) == ["base", "finetuned", "control"]
    images, description = compare.held_out_images(tiny_assets.fundus_val, 32, 12, seed=0, cache_dir=tmp_path)
    assert images.shape == (12, 3, 32, 32) and "12 fixed 32x32 patches" in description
    lpips = metrics.LPIPS("alex", pretrained_backbone=False)
    result = compare.compare_vaes(vaes, images, lpips, TinyFeatures(), n_bootstrap=200, description=description)
    m = result.metrics
    same = m["change"]["finetuned vs base"]  # identical weights from a pipeline folder and from a VAE folder
    assert same["psnr"]["value"] == metrics.PSNR_CAP and same["ssim"]["value"] == pytest.approx(1.0)
    assert same["lpips"]["value"] == 0 and same["rfid"]["value"] == pytest.approx(0, abs=1e-6)
    tie = m["wins"]["finetuned vs base"]["psnr"]
    assert tie["value"] == 0 and tie["ties"] == 1.0
    clean, bad = m["models"]["base"], m["models"]["control"]  # "control" is the damaged decoder here
    assert bad["psnr"]["value"] < clean["psnr"]["value"] and bad["ssim"]["value"] < clean["ssim"]["value"]
    assert bad["lpips"]["value"] > clean["lpips"]["value"] and bad["rfid"]["value"] > clean["rfid"]["value"]
    assert m["wins"]["control vs base"]["psnr"]["value"] < 0.5
    for row in m["models"].values():  # every number with its interval and its sample size
        assert all(e["n"] == 12 and e["ci95"][0] <= e["value"] <= e["ci95"][1] for e in row.values())
    assert m["labels"]["lpips"] == "LPIPS (alex, random backbone)"


def test_whole_images_through_each_vae_with_tiles(tiny_assets, tmp_path):
    from PIL import Image

    source = sorted(tiny_assets.fundus_val.glob("*.png"))[0]
    (tmp_path / "val").mkdir()
    Image.open(source).crop((100, 100, 230, 200)).save(tmp_path / "val" / "crop.png")  # 130x100: not a tile multiple
    vaes = compare.load_vaes(str(tiny_assets.sd), str(tiny_assets.sd))
    [(name, original, recons)] = compare.whole_images(vaes, tmp_path / "val", n=3, tile_size=64)
    assert name == "crop.png" and original.shape == (3, 100, 128) and set(recons) == {"base", "finetuned"}
    assert recons["base"].shape == original.shape and torch.equal(recons["base"], recons["finetuned"])
    untiled = compare.reconstruct(vaes["base"], original[None])  # blended tiles cost little against one pass
    assert metrics.psnr(recons["base"][None], original[None]) > metrics.psnr(untiled, original[None]) - 1.0


def test_vae_parameters_fail_naming_the_parameter(tiny_assets, tmp_path):
    with pytest.raises(FileNotFoundError, match="finetuned_vae="):
        compare.load_vaes(str(tiny_assets.sd), str(tmp_path))
    with pytest.raises(FileNotFoundError, match="image_dir="):
        compare.held_out_images(tmp_path / "missing", 32, 4)


# --- the SD comparison ---

def test_models_by_run_folder_pipeline_folder_or_hub_id(tiny_assets, damaged, tmp_path):
    assert models.pipeline_dir(str(damaged / "run03")) == str(damaged / "run03" / "final")
    assert models.pipeline_dir(str(tiny_assets.sd)) == str(tiny_assets.sd)
    assert models.pipeline_dir("stable-diffusion-v1-5/stable-diffusion-v1-5") == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    with pytest.raises(FileNotFoundError, match="base_model_id="):
        models.pipeline_dir(str(tmp_path), "base_model_id")
    with pytest.raises(FileNotFoundError, match="finetuned_model="):
        models.pipeline_dir("no/such/folder/here", "finetuned_model")


def test_sd_comparison_identical_models_and_a_damaged_unet(tiny_assets, damaged, clip_dir):
    base = models.load_pipeline(str(tiny_assets.sd), parameter="base_model_id")
    same = models.load_pipeline(str(damaged / "run03"))
    bad = models.load_pipeline(str(damaged / "sd"))
    prompts = compare_sd.choose_prompts(["a photograph of a cat", "a rocket at dusk"], [], 6)
    seeds = list(range(6))
    # the size and steps the photo-pre-trained tiny UNet draws photo-like images at (at 32 px / 3 steps it draws none)
    kw = dict(resolution=64, steps=10, guidance_scale=7.0, batch_size=6, progress=False)
    samples = {k: compare_sd.generate(p, prompts, seeds, **kw) for k, p in [("base", base), ("same", same), ("bad", bad)]}
    assert torch.equal(samples["base"], samples["same"])  # same weights, prompts and seeds: the same images
    train, _ = compare_sd.training_set(tiny_assets.photos, 64)
    run = lambda tuned: compare_sd.sd_metrics({"base": samples["base"], "finetuned": samples[tuned]}, prompts, train,  # noqa: E731
                                              TinyFeatures(), str(clip_dir), n_clusters=3, n_bootstrap=200)
    m_same, m_bad = run("same"), run("bad")
    assert m_same["between"]["finetuned vs base"]["fid"]["value"] == pytest.approx(0, abs=1e-6)
    assert m_same["kl"]["finetuned || base"]["value"] == 0
    assert m_same["models"]["finetuned"] == m_same["models"]["base"]
    assert m_same["between"]["finetuned vs base"]["train_distance"]["value"] == 0
    clean, worse = m_bad["models"]["base"], m_bad["models"]["finetuned"]
    assert worse["fid"]["value"] > clean["fid"]["value"] and worse["kid"]["value"] > clean["kid"]["value"]
    assert worse["train_distance"]["value"] > clean["train_distance"]["value"]  # further from the training photos
    assert m_bad["kl"]["original || finetuned"]["value"] > m_bad["kl"]["original || base"]["value"]
    assert m_bad["between"]["finetuned vs base"]["fid"]["value"] > 0
    assert clean["fid"]["n"] == 6 and clean["fid"]["n_ref"] == len(train) and clean["clip"]["n"] == 6
    assert 0 <= clean["clip"]["value"] <= 100 and "CLIP score" in m_bad["labels"]["clip"]


def test_clip_score_is_torchmetrics_definition(clip_dir, tmp_path):
    """Per-image CLIP score = max(100 * cosine of CLIP's image and text embeddings, 0), checked against transformers."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(clip_dir).eval()
    with torch.no_grad():  # a random tiny CLIP may put every pair below 0; flip its image side so scores are not all 0
        model.visual_projection.weight.neg_()
    model.save_pretrained(tmp_path)
    CLIPProcessor.from_pretrained(clip_dir).save_pretrained(tmp_path)
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    prompts = ["a cat", "a rocket at dusk", "a cup of coffee", "vessels of the retina", "a face", "a motorcycle"]
    scores, label = metrics.clip_scores(images, prompts, str(tmp_path))
    inputs = CLIPProcessor.from_pretrained(tmp_path)(text=prompts, images=list(metrics.to_uint8(images)),
                                                     return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    reference = (100 * (out.image_embeds * out.text_embeds).sum(-1)).clamp(min=0)
    assert reference.max() > 0 and torch.allclose(scores, reference, atol=1e-3)
    assert str(tmp_path) in label


def test_xyz_sheet_keeps_the_seed_and_loads_other_checkpoints(tiny_assets, damaged):
    pipes = {"base": models.load_pipeline(str(tiny_assets.sd))}
    loaded = []

    def load(ref):
        loaded.append(ref)
        return models.load_pipeline(ref)

    fixed = dict(cfg=7.0, steps=2, checkpoint="base", scheduler="", seed=3)
    sheets = xyz.xyz_sheet(pipes, load, {"scheduler": ["", "euler"], "checkpoint": ["base", str(damaged / "sd")]},
                                  "a cat", fixed, resolution=32)
    assert len(sheets) == 1 and loaded == [str(damaged / "sd")]
    fig = sheets[0][1]
    assert len(fig.axes) == 4 and "seed 3" in fig.get_suptitle()
    with pytest.raises(ValueError, match="xyz_axes"):
        xyz.xyz_sheet(pipes, load, {"colour": [1]}, "a cat", fixed)


def test_config_checks_the_comparison_parameters():
    with pytest.raises(ConfigError, match="scheduler"):
        CompareConfig(scheduler="heun")
    assert {CompareConfig(scheduler=name).scheduler for name in SCHEDULERS} == set(SCHEDULERS)
    with pytest.raises(ConfigError, match="xyz_axes"):
        CompareConfig(xyz_axes={"cfg": [1.0], "colour": ["red"]})
    with pytest.raises(ConfigError, match="xyz_axes"):
        CompareConfig(xyz_axes={"scheduler": ["heun"]})
    with pytest.raises(ConfigError, match="prompts"):
        CompareConfig(prompts=["a cat", 3])
    with pytest.raises(ValueError, match="prompts"):
        compare_sd.choose_prompts([], ["", ""], 4)
    assert compare_sd.choose_prompts([], ["a", "b"], 3) == ["a", "b", "a"]
