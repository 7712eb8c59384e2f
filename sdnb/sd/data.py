"""03's data: the bucketed training and validation sets of an `SDConfig`, and their latents and text embeddings
encoded once (`cache_latents`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from sdnb.data.captions import CaptionedImage
from sdnb.data.images import to_tensor
from sdnb.sd.buckets import BucketDataset, bucket_batches, tokenize
from sdnb.sd.config import SDConfig
from sdnb.sd.model import SDParts, encode_prompts


def build_datasets(cfg: SDConfig, train: list[CaptionedImage], val: list[CaptionedImage],
                   tokenizer: Any = None) -> tuple[BucketDataset, Callable[[int], list[list[int]]], BucketDataset]:
    """(training dataset, batch_sampler_fn, validation dataset) for an `SDConfig`; items carry the caption (or its
    token ids when a tokenizer is given)."""
    train_ds = BucketDataset(train, cfg.resolution, tokenizer, crop_jitter=cfg.crop_jitter, flip=cfg.flip,
                             caption_dropout=cfg.caption_dropout, seed=cfg.seed)
    val_ds = BucketDataset(val, cfg.resolution, tokenizer, seed=cfg.seed, augment=False)
    return train_ds, bucket_batches(train_ds.bucket_of, cfg.batch_size, cfg.seed), val_ds


class ImageLatents(Dataset):
    """A `BucketDataset` (no jitter, no flip) with VAE posteriors, and text embeddings if the encoder is frozen, computed once."""

    def __init__(self, dataset: BucketDataset, parts: SDParts, device: torch.device, embeddings: bool = True,
                 batch_size: int = 4):
        if dataset.crop_jitter > 0 or dataset.flip:
            raise ValueError("cache_latents=True needs crop_jitter=0 and flip=False (cached latents cannot vary)")
        self.dataset, self.moments = dataset, []
        with torch.no_grad():
            for i in tqdm(range(len(dataset)), desc="cache latents"):
                pixels = to_tensor(dataset.image(i))[None].to(device, parts.vae.dtype)  # the centred crop
                self.moments.append(parts.vae.encode(pixels).latent_dist.parameters[0].float().cpu())
            self.states = None
            if embeddings:
                captions = [r.caption for r in dataset.records] + [""]
                self.states = torch.cat([encode_prompts(parts.text_encoder, parts.tokenizer, captions[k:k + batch_size],
                                                        device).float().cpu() for k in range(0, len(captions), batch_size)])
        self.bucket_of = dataset.bucket_of

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict:
        caption = self.dataset.caption(index, self.dataset.rng(index))  # caption dropout still applies
        item = {"moments": self.moments[index], "index": index}
        if self.states is not None:
            item["encoder_hidden_states"] = self.states[-1 if caption == "" else index]
        elif self.dataset.tokenizer is not None:
            item["input_ids"] = tokenize(self.dataset.tokenizer, [caption])[0]
        else:
            item["caption"] = caption
        return item
