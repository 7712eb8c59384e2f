"""Scanning image folders, loading any image as 8-bit RGB, and resized training copies.

Every file with an image extension is checked by decoding it; what cannot be used is skipped
with a reason (and can be written to ``skipped.csv``), so one bad file never stops a scan: unreadable
folders, symbolic link loops, dangling links and FIFOs or devices named like images (never opened: a
FIFO would block) are listed too. Hidden files and folders, ``.ipynb_checkpoints`` and non-image files
(caption sidecars such as ``image.txt`` / ``image.json``) are ignored. Transparency is composited onto white.
"""

from __future__ import annotations

import csv
import random
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from sdnb.data.walk import walk_files

__all__ = [
    "IMAGE_EXTENSIONS", "ImageRecord", "ScanResult", "find_images", "load_rgb", "make_training_copies", "scan",
    "split_by_image", "to_array", "to_rgb", "to_tensor", "write_skipped_csv",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
IGNORED_DIRS = {".ipynb_checkpoints", "__MACOSX", "__pycache__"}
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # Pillow's own decompression-bomb limit
_ORIENTATION = 0x0112


@dataclass(frozen=True)
class ImageRecord:
    """An image that decoded cleanly. ``width``/``height`` are as displayed (EXIF orientation applied);
    ``mode`` and ``format`` are those of the file (e.g. ``"I;16"``, ``"PNG"``)."""

    path: Path
    relpath: str
    width: int
    height: int
    mode: str
    format: str


@dataclass
class ScanResult:
    """What :func:`scan` found: usable images, and ``(relpath, reason)`` for each file skipped."""

    ok: list[ImageRecord] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        return f"{len(self.ok)} images ok, {len(self.skipped)} skipped"


class _TooLarge(ValueError):
    """An image above ``max_pixels``."""


def _check(path: Path, max_pixels: int) -> tuple[int, int, str, str]:
    """Decode ``path`` fully; return (width, height, mode, format) as displayed, or raise."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise _TooLarge(f"too large: {w}x{h} = {w * h} pixels > max_pixels {max_pixels} (decompression-bomb guard)")
            im.load()
            if im.getexif().get(_ORIENTATION) in (5, 6, 7, 8):
                w, h = h, w
            return w, h, im.mode, im.format or ""


def scan(
    folder: str | Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
    progress: bool = True,
) -> ScanResult:
    """Find every usable image under ``folder`` (recursively), decoding each one to be sure.

    Truncated or empty files, files that are not images, and images above ``max_pixels`` are
    skipped with a reason instead of raising. (Pillow's own limit, ``Image.MAX_IMAGE_PIXELS``,
    still applies: raise it too to accept larger images.)
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"scan: {folder} is not a folder")
    extensions = tuple(e.lower() for e in extensions)
    candidates, skipped = walk_files(folder, extensions, IGNORED_DIRS)
    result = ScanResult(skipped=skipped)
    for path in tqdm(candidates, desc=f"scan {folder.name}", disable=not progress):
        rel = path.relative_to(folder).as_posix()
        try:
            w, h, mode, fmt = _check(path, max_pixels)
        except _TooLarge as e:
            result.skipped.append((rel, str(e)))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            result.skipped.append((rel, f"decompression bomb: {e}"))
        except Exception as e:  # noqa: BLE001 - any decoder failure means: skip this file, go on
            reason = "empty file" if _size(path) == 0 else f"{type(e).__name__}: {e}"
            result.skipped.append((rel, reason))
        else:
            result.ok.append(ImageRecord(path, rel, w, h, mode, fmt))
    return result


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def write_skipped_csv(skipped: list[tuple[str, str]], path: str | Path) -> Path:
    """Write ``(file, reason)`` rows to ``path`` (``path/skipped.csv`` if ``path`` is a folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "skipped.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8", errors="backslashreplace") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "reason"])
        writer.writerows(skipped)
    return path


def find_images(folder: str | Path, parameter: str = "image_dir", skipped_csv: str | Path | None = None,
                progress: bool = True) -> list[ImageRecord]:
    """The usable images under `folder` (recursively), after a full :func:`scan`: each skipped file is reported
    with its reason (printed, and written to `skipped_csv` when given). Fails, naming `parameter`, when the
    folder is missing or holds no usable image, so a notebook stops before any model loads."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{parameter}={str(folder)!r} is not a folder")
    result = scan(folder, progress=progress)
    for rel, reason in result.skipped[:20]:
        print(f"skipped {rel}: {reason}")
    if len(result.skipped) > 20:
        print(f"... and {len(result.skipped) - 20} more skipped files")
    if skipped_csv is not None:
        write_skipped_csv(result.skipped, skipped_csv)
    if not result.ok:
        raise ValueError(f"{parameter}={str(folder)!r} holds no usable image"
                         f" ({len(result.skipped)} file(s) skipped, see above)")
    return result.ok


T = TypeVar("T")


def split_by_image(items: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """A seeded split of images (or records) into (train, held out), never of patches; both keep the input order.
    With `fraction` > 0 and at least two items, at least one goes to each side."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = min(len(items) - 1, max(1, round(fraction * len(items)))) if fraction > 0 and len(items) > 1 else 0
    held = set(order[:n_val])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def to_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    """An RGB image (PIL, or a uint8 HxWx3 array) -> float (3, H, W) in [-1, 1] (what SD's VAE and LPIPS expect)."""
    array = np.array(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.uint8)
    return torch.from_numpy(array).permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_array(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """A (3, H, W) tensor in [-1, 1] -> HxWx3 uint8 (the inverse of `to_tensor`); an array is returned as is."""
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().clamp(-1, 1).add(1).mul(127.5).round().byte().permute(1, 2, 0).numpy()
    return np.asarray(image)


def to_rgb(im: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any Pillow image as 8-bit RGB.

    16- and 32-bit integer images (``I;16*``, ``I``) are read as 0..65535 and scaled by 255/65535
    (not clipped); float images (``F``) as 0..1 if their maximum is at most 1, else as 0..65535.
    Alpha and palette transparency are composited onto ``background`` (white by default).
    """
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        scale = 255.0 if im.mode == "F" and a.size and a.max() <= 1.0 else 255.0 / 65535.0
        grey = np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if im.mode == "P" and "transparency" not in im.info:
        return im.convert("RGB")
    if im.mode in ("P", "PA", "RGBA", "LA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def load_rgb(path: str | Path, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Open any image as 8-bit RGB, upright (EXIF orientation applied); see :func:`to_rgb`."""
    with Image.open(path) as im:
        im.load()
        upright = ImageOps.exif_transpose(im)
        return to_rgb(upright, background).copy()


def copy_names(records: list[ImageRecord]) -> list[str]:
    """Relative JPEG names for the training copies; ``a.png`` and ``a.jpg`` side by side become ``a_png.jpg``/``a_jpg.jpg``."""
    plain = [str(Path(r.relpath).with_suffix(".jpg").as_posix()) for r in records]
    clash = {n for n in plain if plain.count(n) > 1}
    return [
        Path(r.relpath).with_name(f"{Path(r.relpath).stem}_{Path(r.relpath).suffix[1:].lower()}.jpg").as_posix()
        if n in clash else n
        for r, n in zip(records, plain)
    ]


def make_training_copies(
    records: list[ImageRecord],
    out_dir: str | Path,
    long_side: int = 1024,
    quality: int = 90,
    overwrite: bool = False,
) -> list[Path]:
    """Write upright RGB JPEG copies of ``records`` under ``out_dir``, keeping sub-folders.

    Images are shrunk (Lanczos) so their long side is at most ``long_side``; smaller images keep
    their size (never enlarged). A caption sidecar ``image.txt`` is copied beside its copy.
    Originals are only read. Copies that exist are kept unless ``overwrite`` (so a second call
    resumes where the first stopped); each copy is written to a temporary name first.
    """
    if long_side <= 0:
        raise ValueError(f"long_side must be positive, got {long_side}")
    out_dir = Path(out_dir)
    written: list[Path] = []
    for rec, name in tqdm(list(zip(records, copy_names(records))), desc="training copies"):
        out = out_dir / name
        out.parent.mkdir(parents=True, exist_ok=True)
        if overwrite or not out.exists():
            im = load_rgb(rec.path)
            scale = long_side / max(im.size)
            if scale < 1:
                im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.LANCZOS)
            tmp = out.with_name(out.name + ".tmp")
            im.save(tmp, format="JPEG", quality=quality, subsampling=0)
            tmp.replace(out)
        caption = rec.path.with_suffix(".txt")
        if caption.is_file() and (overwrite or not out.with_suffix(".txt").exists()):
            shutil.copyfile(caption, out.with_suffix(".txt"))
        written.append(out)
    return written
