"""02's data: random patches of large images, fixed held-out patches, and a pool of encoded patches.

Each image is decoded once into a memory-mapped array and patches are read from it: a 2048x2048 PNG takes
~0.2 s to decode; a 512x512 patch read from the memory map takes well under a millisecond, and the whole data set
never has to fit in RAM (Colab has ~12 GB).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from sdnb.data.images import find_images, load_rgb, split_by_image, to_tensor
from sdnb.vae.foreground import Positions, image_positions


class DecodedImages:
    """Images decoded once to uint8 HxWx3 `.npy` files in `cache_dir`, opened memory-mapped."""

    def __init__(self, paths: Sequence[str | Path], cache_dir: str | Path, min_side: int = 0):
        self.paths = [Path(p) for p in paths]
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.min_side = min_side
        self._open: dict[int, np.ndarray] = {}
        self._positions: dict[tuple, list[Positions | None]] = {}

    def _cache_path(self, path: Path) -> Path:
        st = path.stat()
        key = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{self.min_side}".encode()).hexdigest()[:16]
        return self.cache_dir / f"{path.stem[:40]}-{key}.npy"

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        if i not in self._open:
            cached = self._cache_path(self.paths[i])
            if not cached.exists():
                array = np.asarray(load_rgb(self.paths[i]), dtype=np.uint8)
                h, w = array.shape[:2]
                if min(h, w) < self.min_side:  # smaller than a patch: pad by reflection
                    print(f"{self.paths[i].name} is {w}x{h}, smaller than {self.min_side}: padded by reflection")
                    ph, pw = max(0, self.min_side - h), max(0, self.min_side - w)
                    array = np.pad(array, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)), mode="reflect")
                tmp = cached.with_name(f"{cached.stem}.{os.getpid()}.tmp.npy")
                np.save(tmp, array)
                tmp.replace(cached)  # atomic: a half-written cache file is never used
            self._open[i] = np.load(cached, mmap_mode="r")
        return self._open[i]

    def __getstate__(self) -> dict:  # loader workers reopen the memory maps themselves
        return {**self.__dict__, "_open": {}}

    def positions(self, patch_size: int, min_foreground: float, threshold: float) -> list[Positions | None]:
        """Per image, the patch positions that are >= `min_foreground` field of view (`sdnb.vae.foreground`); None
        for an image without any (named in a message). Computed once per setting."""
        key = (patch_size, min_foreground, threshold)
        if key not in self._positions:
            images = (self[i] for i in tqdm(range(len(self)), desc="field-of-view masks", leave=False))
            self._positions[key] = image_positions(images, [p.name for p in self.paths], patch_size, min_foreground,
                                                   threshold)
        return self._positions[key]


class PatchDataset(Dataset):
    """`length` random `patch_size` crops per epoch, with random flips (and 90-degree turns if `rot90`).

    With `min_foreground` > 0 a crop is drawn uniformly among those that are at least that share field of view
    (`sdnb.vae.foreground`; images without any are skipped); 0 = any crop. Item `i` of epoch `e` depends only on
    (seed, e, i), so a resumed run sees the same patches.
    """

    def __init__(self, images: DecodedImages, patch_size: int, length: int, seed: int = 0,
                 hflip: bool = True, vflip: bool = False, rot90: bool = False, min_foreground: float = 0.0,
                 foreground_threshold: float = 0.1):
        self.images, self.patch_size, self.length, self.seed = images, patch_size, length, seed
        self.hflip, self.vflip, self.rot90 = hflip, vflip, rot90
        self.epoch = 0
        self.positions = images.positions(patch_size, min_foreground, foreground_threshold) if min_foreground else None
        self.usable = [i for i, p in enumerate(self.positions) if p is not None] if self.positions else []

    def set_epoch(self, epoch: int) -> None:
        """Called by the training loop at each epoch start."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def place(self, rng: np.random.Generator) -> tuple[int, int, int]:
        """(image index, top, left) of one random crop."""
        if self.positions is not None:
            i = self.usable[int(rng.integers(len(self.usable)))]
            return (i, *self.positions[i].sample(rng))
        i = int(rng.integers(len(self.images)))
        h, w = self.images[i].shape[:2]
        return i, int(rng.integers(h - self.patch_size + 1)), int(rng.integers(w - self.patch_size + 1))

    def rng(self, i: int) -> np.random.Generator:
        """The generator of item `i` of this epoch."""
        return np.random.default_rng([self.seed, self.epoch, i])

    def patch(self, rng: np.random.Generator) -> np.ndarray:
        """One random crop, flipped/turned as configured."""
        i, y, x = self.place(rng)
        crop = np.asarray(self.images[i][y:y + self.patch_size, x:x + self.patch_size])
        if self.hflip and rng.random() < 0.5:
            crop = crop[:, ::-1]
        if self.vflip and rng.random() < 0.5:
            crop = crop[::-1]
        if self.rot90:
            crop = np.rot90(crop, int(rng.integers(4)))
        return crop

    def __getitem__(self, i: int) -> torch.Tensor:
        return to_tensor(self.patch(self.rng(i)))


def fixed_patches(images: DecodedImages, patch_size: int, n: int, seed: int, min_foreground: float = 0.0,
                  foreground_threshold: float = 0.1) -> torch.Tensor:
    """A fixed, seeded set of `n` un-augmented patches (N, 3, H, W) in [-1, 1], comparable across checkpoints, each
    at least `min_foreground` field of view."""
    ds = PatchDataset(images, patch_size, n, seed=seed, hflip=False, min_foreground=min_foreground,
                      foreground_threshold=foreground_threshold)
    return torch.stack([ds[i] for i in range(n)])


def n_source_images(images: DecodedImages, patch_size: int, n: int, seed: int, min_foreground: float = 0.0,
                    foreground_threshold: float = 0.1) -> int:
    """How many distinct images the `fixed_patches` with these settings come from."""
    ds = PatchDataset(images, patch_size, n, seed=seed, hflip=False, min_foreground=min_foreground,
                      foreground_threshold=foreground_threshold)
    return len({ds.place(ds.rng(i))[0] for i in range(n)})


def held_out_patches(paths: Sequence[Path], patch_size: int, n: int, seed: int = 0,
                     cache_dir: str | Path | None = None, min_foreground: float = 0.0,
                     foreground_threshold: float = 0.1) -> tuple[torch.Tensor, str]:
    """The fixed held-out set of 02 and 04: whole images when all share one size no larger than `patch_size`, else
    `n` seeded patches (images smaller than a patch are padded by reflection), each at least `min_foreground`
    field of view (0 = any; see `sdnb.vae.foreground`). Returns (N, 3, H, W) in [-1, 1] and a sentence saying what
    it rests on: "N patches from M images"."""
    sizes = set()
    for p in paths:
        with Image.open(p) as im:
            sizes.add(im.size)
    if len(sizes) == 1 and max(next(iter(sizes))) <= patch_size:
        w, h = next(iter(sizes))
        w, h = w // 8 * 8, h // 8 * 8  # the VAE needs sides divisible by 8
        images = torch.stack([to_tensor(np.asarray(load_rgb(p))[:h, :w]) for p in paths[:n]])
        return images, f"{len(images)} whole held-out images of {w}x{h}"
    cache = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="sdnb-heldout-"))
    decoded = DecodedImages(paths, cache, min_side=patch_size)
    fov = (min_foreground, foreground_threshold)
    images = fixed_patches(decoded, patch_size, n, seed, *fov)
    used = n_source_images(decoded, patch_size, n, seed, *fov)
    rule = (f", each >= {min_foreground:.0%} field of view (foreground_threshold {foreground_threshold:g})"
            if min_foreground else " (any position: min_foreground 0)")
    return images, (f"{n} fixed {patch_size}x{patch_size} patches (seed {seed}) from {used} of {len(paths)} "
                    f"held-out images{rule}")


class PatchLatents(Dataset):
    """Decoder-only training on a fixed pool of patches, each encoded once by the frozen encoder.

    Items are {"images", "mean", "std"}; the decoder trains on latents sampled from the cached posterior.
    The pool is the first epoch's patches: augmentation is not redrawn in later epochs. Only the items in `needed`
    (default: all) are encoded up front, in batches (`items_used` gives what a run of max_steps uses); any other
    item is encoded when first asked for, so the data order and a resumed run are the same either way.
    """

    def __init__(self, patches: Dataset, vae: AutoencoderKL, device: torch.device | str = "cpu", batch_size: int = 16,
                 needed: Sequence[int] | None = None, progress: bool = True):
        self.patches, self.vae, self.device, self.cache = patches, vae, device, {}
        todo = list(range(len(patches)) if needed is None else needed)
        for start in tqdm(range(0, len(todo), batch_size), desc=f"caching latents ({len(todo)} of {len(patches)} "
                          "patches)", disable=not progress):
            self._encode(todo[start:start + batch_size])

    @torch.no_grad()
    def _encode(self, indices: Sequence[int]) -> None:
        batch = torch.stack([self.patches[i] for i in indices])
        posterior = self.vae.encode(batch.to(self.device)).latent_dist
        images = batch.add(1).mul(127.5).round().byte()  # uint8: a quarter of the memory
        for k, i in enumerate(indices):
            self.cache[i] = (images[k].clone(), posterior.mean[k].cpu(), posterior.std[k].cpu())

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i not in self.cache:
            self._encode([i])
        image, mean, std = self.cache[i]
        return {"images": image.float().div(127.5).sub(1), "mean": mean, "std": std}


@dataclass
class VAEData:
    """Training and held-out images (split by image), decoded once, and the fixed held-out patches."""

    train_paths: list[Path]
    val_paths: list[Path]
    train_images: DecodedImages
    val_patches: torch.Tensor
    description: str = ""


def prepare_data(cfg) -> VAEData:
    """List and check the images of a `VAEConfig` (before any model loads), split them by image, cut the fixed
    held-out patches."""
    run_dir = Path(cfg.run_dir)  # each file left out of a scan, with its reason: skipped.csv, skipped_val.csv
    train_paths = [r.path for r in find_images(cfg.image_dir, "image_dir", run_dir / "skipped.csv")]
    if cfg.val_image_dir:
        val_paths = [r.path for r in find_images(cfg.val_image_dir, "val_image_dir", run_dir / "skipped_val.csv")]
    elif len(train_paths) < 2:
        raise ValueError(f"image_dir={cfg.image_dir!r} holds {len(train_paths)} image: at least 2 are needed to hold "
                         "one out; set val_image_dir")
    else:
        train_paths, val_paths = split_by_image(train_paths, cfg.val_fraction, cfg.seed)
    cache = Path(cfg.run_dir) / "cache"
    fov = (cfg.min_foreground, cfg.foreground_threshold)
    val_patches, description = held_out_patches(val_paths, cfg.patch_size, cfg.n_val_patches, cfg.seed, cache, *fov)
    train_images = DecodedImages(train_paths, cache, min_side=cfg.patch_size)
    if cfg.min_foreground:  # masks now: an image without field of view is named before any model loads
        usable = sum(p is not None for p in train_images.positions(cfg.patch_size, *fov))
        description += f"; training patches from {usable} of {len(train_paths)} images, same rule"
    return VAEData(train_paths, val_paths, train_images, val_patches,
                   description + f" ({len(val_paths)} held-out images, {len(train_paths)} training images)")
