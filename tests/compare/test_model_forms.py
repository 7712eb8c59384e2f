"""04 finds the training data of each form `finetuned_model` accepts: a 03 run folder, its final/ (the notebook's
default form), a copy of final/ elsewhere, a LoRA run; a hub id knows none and says what to set. The default form runs
through the notebook itself: 03 for a few steps, then 04 on its final/ with its default prompts (the captions)."""

from __future__ import annotations

import json
import shutil

import pytest

from sdnb.compare.sd import choose_prompts, training_data_dir
from sdnb.demo import run_notebook


def fake_run(root, data, lora=False):
    """A 03 run folder as 03 leaves it: config.json (data_dir as given, relative or not) and final/ with its meta."""
    run = root / "03_sd_finetune"
    (run / "final").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"stage": "sd", "data_dir": "relative/train"}))
    meta = {"model_id": "base/model"} if lora else {"stage": "sd"}
    meta["data_dir"] = str(data)
    (run / "final" / ("sdnb_lora.json" if lora else "sdnb_run.json")).write_text(json.dumps(meta))
    return run


@pytest.mark.parametrize("lora", [False, True])
def test_run_folder_its_final_and_a_copy_of_final_find_the_training_data(tmp_path, lora):
    data = tmp_path / "train"
    run = fake_run(tmp_path, data, lora)
    copy = shutil.copytree(run / "final", tmp_path / "drive" / "my-model")
    for form in (run, run / "final", copy):
        assert training_data_dir(str(form)) == str(data)
    assert training_data_dir(str(run / "final"), "given") == "given"


def test_an_older_run_without_meta_falls_back_to_its_config(tmp_path):
    run = fake_run(tmp_path, tmp_path / "train")
    (run / "final" / "sdnb_run.json").unlink()
    assert training_data_dir(str(run)) == training_data_dir(str(run / "final")) == "relative/train"


def test_a_hub_id_knows_no_training_data_and_prompts_then_say_what_to_set():
    assert training_data_dir("stable-diffusion-v1-5/stable-diffusion-v1-5") == ""
    assert choose_prompts(["a cat"], [], 3) == ["a cat"] * 3
    with pytest.raises(ValueError, match="train_data_dir"):
        choose_prompts([], [], 3)


@pytest.fixture()
def captioned(tiny_assets, tmp_path):
    """The tiny photos with a caption sidecar each."""
    out = tmp_path / "captioned"
    out.mkdir()
    for photo in sorted(tiny_assets.photos.glob("*.png")):
        shutil.copy(photo, out / photo.name)
        (out / f"{photo.stem}.txt").write_text(f"a photograph of {photo.stem.replace('_', ' ')}")
    return out


def test_04_with_its_defaults_form_measures_against_the_03_training_data(tiny_assets, captioned, tmp_path, one_thread):
    """finetuned_model = "<03 run>/final" and prompts = [] as in 04's defaults: the prompts are the training captions
    and FID, KID and the cluster KL are measured against the training images 03 recorded."""
    common = dict(device="cpu", mixed_precision="no", seed=0, sync_dir="")
    run03 = tmp_path / "runs" / "03_sd_finetune"
    run_notebook("03_sd_finetune", tmp_path, dict(common, run_dir=str(run03), data_dir=str(captioned),
                 model_id=str(tiny_assets.sd), resolution=64, max_steps=2, max_epochs=0, validate_every=0,
                 checkpoint_every=0, log_every=1, sample_prompts=[], export_single_file=False, val_fraction=0.2))
    assert json.loads((run03 / "final" / "sdnb_run.json").read_text())["data_dir"] == str(captioned.resolve())
    run_notebook("04_compare", tmp_path, dict(common, run_dir=str(tmp_path / "04"), finetuned_vae="",
                 base_model_id=str(tiny_assets.sd), finetuned_model=str(run03 / "final"), n_images=4, resolution=32,
                 num_inference_steps=2, batch_size=4, xyz_axes={"cfg": [1.0, 7.0]}, fid_features="fid-helper",
                 clip_model_id=str(tiny_assets.clip), n_clusters=2, n_bootstrap=10))
    sd = json.loads((tmp_path / "04" / "metrics.json").read_text())["sd"]
    assert sd["n_train_images"] == len(list(captioned.glob("*.png")))  # every captioned image 03 was given
    for model in ("base", "finetuned"):
        assert {"fid", "kid", "clip"} <= set(sd["models"][model]), sd["models"][model]
    assert "original || finetuned" in sd["kl"]
    prompts = json.loads((tmp_path / "04" / "config.json").read_text())["prompts"]
    assert prompts == []  # the default: the captions were used
