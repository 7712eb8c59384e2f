"""Foreground-aware patches: no held-out or training patch is black background, on fundus images of the demo's and
of FIVES' size; images without a dark surround are all foreground; images without foreground are named."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from skimage import data

from sdnb.data.images import find_images
from sdnb.vae.data import DecodedImages, PatchDataset, held_out_patches
from sdnb.vae.foreground import Positions, fov_mask


def true_shares(pos: Positions, image: np.ndarray, threshold: float = 0.1) -> np.ndarray:
    """Every position's field-of-view share, by brute force over the full-resolution mask."""
    h, w = image.shape[:2]
    c, p = pos.cell, pos.patch_size
    full = np.repeat(np.repeat(fov_mask(image, threshold, c), c, 0), c, 1)[:h, :w].astype(np.int64)
    s = np.pad(full.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    y, x = np.mgrid[0:h - p + 1, 0:w - p + 1]
    return (s[y + p, x + p] - s[y, x + p] - s[y + p, x] + s[y, x]) / (p * p)


@pytest.mark.parametrize("crop, patch", [((slice(956, 1411), slice(0, 705)), 64),  # the demo's held-out tile
                                         ((slice(None), slice(None)), 256)])       # the whole 1411x1411 retina
def test_sampled_positions_are_uniform_among_accepted_ones(crop, patch):
    image = np.ascontiguousarray(data.retina()[crop])
    pos = Positions(image, patch, 0.5)
    shares = true_shares(pos, image)
    assert np.allclose(pos.share(*np.mgrid[0:shares.shape[0], 0:shares.shape[1]]), shares, atol=1e-6)
    rng = np.random.default_rng(0)
    drawn = np.array([pos.sample(rng) for _ in range(3000)])
    accepted = shares >= 0.5
    assert accepted[drawn[:, 0], drawn[:, 1]].all()
    ys = np.nonzero(accepted)[0]  # uniform among accepted positions: the mean row agrees within 4 standard errors
    assert abs(drawn[:, 0].mean() - ys.mean()) < 4 * ys.std() / np.sqrt(len(drawn))
    print(f"\n{image.shape[1]}x{image.shape[0]}, {patch} px patches: {pos.foreground:.0%} field of view, "
          f"{accepted.mean():.0%} of positions >= 50% field of view")


def test_fives_sized_fundus_image(tmp_path):
    """FIVES images are 2048x2048, a disc on black: the retina photograph scaled to that size stands in."""
    image = np.asarray(Image.fromarray(data.retina()).resize((2048, 2048), Image.BICUBIC))
    pos = Positions(image, 512, 0.5)
    assert pos.cell == 16 and 0.75 < pos.foreground < 0.9  # the disc, with its rim
    corner = image[:256, :256]
    assert pos.share(0, 0) < 0.5 and corner.mean() < 5  # the black corner is rejected ...
    assert pos.share(768, 768) == pytest.approx(1.0)  # ... the centre accepted
    rng = np.random.default_rng(0)
    for y, x in (pos.sample(rng) for _ in range(200)):
        assert image[y:y + 512, x:x + 512].mean() > 30  # no mostly-black patch


def test_images_without_dark_surround_are_all_foreground_and_black_ones_are_named(tmp_path, capsys):
    assert Positions(data.coffee(), 64, 0.5).foreground > 0.95
    assert Positions(np.full((200, 300, 3), 40, np.uint8), 64, 0.9).foreground == 1.0  # dim but uniform
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(data.retina()[::4, ::4]).save(folder / "fundus.png")
    Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(folder / "black.png")
    paths = [r.path for r in find_images(folder, "image_dir")]
    ds = PatchDataset(DecodedImages(paths, tmp_path / "cache", 64), 64, 20, min_foreground=0.5)
    assert "black.png" in capsys.readouterr().out
    assert {ds.place(ds.rng(i))[0] for i in range(20)} == {[p.name for p in paths].index("fundus.png")}
    black = [p for p in paths if p.name == "black.png"]
    with pytest.raises(ValueError, match="min_foreground=0.5 .*lower min_foreground"):
        PatchDataset(DecodedImages(black, tmp_path / "cache", 64), 64, 20, min_foreground=0.5)


def test_min_foreground_0_keeps_every_position():
    class Images(list):  # stands in for DecodedImages
        pass

    image = np.zeros((100, 120, 3), np.uint8)
    ds = PatchDataset(Images([image]), 32, 10, seed=5)
    rng = np.random.default_rng([5, 0, 3])  # today's draw: image, top, left
    assert ds.place(ds.rng(3)) == (int(rng.integers(1)), int(rng.integers(69)), int(rng.integers(89)))


def test_the_demos_held_out_patches_hold_no_background(tiny_assets, tmp_path):
    paths = [r.path for r in find_images(tiny_assets.fundus_val, "image_dir")]
    black = {}
    for min_foreground in (0.0, 0.5):  # before (any position) and after (the default)
        patches, description = held_out_patches(paths, 64, 64, 0, tmp_path / "cache", min_foreground)
        black[min_foreground] = int((patches.flatten(1).max(1).values < -0.9).sum())  # all pixels < 5% grey
        print(f"\n{description}: {black[min_foreground]} all-black patches")
    assert black[0.5] == 0 and black[0.0] > 0
    assert description.startswith("64 fixed 64x64 patches (seed 0) from 2 of 2 held-out images, each >= 50% field")
