"""Captioned images in aspect-ratio buckets: the buckets, the dataset and the batch order.

EveryDream2's recipe (github.com/victorchall/EveryDream2trainer, its data loader and docs): every image goes to the bucket (w, h) of about resolution^2
pixels whose aspect ratio is closest to its own (1:1 to 4:1 both ways, sides multiples of 64), is resized
uniformly (PIL bicubic) to cover the bucket and cropped, never stretched; a small random crop jitter
(default 2% of the short side) and an optional flip vary it per epoch; every batch holds one bucket.
All randomness derives from (seed, epoch, index), so a resumed run sees the same pixels.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from sdnb.data.captions import CaptionedImage
from sdnb.data.images import load_rgb, to_tensor

SIDE_STEP = 64


def make_buckets(resolution: int, max_ratio: float = 4.0, step: int = SIDE_STEP) -> list[tuple[int, int]]:
    """Bucket sizes (width, height): sides multiples of `step`, at most resolution^2 pixels, ratios up to max_ratio.

    For each width from `resolution` up, the tallest height within the area, and its transpose; sorted by w/h.
    """
    area = resolution * resolution
    sizes = {(resolution, resolution)}
    w = resolution
    while True:
        h = (area // w) // step * step
        if h < step or w / h > max_ratio:
            break
        sizes |= {(w, h), (h, w)}
        w += step
    return sorted(sizes, key=lambda s: s[0] / s[1])


def assign_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is closest (in log scale) to width/height."""
    ratio = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: (abs(math.log(buckets[i][0] / buckets[i][1]) - ratio), i))


def crop_box(width: int, height: int, bucket: tuple[int, int], jitter: float = 0.0,
             rng: random.Random | None = None) -> tuple[float, float, float, float]:
    """The region (left, top, right, bottom) of a width x height image that is resized to `bucket`.

    It has the bucket's aspect ratio exactly (so nothing is stretched), is as large as fits, and is centred;
    with `jitter` and a generator it shrinks by up to `jitter` of the short side and its centre moves by up
    to as much, at random (EveryDream2's crop jitter).
    """
    bw, bh = bucket
    scale = min(width / bw, height / bh)  # image pixels per bucket pixel when the box is as large as fits
    cw, ch = bw * scale, bh * scale
    cx, cy = width / 2, height / 2
    if jitter > 0 and rng is not None:
        amount = jitter * min(width, height)
        shrink = 1 - rng.uniform(0, amount) / min(cw, ch)
        cw, ch = cw * shrink, ch * shrink
        cx = min(max(cx + rng.uniform(-amount, amount), cw / 2), width - cw / 2)
        cy = min(max(cy + rng.uniform(-amount, amount), ch / 2), height - ch / 2)
    return cx - cw / 2, cy - ch / 2, cx + cw / 2, cy + ch / 2


class BucketDataset(Dataset):
    """Captioned images resized into their buckets; item i = {"pixel_values", "input_ids" or "caption", "index"}.

    Crop jitter, flip and caption dropout draw from a generator seeded by (seed, epoch, index); the training
    loop calls `set_epoch`. `augment=False` gives the plain centred crop (validation, caching).
    """

    def __init__(self, records: Sequence[CaptionedImage], resolution: int, tokenizer=None, crop_jitter: float = 0.02,
                 flip: bool = False, caption_dropout: float = 0.0, seed: int = 0, augment: bool = True):
        self.records, self.tokenizer = list(records), tokenizer
        self.buckets = make_buckets(resolution)
        self.bucket_of = [assign_bucket(r.width, r.height, self.buckets) for r in self.records]
        self.crop_jitter, self.flip, self.caption_dropout = crop_jitter, flip, caption_dropout
        self.seed, self.augment, self.epoch = seed, augment, 0

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rng(self, index: int) -> random.Random:
        return random.Random(f"{self.seed}/{self.epoch}/{index}")

    def image(self, index: int, rng: random.Random | None = None) -> Image.Image:
        """The image as trained: cropped and resized (bicubic) to its bucket, flipped if drawn so."""
        rec, size = self.records[index], self.buckets[self.bucket_of[index]]
        image = load_rgb(rec.path)
        if image.size != (rec.width, rec.height):
            raise ValueError(f"{rec.path} is now {image.size[0]}x{image.size[1]}, not {rec.width}x{rec.height} as "
                             "read at the start: was it replaced during training?")
        box = crop_box(rec.width, rec.height, size, self.crop_jitter if rng else 0.0, rng)
        image = image.resize(size, Image.BICUBIC, box=box)
        if rng is not None and self.flip and rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return image

    def caption(self, index: int, rng: random.Random | None = None) -> str:
        drop = rng is not None and self.caption_dropout > 0 and rng.random() < self.caption_dropout
        return "" if drop else self.records[index].caption

    def __getitem__(self, index: int) -> dict:
        rng = self.rng(index) if self.augment else None
        item = {"pixel_values": to_tensor(self.image(index, rng)), "index": index}
        caption = self.caption(index, rng)
        if self.tokenizer is not None:
            item["input_ids"] = tokenize(self.tokenizer, [caption])[0]
        else:
            item["caption"] = caption
        return item

    def summary(self) -> str:
        """How many images went to each bucket."""
        counts = Counter(self.bucket_of)
        return ", ".join(f"{w}x{h}: {counts[i]}" for i, (w, h) in enumerate(self.buckets) if counts[i])


def tokenize(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    """CLIP token ids, padded and truncated to the tokenizer's length (77 for SD)."""
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def bucket_batches(bucket_of: Sequence[int], batch_size: int, seed: int) -> Callable[[int], list[list[int]]]:
    """The loop's `batch_sampler_fn`: for an epoch, batches that each hold one bucket, in a seeded order.

    A bucket's last, short batch is filled with other images of the same bucket (drawn at random),
    as EveryDream2 does, so every image is seen each epoch and every batch is full.
    """
    members: dict[int, list[int]] = {}
    for index, bucket in enumerate(bucket_of):
        members.setdefault(bucket, []).append(index)

    def batches(epoch: int) -> list[list[int]]:
        rng = random.Random(f"batches/{seed}/{epoch}")
        out = []
        for bucket in sorted(members):
            order = members[bucket][:]
            rng.shuffle(order)
            short = -len(order) % batch_size
            order += [rng.choice(members[bucket]) for _ in range(short)]
            out += [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        rng.shuffle(out)
        return out

    return batches
