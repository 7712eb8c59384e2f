"""The story the embedded default tells in miniature (issue 13): BLIP captions that depend on the image and name what
is in it, and a photo-pre-trained SD whose samples, fine-tuned by 03's demo recipe on the scope images that 01
captioned, move towards those training images, measured as 04 measures it."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdnb.caption import caption_folder, load_captioner
from sdnb.data import scan

# what is in each shipped image (file stem or scope source), as a person would name it
CONTENT = {"astronaut": "astronaut", "coffee": "coffee", "chelsea": "cat", "rocket": "rocket", "motorcycle": "motorcycle",
           "grace_hopper": "woman", "camera": "camera", "tissue": "tissue", "cells": "cells", "galaxies": "galaxies"}
GEN = dict(num_beams=4, min_length=5, max_length=20, repetition_penalty=1.4)  # 01's settings on the demo


def _content(path) -> str:
    stem = path.stem
    return CONTENT.get(stem) or CONTENT[stem.rsplit("_", 1)[0]]


@pytest.fixture(scope="module")
def captioner(tiny_assets):
    return load_captioner(tiny_assets.blip, "cpu")


def test_blip_captions_differ_by_image_and_name_its_content(tiny_assets, captioner):
    for folder, distinct in ((tiny_assets.photos, len(CONTENT) - 3), (tiny_assets.scope, 3)):
        files = sorted(folder.glob("*.png"))
        captions = captioner.caption([Image.open(f).convert("RGB") for f in files], **GEN)
        print(*(f"{f.name}: {c}" for f, c in zip(files, captions)), sep="\n")
        assert len(set(captions)) == distinct, captions  # one caption per kind of content, not one for everything
        for f, caption in zip(files, captions):
            assert _content(f) in caption.split(), (f.name, caption)


def test_blip_names_the_content_of_crops_it_was_not_shown(tiny_assets, captioner):
    """Views of the photos it never saw in training (other crops, other sizes): still mostly named right (chance: 1 in
    10 kinds of content)."""
    rng = np.random.default_rng(1234)
    right = total = 0
    for f in sorted(tiny_assets.photos.glob("*.png")):
        image = Image.open(f).convert("RGB")
        crops = []
        for _ in range(3):
            side = int(min(image.size) * rng.uniform(0.6, 0.9))
            x, y = int(rng.integers(image.width - side + 1)), int(rng.integers(image.height - side + 1))
            crops.append(image.crop((x, y, x + side, y + side)))
        captions = captioner.caption(crops, **GEN)
        right += sum(_content(f) in c.split() for c in captions)
        total += len(captions)
    print(f"unseen crops named right: {right} of {total}")
    assert right >= 0.7 * total, (right, total)


def test_fine_tuning_moves_samples_towards_the_training_images(tiny_assets, captioner, tmp_path, one_thread):
    """01 captions the scope images, 03 fine-tunes on them with the demo's recipe, 04 generates the same prompts and
    seeds through base and fine-tuned: the fine-tuned samples are closer to the training images, with a bootstrap
    interval (over prompts and seeds) of the paired difference above 0."""
    from sdnb.compare.sd import distance_to_training_set, generate, training_set
    from sdnb.demo import demo_parameters
    from sdnb.models import load_pipeline
    from sdnb.sd import SDConfig, train_from_config

    train_dir = tmp_path / "train"
    caption_folder(scan(tiny_assets.scope, progress=False).ok, train_dir, captioner, progress=False, **GEN)
    recipe = demo_parameters(tiny_assets, tmp_path)["03_sd_finetune"]
    cfg = SDConfig(**{**recipe, "data_dir": str(train_dir), "run_dir": str(tmp_path / "03"), "validate_every": 0,
                      "checkpoint_every": 0, "checkpoint_minutes": 0, "sample_prompts": [], "export_single_file": False,
                      "gradient_checkpointing": False})
    train_from_config(cfg.to_dict())

    train, captions = training_set(train_dir, 64)
    prompts = [captions[i % len(captions)] for i in range(24)]
    samples = {name: generate(load_pipeline(ref), prompts, list(range(24)), 64, 10, 7.0, batch_size=8, progress=False)
               for name, ref in (("base", str(tiny_assets.sd)), ("finetuned", str(tmp_path / "03")))}
    out = {"models": {"base": {}, "finetuned": {}}, "between": {"finetuned vs base": {}}}
    labels = distance_to_training_set(samples, train, n_bootstrap=1000, seed=0, out=out)
    base, tuned = (out["models"][k]["train_distance"] for k in ("base", "finetuned"))
    closer = out["between"]["finetuned vs base"]["train_distance"]
    print(f"distance to the training set: base {base}, fine-tuned {tuned}; closer by {closer}")
    assert closer["n"] == 24 and closer["ci95"][0] > 0, closer
    assert tuned["ci95"][1] < base["value"], (base, tuned)
    assert "nearest training image" in labels["train_distance"]
