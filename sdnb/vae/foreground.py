"""Foreground-aware patches: a field-of-view mask per image, and patch positions drawn uniformly among those whose
share of foreground is at least `min_foreground`.

Fundus photographs (FIVES: 2048x2048; scikit-image's retina: 1411x1411) are a bright disc on black: about a fifth
of a square image is background, and a random patch may be all black. The mask is the blurred luminance above
`threshold` times its maximum, holes filled (a dark macula or vessel inside the disc stays foreground):

- luminance = 0.299 R + 0.587 G + 0.114 B, averaged over cells of `cell` px (1-16, a power of two dividing the
  patch size; ~128+ cells across), then blurred by a Gaussian of sigma = 2% of the short side: fine vessels and
  dark spots vanish, the disc stays. On retina() the blurred disc is >= 0.36 of its maximum everywhere inside,
  and the black surround < 0.004 (JPEG noise in FIVES' surround is a few /255): `threshold` = 0.1 lies well
  between and puts the edge ~1 sigma outside the disc, so the rim (where VAEs leave artefacts) is kept.
- An image without a dark surround (a photograph, a crop inside the disc) is all foreground; an all-black image
  has none and is skipped with a message naming it.

The mask is constant on cells, so the foreground pixel count of any rectangle is exact from a summed-area table at
the cell corners (bilinear between them), and a patch's share is O(1). Positions are drawn uniformly among all
accepted ones: uniformly within the cells of positions that can hold an accepted patch (the share is bilinear
within a cell, so its maximum is at a corner), then kept if accepted (cells wholly accepted need no check).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

BLUR_SIGMA = 0.02  # of the short side
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def cell_size(height: int, width: int, patch_size: int) -> int:
    """The mask's cell side: a power of two <= 16 dividing `patch_size`, with ~128 or more cells on the short side."""
    c = 1
    while c < 16 and patch_size % (2 * c) == 0 and min(height, width) // (2 * c) >= 128:
        c *= 2
    return c


def fov_mask(image: np.ndarray, threshold: float = 0.1, cell: int = 1) -> np.ndarray:
    """The field of view of an RGB uint8 image, one bool per `cell` x `cell` block (ceil(H/cell) x ceil(W/cell)):
    blurred luminance > `threshold` x its maximum, holes filled. All False for an all-black image."""
    h, w = image.shape[:2]
    ny, nx = -(-h // cell), -(-w // cell)
    lum = np.zeros((ny, nx), dtype=np.float64)
    for y in range(ny):  # row of cells by row of cells: a 2048x2048 image never becomes float all at once
        rows = np.asarray(image[y * cell:(y + 1) * cell], dtype=np.float32) @ LUMA
        pad = nx * cell - w
        rows = np.pad(rows, ((0, 0), (0, pad)), mode="edge") if pad else rows
        lum[y] = rows.reshape(rows.shape[0], nx, cell).mean(axis=(0, 2))
    blurred = ndimage.gaussian_filter(lum, BLUR_SIGMA * min(h, w) / cell, mode="nearest")
    peak = blurred.max()
    if peak <= 0:
        return np.zeros((ny, nx), dtype=bool)
    return ndimage.binary_fill_holes(blurred > threshold * peak)


class Positions:
    """The accepted patch positions of one image: top-left corners (y, x) whose patch is >= `min_foreground`
    field of view. `n_candidates` = 0 when none is."""

    def __init__(self, image: np.ndarray, patch_size: int, min_foreground: float, threshold: float = 0.1):
        h, w = image.shape[:2]
        self.patch_size, self.min_foreground, self.h, self.w = patch_size, min_foreground, h, w
        c = self.cell = cell_size(h, w, patch_size)
        mask = fov_mask(image, threshold, c)
        self.ky, self.kx = np.minimum(np.arange(mask.shape[0] + 1) * c, h), np.minimum(np.arange(mask.shape[1] + 1) * c, w)
        area = mask * np.diff(self.ky)[:, None] * np.diff(self.kx)[None, :]  # foreground pixels per cell
        self.table = np.pad(area.cumsum(0).cumsum(1), ((1, 0), (1, 0))).astype(np.int64)
        self.foreground = float(self.table[-1, -1]) / (h * w)
        # cells of positions: rows [a, b] (inclusive), cols likewise
        ay, ax = np.arange(0, h - patch_size + 1, c), np.arange(0, w - patch_size + 1, c)
        by, bx = np.minimum(ay + c - 1, h - patch_size), np.minimum(ax + c - 1, w - patch_size)
        corners = [self.share(y[:, None], x[None, :]) for y in (ay, by) for x in (ax, bx)]
        hi, lo = np.maximum.reduce(corners), np.minimum.reduce(corners)
        self.cells = np.flatnonzero(hi >= min_foreground).astype(np.int32)
        self.full = (lo >= min_foreground).ravel()[self.cells]
        self.ay, self.ax, self.by, self.bx = ay, ax, by, bx
        self.n_candidates = len(self.cells)

    def count(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Foreground pixels in [0, y) x [0, x), exact (bilinear in the summed-area table between cell corners)."""
        iy = np.clip(np.searchsorted(self.ky, y, side="right") - 1, 0, len(self.ky) - 2)
        ix = np.clip(np.searchsorted(self.kx, x, side="right") - 1, 0, len(self.kx) - 2)
        ty = (y - self.ky[iy]) / (self.ky[iy + 1] - self.ky[iy])
        tx = (x - self.kx[ix]) / (self.kx[ix + 1] - self.kx[ix])
        t = self.table
        return ((1 - ty) * (1 - tx) * t[iy, ix] + (1 - ty) * tx * t[iy, ix + 1] + ty * (1 - tx) * t[iy + 1, ix]
                + ty * tx * t[iy + 1, ix + 1])

    def share(self, y, x) -> np.ndarray:
        """Field-of-view share of the patches with top-left corners (y, x)."""
        p = self.patch_size
        y, x = np.asarray(y), np.asarray(x)
        inside = self.count(y + p, x + p) - self.count(y, x + p) - self.count(y + p, x) + self.count(y, x)
        return inside / (p * p) + 1e-9  # rounding of the interpolation must not reject a share of exactly the minimum

    def sample(self, rng: np.random.Generator, tries: int = 1000) -> tuple[int, int]:
        """A position drawn uniformly among the accepted ones."""
        c, nx = self.cell, len(self.ax)
        for _ in range(tries):
            k = int(rng.integers(self.n_candidates))
            cell = int(self.cells[k])
            i, j = divmod(cell, nx)
            if rng.random() * c * c >= (self.by[i] - self.ay[i] + 1) * (self.bx[j] - self.ax[j] + 1):
                continue  # edge cells hold fewer positions: drawn less often, so each position is equally likely
            y, x = int(rng.integers(self.ay[i], self.by[i] + 1)), int(rng.integers(self.ax[j], self.bx[j] + 1))
            if self.full[k] or self.share(y, x) >= self.min_foreground:
                return y, x
        i, j = divmod(int(self.cells[0]), nx)  # (practically never) the best corner of a candidate cell: accepted
        best = max(((y, x) for y in (self.ay[i], self.by[i]) for x in (self.ax[j], self.bx[j])),
                   key=lambda yx: float(self.share(*yx)))
        return int(best[0]), int(best[1])


def image_positions(images: Sequence[np.ndarray], names: Sequence[str], patch_size: int, min_foreground: float,
                    threshold: float) -> list[Positions | None]:
    """`Positions` per image (None where no patch qualifies, with a message naming the image). Raises ValueError
    naming `min_foreground` if no image has any."""
    out = []
    for image, name in zip(images, names):
        pos = Positions(image, patch_size, min_foreground, threshold)
        if pos.n_candidates == 0:
            print(f"{name}: no {patch_size}x{patch_size} patch is {min_foreground:.0%} field of view ({pos.foreground:.0%}"
                  f" of the image is, at foreground_threshold={threshold}): skipped")
            pos = None
        out.append(pos)
    if all(p is None for p in out):
        raise ValueError(f"min_foreground={min_foreground} is not accepted: no {patch_size}x{patch_size} patch of any of "
                         f"the {len(out)} images is that much field of view (blurred luminance above "
                         f"foreground_threshold={threshold} x its maximum); lower min_foreground or "
                         "foreground_threshold, or set min_foreground=0 to use every patch")
    return out
