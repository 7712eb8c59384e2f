"""Random patches of large images: each image decoded once into a memory-mapped array, patches read from it.

A 2048x2048 PNG takes ~0.2 s to decode; a 512x512 patch read from the memory map takes well under a
millisecond, and the whole data set never has to fit in RAM (Colab has ~12 GB).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from sdnb.images import load_rgb, scan


def list_images(folder: str | Path, parameter: str = "image_dir") -> list[Path]:
    """The readable images under `folder` (recursively); unreadable files are reported by name and skipped.

    Fails before any model loads when the folder is missing or holds no usable image, naming `parameter`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{parameter}={str(folder)!r} is not a folder")
    result = scan(folder)
    for rel, reason in result.skipped:
        print(f"skipped {rel}: {reason}")
    if not result.ok:
        raise ValueError(f"{parameter}={str(folder)!r} holds no usable image"
                         f" ({len(result.skipped)} file(s) skipped, see above)")
    return [r.path for r in result.ok]


def split_images(paths: Sequence[Path], val_fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """Split by image, never by patch: a seeded shuffle, at least one image on each side."""
    if len(paths) < 2:
        raise ValueError(f"need at least 2 images to hold one out, got {len(paths)}: set val_image_dir")
    order = np.random.default_rng(seed).permutation(len(paths))
    n_val = min(len(paths) - 1, max(1, round(len(paths) * val_fraction)))
    val = sorted(Path(paths[i]) for i in order[:n_val])
    train = sorted(Path(paths[i]) for i in order[n_val:])
    return train, val


class DecodedImages:
    """Images decoded once to uint8 HxWx3 `.npy` files in `cache_dir`, opened memory-mapped."""

    def __init__(self, paths: Sequence[str | Path], cache_dir: str | Path, min_side: int = 0):
        self.paths = [Path(p) for p in paths]
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.min_side = min_side
        self._open: dict[int, np.ndarray] = {}

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


def to_tensor(patch: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> float 3xHxW in [-1, 1] (what SD's VAE and LPIPS expect)."""
    return torch.from_numpy(np.array(patch, dtype=np.uint8)).permute(2, 0, 1).float().div(127.5).sub(1.0)


class PatchDataset(Dataset):
    """`length` random `patch_size` crops per epoch, with random flips (and 90-degree turns if `rot90`).

    Item `i` of epoch `e` depends only on (seed, e, i), so a resumed run sees the same patches.
    """

    def __init__(self, images: DecodedImages, patch_size: int, length: int, seed: int = 0,
                 hflip: bool = True, vflip: bool = False, rot90: bool = False):
        self.images, self.patch_size, self.length, self.seed = images, patch_size, length, seed
        self.hflip, self.vflip, self.rot90 = hflip, vflip, rot90
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the training loop at each epoch start."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def patch(self, rng: np.random.Generator) -> np.ndarray:
        """One random crop, flipped/turned as configured."""
        image = self.images[int(rng.integers(len(self.images)))]
        h, w = image.shape[:2]
        y, x = int(rng.integers(h - self.patch_size + 1)), int(rng.integers(w - self.patch_size + 1))
        crop = np.asarray(image[y:y + self.patch_size, x:x + self.patch_size])
        if self.hflip and rng.random() < 0.5:
            crop = crop[:, ::-1]
        if self.vflip and rng.random() < 0.5:
            crop = crop[::-1]
        if self.rot90:
            crop = np.rot90(crop, int(rng.integers(4)))
        return crop

    def __getitem__(self, i: int) -> torch.Tensor:
        return to_tensor(self.patch(np.random.default_rng([self.seed, self.epoch, i])))


def fixed_patches(images: DecodedImages, patch_size: int, n: int, seed: int) -> torch.Tensor:
    """A fixed, seeded set of `n` un-augmented patches (N, 3, H, W) in [-1, 1], comparable across checkpoints."""
    ds = PatchDataset(images, patch_size, n, seed=seed, hflip=False)
    return torch.stack([ds[i] for i in range(n)])
