"""Aspect buckets, captions, the split and the batch order (no models: fast)."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sdnb.data import CaptionedImage, read_captions, split_by_image
from sdnb.sd.buckets import BucketDataset, assign_bucket, bucket_batches, crop_box, make_buckets

SIZES = [(1000, 1000), (1500, 1000), (1000, 1500), (1920, 1080), (1080, 1920), (4000, 1000), (1000, 4000),
         (640, 427), (3000, 2250), (2000, 800), (800, 2000), (7000, 1000), (257, 1031)]


def test_buckets_are_multiples_of_64_around_the_target_area_from_1_1_to_4_1():
    buckets = make_buckets(512)
    assert (512, 512) in buckets and (1024, 256) in buckets and (256, 1024) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert 0.75 * 512 ** 2 <= w * h <= 512 ** 2
        assert 1 / 4 <= w / h <= 4
    assert buckets == sorted(buckets, key=lambda s: s[0] / s[1]) and len(set(buckets)) == len(buckets)
    assert make_buckets(64) == [(64, 64)]


def picture(width: int, height: int) -> Image.Image:
    """Grey image with a black disc of diameter 0.4 x the short side in the middle."""
    image = Image.new("RGB", (width, height), (200, 200, 200))
    r = 0.2 * min(width, height)
    ImageDraw.Draw(image).ellipse((width / 2 - r, height / 2 - r, width / 2 + r, height / 2 + r), fill=(0, 0, 0))
    return image


def test_varied_aspect_ratios_go_to_close_buckets_without_stretching(tmp_path):
    records = []
    for w, h in SIZES:
        path = tmp_path / f"{w}x{h}.png"
        picture(w, h).save(path)
        records.append(CaptionedImage(path, f"{w} by {h}", w, h))
    ds = BucketDataset(records, 512, crop_jitter=0.0, augment=False)
    for i, (w, h) in enumerate(SIZES):
        bw, bh = ds.buckets[ds.bucket_of[i]]
        error = abs(math.log((bw / bh) / (w / h)))
        if 1 / 4 <= w / h <= 4:
            assert error < 0.14, (w, h, bw, bh)  # at most ~13% of the long side is cropped
        else:
            assert (bw / bh) in (4.0, 0.25)  # beyond 4:1: the most extreme bucket
        pixels = ds[i]["pixel_values"]
        assert pixels.shape == (3, bh, bw) and bw % 64 == 0 and bh % 64 == 0
        assert pixels.min() >= -1 and pixels.max() <= 1
        # not stretched: the disc is still round (its bounding box is as wide as it is tall)
        dark = (pixels.mean(0) < -0.5).numpy()
        rows, cols = np.nonzero(dark.any(1))[0], np.nonzero(dark.any(0))[0]
        height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert abs(width - height) <= 2, (w, h, width, height)


def test_crop_box_keeps_the_bucket_aspect_and_jitters_by_at_most_the_share_asked():
    rng = random.Random(0)
    for w, h in SIZES:
        for bucket in make_buckets(512):
            left, top, right, bottom = crop_box(w, h, bucket, 0.02, rng)
            assert (right - left) / (bottom - top) == pytest.approx(bucket[0] / bucket[1], rel=1e-9)
            assert -1e-6 <= left and -1e-6 <= top and right <= w + 1e-6 and bottom <= h + 1e-6
            full = crop_box(w, h, bucket)
            shrink = min(full[2] - full[0], full[3] - full[1]) - min(right - left, bottom - top)
            assert -1e-6 <= shrink <= 0.02 * min(w, h) + 1e-6


def test_jitter_and_flip_depend_only_on_seed_epoch_and_index(tmp_path):
    path = tmp_path / "a.png"
    picture(900, 600).save(path)
    ds = BucketDataset([CaptionedImage(path, "a", 900, 600)] * 2, 256, crop_jitter=0.05, flip=True, seed=3)
    first = ds[0]["pixel_values"]
    assert (ds[0]["pixel_values"] == first).all()  # same (seed, epoch, index): same pixels
    ds.set_epoch(1)
    assert not (ds[0]["pixel_values"] == first).all()  # another epoch: another crop
    ds.set_epoch(0)
    assert (ds[0]["pixel_values"] == first).all()  # back to epoch 0 (a resume): the same again
    assert not (ds[1]["pixel_values"] == first).all()  # another index: another crop


def test_every_batch_holds_one_bucket_and_every_image_each_epoch():
    bucket_of = [0] * 7 + [1] * 3 + [2] * 1 + [3] * 4
    batches = bucket_batches(bucket_of, 2, seed=1)
    for epoch in range(3):
        epoch_batches = batches(epoch)
        assert all(len(b) == 2 and len({bucket_of[i] for i in b}) == 1 for b in epoch_batches)
        assert {i for b in epoch_batches for i in b} == set(range(len(bucket_of)))
        assert batches(epoch) == epoch_batches  # deterministic given (seed, epoch): a resume reproduces
    assert batches(0) != batches(1) and bucket_batches(bucket_of, 2, seed=2)(0) != batches(0)


def test_read_captions_prefers_sidecars_then_metadata_and_warns_about_the_rest(tmp_path):
    for name in ("a", "b", "c"):
        picture(80, 60).save(tmp_path / f"{name}.jpg")
    (tmp_path / "a.txt").write_text("  a sidecar caption\n")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.jpg", "text": "ignored"}) + "\n"
                                             + json.dumps({"file_name": "b.jpg", "text": "from metadata"}) + "\n")
    with pytest.warns(UserWarning, match="1 images .* no caption"):
        records = read_captions(tmp_path, progress=False)
    assert {r.path.name: r.caption for r in records} == {"a.jpg": "a sidecar caption", "b.jpg": "from metadata"}
    assert (records[0].width, records[0].height) == (80, 60)
    with pytest.raises(FileNotFoundError, match="data_dir='.*nowhere'"):
        read_captions(tmp_path / "nowhere")
    (tmp_path / "metadata.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="metadata.jsonl:1"):
        read_captions(tmp_path, progress=False)


def test_split_is_seeded_disjoint_and_by_image():
    records = [CaptionedImage(f"{i}.jpg", str(i), 64, 64) for i in range(50)]
    train, val = split_by_image(records, 0.1, seed=0)
    assert len(val) == 5 and len(train) == 45 and not set(map(id, train)) & set(map(id, val))
    assert split_by_image(records, 0.1, seed=0) == (train, val)
    assert split_by_image(records, 0.1, seed=1)[1] != val
    assert len(split_by_image(records[:3], 0.1, seed=0)[1]) == 1  # at least one held-out image
    assert split_by_image(records, 0.0, seed=0) == (records, [])


def test_assign_bucket_picks_the_closest_ratio():
    buckets = make_buckets(512)
    assert buckets[assign_bucket(1000, 1000, buckets)] == (512, 512)
    assert buckets[assign_bucket(4000, 1000, buckets)] == (1024, 256)
    assert buckets[assign_bucket(1000, 4000, buckets)] == (256, 1024)
