"""Sharing on the Hub (sdnb.hub), offline: the model card and the upload folder are written locally; without a login
the push stops with what to do, before any network call (huggingface_hub's upload is never reached)."""

from __future__ import annotations

import json
import shutil

import pytest
from huggingface_hub import HfApi

from sdnb.hub import main, prepare_upload, push_to_hub
from sdnb.sd import SDConfig
from sdnb.stats import entry, write_metrics
from sdnb.vae import VAEConfig
from tests.helpers import lora_run


def vae_section(psnr_base: float, psnr_tuned: float) -> dict:
    return {"description": "16 held-out patches of 32 px", "models": {
        "base": {"psnr": entry(psnr_base, (psnr_base - 1, psnr_base + 1), 16)},
        "finetuned": {"psnr": entry(psnr_tuned, (psnr_tuned - 1, psnr_tuned + 1), 16)}}}


@pytest.fixture
def vae_run(tiny_assets, tmp_path):
    """A finished 02 run: config, log, final/ and its metrics.json; beside it a 04 run that compared it."""
    run = tmp_path / "runs" / "02_vae_finetune"
    VAEConfig(run_dir=str(run), image_dir="/content/drive/MyDrive/FIVES/train", max_steps=120).save()
    shutil.copytree(tiny_assets.sd / "vae", run / "final")
    (run / "log.csv").write_text("step,epoch,loss\n10,0.1,0.5\n120,1.2,0.2\n")
    write_metrics(run / "metrics.json", vae=vae_section(20.5, 26.25))
    compare = tmp_path / "runs" / "04_compare"
    compare.mkdir()
    (compare / "config.json").write_text(json.dumps({"stage": "compare", "finetuned_vae": str(run / "final")}))
    write_metrics(compare / "metrics.json", vae=vae_section(20.75, 27.5))
    return run


def test_card_states_base_data_recipe_steps_and_both_runs_numbers(vae_run):
    folder = prepare_upload(vae_run, "someone/fundus-vae")
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nbase_model: CompVis/stable-diffusion-v1-4\nlibrary_name: diffusers\n")
    assert ("A fine-tuned VAE of `CompVis/stable-diffusion-v1-4`, trained with sdnb for 120 steps on the images of "
            "`FIVES/train`") in card
    assert "/content/drive" not in card  # no local paths on a public page
    assert "- recipe: sdnb" in card and "- lr: 0.0001" in card and "- steps: 120" in card
    assert 'AutoencoderKL.from_pretrained("someone/fundus-vae")' in card
    assert "**VAE comparison (this run)**" in card and "| PSNR | 20.5 [19.5, 21.5] n=16 | 26.25 [25.25, 27.25] n=16 |" in card
    assert "**VAE comparison (04_compare)**" in card and "27.5 [26.5, 28.5] n=16" in card
    weights = folder / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_ino == (vae_run / "final" / weights.name).stat().st_ino  # linked, not copied
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", weights.name]

    (vae_run.parent / "04_compare" / "config.json").write_text(json.dumps({"finetuned_vae": "elsewhere"}))
    assert "04_compare" not in prepare_upload(vae_run, "someone/fundus-vae").joinpath("README.md").read_text()


def test_lora_card_names_its_base_and_the_upload_leaves_local_bookkeeping_out(tiny_assets, tmp_path):
    run = tmp_path / "03_sd_finetune"
    lora_run(tiny_assets.sd, run)
    SDConfig(run_dir=str(run), model_id="stable-diffusion-v1-5/stable-diffusion-v1-5", lora_rank=4, lr=1e-4).save()
    folder = prepare_upload(run, "someone/photo-lora")
    card = (folder / "README.md").read_text()
    assert "base_model_relation: adapter" in card and "pipeline_tag: text-to-image" in card and "- lora" in card
    assert 'pipe.load_lora_weights("someone/photo-lora")' in card and "- lora_rank: 4" in card
    assert "No held-out numbers yet: run 04_compare on this run" in card
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "pytorch_lora_weights.safetensors"]


def test_push_without_a_login_says_what_to_do_and_never_uploads(vae_run, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no stored token either
    monkeypatch.setattr("sdnb.hub.get_token", lambda: None)

    def no_network(*args, **kwargs):
        raise AssertionError("the Hub was called in a test")

    monkeypatch.setattr(HfApi, "create_repo", no_network)
    monkeypatch.setattr(HfApi, "upload_folder", no_network)
    with pytest.raises(PermissionError, match=r"hub_repo_id='someone/fundus-vae': not logged in.*HF_TOKEN.*hub"):
        push_to_hub(vae_run, "someone/fundus-vae")
    main([str(vae_run), "someone/fundus-vae", "--dry-run"])  # the CLI's local half
    assert (vae_run / "hub" / "README.md").is_file()
    with pytest.raises(FileNotFoundError, match="no final/"):
        prepare_upload(tmp_path, "someone/x")
