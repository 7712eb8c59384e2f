"""Scanning a folder of awkward images, normalising them to RGB, and training copies."""

from __future__ import annotations

import csv
import hashlib
import os
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdnb.data import walk
from sdnb.data.images import find_images, load_rgb, make_training_copies, scan, write_skipped_csv

BOMB_PIXELS = 100_000  # max_pixels for the scan: only big.png (400x400) is above it


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims ``width`` x ``height`` but holds no pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    (root / "nested" / "deeper").mkdir(parents=True)
    (root / ".ipynb_checkpoints").mkdir()
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))

    rgb.save(root / "good.jpg", quality=95)
    (root / "good.txt").write_text("a caption")  # sidecars: not images
    (root / "good.json").write_text("{}")
    buf = (root / "good.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(buf[: len(buf) // 2])
    (root / "zero.png").write_bytes(b"")
    (root / "notes.png").write_text("this is text, not a PNG")
    Image.new("CMYK", (32, 24), (0, 255, 255, 0)).save(root / "cmyk.jpg")  # red in CMYK
    ramp = (np.arange(32 * 16).reshape(16, 32) * 128).astype(np.uint16)  # 0..65408
    Image.fromarray(ramp).save(root / "grey16.png")
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([0, 255, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((5, 5), 1)
    pal.save(root / "palette.png", transparency=0)  # index 0 (green) transparent
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    rgba.putpixel((3, 3), (0, 0, 255, 255))
    rgba.save(root / "rgba.png")
    Image.new("L", (20, 10), 77).save(root / "nested" / "grey.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.new("RGB", (40, 20), (10, 200, 30)).save(root / "nested" / "deeper" / "rotated.jpg", exif=exif)
    rgb.save(root / "nested" / "фото 写真 é.png")  # unicode name
    Image.new("RGB", (400, 400), (1, 2, 3)).save(root / "big.png")  # above max_pixels in the test
    _png_header_only(root / "bomb.png", 50_000, 50_000)  # above Pillow's own limit
    rgb.save(root / ".hidden.jpg")
    rgb.save(root / ".ipynb_checkpoints" / "good-checkpoint.jpg")
    (root / "Thumbs.db").write_bytes(b"\x00" * 10)
    return root


@pytest.fixture(scope="module")
def result(corpus):
    return scan(corpus, max_pixels=BOMB_PIXELS, progress=False)


def test_scan_keeps_usable_images(result):
    ok = {r.relpath: r for r in result.ok}
    assert sorted(ok) == sorted([
        "good.jpg", "cmyk.jpg", "grey16.png", "palette.png", "rgba.png", "nested/grey.png",
        "nested/deeper/rotated.jpg", "nested/фото 写真 é.png",
    ])
    assert (ok["cmyk.jpg"].mode, ok["grey16.png"].mode, ok["palette.png"].mode) == ("CMYK", "I;16", "P")
    assert (ok["nested/deeper/rotated.jpg"].width, ok["nested/deeper/rotated.jpg"].height) == (20, 40)
    assert ok["good.jpg"].format == "JPEG" and (ok["good.jpg"].width, ok["good.jpg"].height) == (64, 48)


def test_scan_skips_bad_files_with_reasons(result):
    reasons = dict(result.skipped)
    assert sorted(reasons) == ["big.png", "bomb.png", "notes.png", "truncated.jpg", "zero.png"]
    assert reasons["zero.png"] == "empty file"
    assert "UnidentifiedImageError" in reasons["notes.png"]
    assert "truncated" in reasons["truncated.jpg"]
    assert "max_pixels" in reasons["big.png"] and "400x400" in reasons["big.png"]
    assert reasons["bomb.png"].startswith("decompression bomb")
    assert result.summary() == "8 images ok, 5 skipped"


def test_skipped_csv(result, tmp_path):
    path = write_skipped_csv(result.skipped, tmp_path)
    assert path == tmp_path / "skipped.csv"
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["file", "reason"]
    assert sorted(r[0] for r in rows[1:]) == sorted(f for f, _ in result.skipped)
    assert ["zero.png", "empty file"] in rows


def test_load_rgb_normalises_every_mode(corpus, result):
    for rec in result.ok:
        im = load_rgb(rec.path)
        assert im.mode == "RGB" and im.size == (rec.width, rec.height), rec.relpath
    assert load_rgb(corpus / "cmyk.jpg").getpixel((0, 0))[0] > 200  # red stays red
    grey16 = np.asarray(load_rgb(corpus / "grey16.png"))[..., 0]
    ramp = (np.arange(32 * 16).reshape(16, 32) * 128).astype(np.float64)
    assert np.abs(grey16 - ramp * 255 / 65535).max() <= 0.5  # scaled, not clipped
    assert grey16.max() == 255 and len(np.unique(grey16)) > 200
    pal = load_rgb(corpus / "palette.png")
    assert pal.getpixel((0, 0)) == (255, 255, 255) and pal.getpixel((5, 5)) == (0, 0, 255)
    rgba = load_rgb(corpus / "rgba.png")
    assert rgba.getpixel((0, 0)) == (255, 255, 255) and rgba.getpixel((3, 3)) == (0, 0, 255)
    rotated = load_rgb(corpus / "nested" / "deeper" / "rotated.jpg")
    assert rotated.size == (20, 40)  # EXIF orientation 6 applied: width and height swapped
    assert load_rgb(corpus / "nested" / "grey.png").getpixel((0, 0)) == (77, 77, 77)


def _hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_training_copies_resize_keep_layout_and_leave_originals(corpus, result, tmp_path):
    before = _hashes(corpus)
    out = tmp_path / "copies"
    paths = make_training_copies(result.ok, out, long_side=32, quality=90)
    assert _hashes(corpus) == before  # originals byte-for-byte unchanged

    assert len(paths) == len(result.ok) and all(p.suffix == ".jpg" for p in paths)
    assert (out / "nested" / "deeper" / "rotated.jpg").is_file()
    assert (out / "nested" / "фото 写真 é.jpg").is_file()
    assert (out / "good.txt").read_text() == "a caption"  # caption sidecar travels with its image
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and max(im.size) <= 32
    with Image.open(out / "good.jpg") as im:
        assert im.size == (32, 24)  # 64x48 shrunk to long side 32
    with Image.open(out / "nested" / "deeper" / "rotated.jpg") as im:
        assert im.size == (16, 32)  # upright, then shrunk
    with Image.open(out / "nested" / "grey.png".replace(".png", ".jpg")) as im:
        assert im.size == (20, 10)  # smaller than long_side: never enlarged

    stamp = {p: p.stat().st_mtime_ns for p in paths}
    (out / "cmyk.jpg").unlink()  # as if the first run stopped before this one
    (out / "good.txt").write_text("a caption the reviewer edited")  # in run_dir/train, not in the original folder
    again = make_training_copies(result.ok, out, long_side=32)
    assert again == paths and (out / "cmyk.jpg").is_file()
    assert (out / "good.txt").read_text() == "a caption the reviewer edited"  # the original's .txt never wins
    assert all(p.stat().st_mtime_ns == stamp[p] for p in paths if p.name != "cmyk.jpg")  # kept, not redone
    assert _hashes(corpus) == before


def test_same_stem_different_extension_do_not_collide(tmp_path):
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "a.jpg")
    paths = make_training_copies(scan(tmp_path, progress=False).ok, tmp_path / "out")
    assert sorted(p.name for p in paths) == ["a_jpg.jpg", "a_png.jpg"]


def test_scan_of_missing_folder_names_it(tmp_path):
    with pytest.raises(NotADirectoryError, match="nowhere"):
        scan(tmp_path / "nowhere")


def test_hostile_entries_never_stop_or_hang_a_scan_and_each_is_listed(tmp_path, monkeypatch, capsys):
    """A link loop, a dangling link, a FIFO named *.png, a folder link back to its parent, an unreadable folder."""
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    (tmp_path / "locked").mkdir()
    Image.new("RGB", (8, 8), (0, 255, 0)).save(tmp_path / "sub" / "b.png")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "locked" / "c.png")
    os.symlink("loop.png", tmp_path / "loop.png")
    os.symlink("missing.png", tmp_path / "dangling.png")
    os.mkfifo(tmp_path / "pipe.png")  # opening it would block until someone writes
    os.symlink("..", tmp_path / "sub" / "up")
    real_scandir = os.scandir

    def scandir(path):  # root reads every folder, so the unreadable one is simulated
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(walk.os, "scandir", scandir)
    found = []
    scanner = threading.Thread(target=lambda: found.append(find_images(tmp_path, skipped_csv=tmp_path / "s.csv",
                                                                       progress=False)), daemon=True)
    scanner.start()
    scanner.join(60)
    if scanner.is_alive():  # release the blocked open before failing
        os.close(os.open(tmp_path / "pipe.png", os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("the scan hung")
    assert [r.relpath for r in found[0]] == ["a.png", "sub/b.png"]
    with open(tmp_path / "s.csv", newline="") as f:
        reasons = dict(list(csv.reader(f))[1:])
    assert reasons == {
        "dangling.png": "dangling symbolic link (to missing.png, which does not exist)",
        "locked/": "unreadable folder (PermissionError: Permission denied): its images are left out",
        "loop.png": "symbolic link loop",
        "pipe.png": "not a regular file (a FIFO): not opened",
        "sub/up/": f"symbolic link loop (or a second link): leads to {os.path.realpath(tmp_path)}, already scanned"}
    assert "skipped locked/: unreadable folder" in capsys.readouterr().out
