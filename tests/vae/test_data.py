"""Patches of large images: decoded once, deterministic per (seed, epoch, index), split by image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdnb.data.images import find_images, split_by_image
from sdnb.vae import data as vae_data
from sdnb.vae.data import DecodedImages, PatchDataset, fixed_patches


def list_images(folder, parameter: str = "image_dir"):
    """The usable image files of a folder, as 02 reads them."""
    return [r.path for r in find_images(folder, parameter)]


@pytest.fixture()
def folder(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "images"
    d.mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(d / f"img{i}.png")
    Image.fromarray((rng.random((80, 80)) * 65535).astype(np.uint16)).save(d / "grey16.png")  # 16-bit grey
    Image.fromarray(rng.integers(0, 255, (20, 24, 4), dtype=np.uint8), "RGBA").save(d / "small_rgba.png")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 50)  # truncated
    (d / "notes.png").write_text("not an image")
    return d


def test_unreadable_files_are_named_and_skipped(folder, capsys):
    paths = list_images(folder)
    out = capsys.readouterr().out
    assert "broken.png" in out and "notes.png" in out
    assert {p.name for p in paths} == {"img0.png", "img1.png", "img2.png", "img3.png", "grey16.png", "small_rgba.png"}


def test_a_folder_without_usable_images_fails_naming_the_parameter(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="val_image_dir=.*no usable image"):
        list_images(tmp_path / "empty", "val_image_dir")
    with pytest.raises(FileNotFoundError, match="image_dir="):
        list_images(tmp_path / "missing")


def test_split_is_by_image_and_seeded(folder):
    paths = list_images(folder)
    train, val = split_by_image(paths, 0.34, seed=1)
    assert not set(train) & set(val) and len(train) + len(val) == len(paths) and len(val) == 2
    assert split_by_image(paths, 0.34, seed=1) == (train, val)


def test_patches_are_rgb_deterministic_and_decoded_once(folder, tmp_path, monkeypatch):
    paths = list_images(folder)
    images = DecodedImages(paths, tmp_path / "cache", min_side=32)
    ds = PatchDataset(images, 32, length=50, seed=3, hflip=True, vflip=True, rot90=True)
    first = torch.stack([ds[i] for i in range(50)])
    assert first.shape == (50, 3, 32, 32) and first.min() >= -1 and first.max() <= 1
    # decoding happened once per image: the cache holds one file each, and reading patches does not decode again
    assert len(list((tmp_path / "cache").glob("*.npy"))) == len(paths)
    monkeypatch.setattr(vae_data, "load_rgb", lambda p: pytest.fail(f"decoded {p} again"))
    fresh = PatchDataset(DecodedImages(paths, tmp_path / "cache", min_side=32), 32, 50, seed=3,
                         hflip=True, vflip=True, rot90=True)
    assert torch.equal(torch.stack([fresh[i] for i in range(50)]), first)
    fresh.set_epoch(1)
    assert not torch.equal(torch.stack([fresh[i] for i in range(50)]), first)


def test_small_images_are_padded_and_validation_patches_fixed(folder, tmp_path):
    images = DecodedImages(list_images(folder), tmp_path / "cache", min_side=64)
    small = [i for i, p in enumerate(images.paths) if p.name == "small_rgba.png"][0]
    assert images[small].shape == (64, 64, 3)
    a = fixed_patches(images, 64, 6, seed=0)
    b = fixed_patches(images, 64, 6, seed=0)
    assert torch.equal(a, b) and a.shape == (6, 3, 64, 64)
