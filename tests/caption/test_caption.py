"""BLIP captioning on the tiny BLIP: a folder with bad files, carried-over captions, resume, the sweep, the reviewer.

The tiny BLIP writes meaningless words, but through the real transformers classes and the real files.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from sdnb.caption import caption_folder, load_captioner, sweep
from sdnb.data.images import scan, write_skipped_csv
from sdnb.data.captions import read_caption, read_metadata, save_caption

GEN = dict(num_beams=2, min_length=2, max_length=8)  # small and fast; the code path is the full one
BAD = {"truncated.jpg", "empty.png", "notes.png"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread than on two contended ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def captioner(tiny_assets):
    return load_captioner(tiny_assets.blip, "cpu")


class Counting:
    """Wraps a captioner: counts the images it captions, and raises KeyboardInterrupt past ``fail_after``."""

    def __init__(self, inner, fail_after: int | None = None):
        self.inner, self.fail_after, self.images = inner, fail_after, 0

    def caption(self, images, **gen):
        if self.fail_after is not None and self.images + len(images) > self.fail_after:
            raise KeyboardInterrupt
        self.images += len(images)
        return self.inner.caption(images, **gen)


def _photos(tiny_assets) -> list[Path]:
    photos = sorted(p for p in Path(tiny_assets.photos).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    assert len(photos) >= 2, f"expected tiny photos in {tiny_assets.photos}"
    return photos[:4]


@pytest.fixture()
def corpus(tiny_assets, tmp_path) -> Path:
    """Real photos (one with a caption of its own, one nested, one with a unicode name) among bad files."""
    root = tmp_path / "photos"
    (root / "nested").mkdir(parents=True)
    photos = _photos(tiny_assets)
    for i, src in enumerate(photos):
        name = "фото é.jpg" if i == 1 else f"photo{i}{src.suffix}"
        shutil.copyfile(src, (root / "nested" if i == 2 else root) / name)
    (root / "photo0.txt").write_text("my own caption, kept\n", encoding="utf-8")
    data = photos[0].read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (root / "empty.png").write_bytes(b"")
    (root / "notes.png").write_text("not a picture")
    Image.new("RGBA", (40, 30), (255, 0, 0, 128)).save(root / "nested" / "rgba.png")
    return root


def _hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_captions_every_readable_photo_and_leaves_the_originals_alone(corpus, captioner, tmp_path):
    before = _hashes(corpus)
    found = scan(corpus, progress=False)
    skipped_csv = write_skipped_csv(found.skipped, tmp_path / "run" / "skipped.csv")
    counting = Counting(captioner)
    result = caption_folder(found.ok, tmp_path / "run" / "train", counting, batch_size=2, progress=False,
                            suffix=" unsplash photography", **GEN)

    readable = len(found.ok)
    assert readable == len(before) - len(BAD) - 1  # every file but the bad ones and the caption sidecar
    with open(skipped_csv, newline="", encoding="utf-8") as f:
        assert {row["file"] for row in csv.DictReader(f)} == BAD
    rows = read_metadata(result.metadata)
    assert len(rows) == readable and counting.images == readable - 1  # photo0 keeps its own caption
    for row in rows:
        image = result.out_dir / row["file_name"]
        assert image.is_file() and Image.open(image).format == "JPEG"
        assert read_caption(image.with_suffix(".txt")) == row["text"]
    texts = {row["file_name"]: row["text"] for row in rows}
    assert texts["photo0.jpg"] == "my own caption, kept"
    generated = [t for name, t in texts.items() if name != "photo0.jpg"]
    assert all(t.endswith(" unsplash photography") and len(t.split()) > 2 for t in generated)
    assert "nested/rgba.jpg" in texts and "фото é.jpg" in texts
    assert result.count("original") == 1 and result.count("generated") == readable - 1
    assert _hashes(corpus) == before  # byte for byte, and no file added beside the originals


def test_an_interrupted_run_resumes_where_it_stopped(corpus, captioner, tmp_path):
    found = scan(corpus, progress=False)
    out = tmp_path / "train"
    to_generate = len(found.ok) - 1  # photo0 has its own caption
    with pytest.raises(KeyboardInterrupt):
        caption_folder(found.ok, out, Counting(captioner, fail_after=2), batch_size=1, progress=False, **GEN)
    assert len(list(out.rglob("*.txt"))) == 1 + 2  # the carried-over caption and the two finished ones
    assert not list(out.rglob("*.tmp"))

    again = Counting(captioner)
    result = caption_folder(found.ok, out, again, batch_size=1, progress=False, **GEN)
    assert again.images == to_generate - 2  # the first two are not regenerated
    assert (result.count("kept"), result.count("generated")) == (3, to_generate - 2)
    assert len(read_metadata(out)) == len(found.ok)


def test_overwrite_regenerates_carried_over_and_edited_captions(corpus, captioner, tmp_path):
    found = scan(corpus, progress=False)
    out = tmp_path / "train"
    caption_folder(found.ok, out, captioner, progress=False, **GEN)
    save_caption(out, next(r["file_name"] for r in read_metadata(out) if r["file_name"] != "photo0.jpg"), "edited")
    kept = Counting(captioner)
    caption_folder(found.ok, out, kept, progress=False, **GEN)
    assert kept.images == 0  # nothing missing: edits and carried-over captions stay

    counting = Counting(captioner)
    result = caption_folder(found.ok, out, counting, overwrite=True, progress=False, **GEN)
    assert counting.images == len(found.ok) and result.count("generated") == len(found.ok)
    texts = [row["text"] for row in read_metadata(out)]
    assert "my own caption, kept" not in texts and "edited" not in texts


def test_reference_captions_from_unsplash_jsonl(tiny_assets, captioner, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for src in _photos(tiny_assets)[:2]:
        shutil.copyfile(src, photos / f"{src.stem}.jpg")
    first = sorted(photos.iterdir())[0].name
    (photos / "unsplash.jsonl").write_text(json.dumps({"file_name": first, "ai_description": "a  red\nfox"}) + "\n")
    result = caption_folder(scan(photos, progress=False).ok, tmp_path / "train", captioner, progress=False, **GEN)
    rows = {r["file_name"]: r for r in read_metadata(result.metadata)}
    assert rows[first]["reference"] == "a red fox"
    assert [r.get("reference", "") for name, r in rows.items() if name != first] == [""]


def test_caption_options(tiny_assets, captioner):
    from transformers import BlipProcessor

    images = [Image.open(p).convert("RGB") for p in _photos(tiny_assets)[:3]]
    one_by_one = [captioner.caption([im], **GEN)[0] for im in images]
    assert captioner.caption(images, **GEN) == one_by_one  # batching changes nothing but speed

    prompted = captioner.caption(images[:1], prompt="a photograph of", prefix="<", suffix=">", **GEN)[0]
    assert prompted.startswith("<a photograph of ") and prompted.endswith(">")
    tokenizer = BlipProcessor.from_pretrained(tiny_assets.blip).tokenizer
    long = captioner.caption(images[:1], num_beams=1, min_length=28, max_length=30)[0]
    assert len(tokenizer(long, add_special_tokens=False)["input_ids"]) > 20  # past generate's 20-token default
    short = captioner.caption(images[:1], num_beams=1, min_length=1, max_length=3)[0]
    assert 1 <= len(short.split()) <= 3

    sampled = [captioner.caption(images[:1], top_p=0.9, max_length=8, seed=s)[0] for s in (1, 1, 2)]
    assert sampled[0] == sampled[1]  # the seed makes nucleus sampling repeatable
    for bad, name in ((dict(num_beams=0), "num_beams"), (dict(top_p=1.5), "top_p"),
                      (dict(min_length=-1), "min_length"), (dict(max_length=0), "max_length")):
        with pytest.raises(ValueError, match=name):
            captioner.caption(images[:1], **bad)


def test_a_missing_captioner_names_the_folder(tmp_path):
    with pytest.raises(OSError, match="no-blip-here"):
        load_captioner(tmp_path / "no-blip-here", "cpu")
    with pytest.raises(ValueError, match="dtype"):
        load_captioner(tmp_path, "cpu", dtype="fp8")


def test_sweep_table_of_settings(tiny_assets, captioner, tmp_path):
    photos = _photos(tiny_assets)
    grid = {"repetition_penalty": [1.0, 1.4], "max_length": [4, 8]}
    table = sweep(captioner, photos, grid, n=2, seed=3, num_beams=1)
    assert len(table.settings) == 4 and all(len(caps) == 2 for caps in table.captions)
    assert len(table.rows()) == 8 and {"repetition_penalty", "max_length", "image", "caption"} <= set(table.rows()[0])
    assert sweep(captioner, photos, {"num_beams": [1]}, n=2, seed=3).names == table.names  # same sample, same seed
    html = table.save(tmp_path / "grids" / "sweep.html").read_text(encoding="utf-8")
    assert html.count("data:image/jpeg;base64,") == 2 and "repetition_penalty = 1.4" in html
    assert Image.open(table.save(tmp_path / "grids" / "sweep.png")).size[0] > 400
    with pytest.raises(ValueError, match="beams"):
        sweep(captioner, photos, {"beams": [1, 2]})


def test_reviewer_saves_to_sidecar_and_metadata(tiny_assets, captioner, tmp_path):
    from sdnb.caption import CaptionReviewer, captions_html

    photos = tmp_path / "photos"
    photos.mkdir()
    for src in _photos(tiny_assets)[:3]:
        shutil.copyfile(src, photos / f"{src.stem}.jpg")
    result = caption_folder(scan(photos, progress=False).ok, tmp_path / "train", captioner, progress=False, **GEN)
    first, second = (item.file_name for item in result.items[:2])

    sidecar = save_caption(result.out_dir, first, "  a fixed\ncaption ")
    assert sidecar.read_text(encoding="utf-8") == "a fixed caption\n"
    rows = read_metadata(result.out_dir)
    assert rows[0] == {"file_name": first, "text": "a fixed caption"} and len(rows) == 3
    with pytest.raises(FileNotFoundError, match="nothing.jpg"):
        save_caption(result.out_dir, "nothing.jpg", "x")

    reviewer = CaptionReviewer(result.out_dir)
    assert reviewer.text.value == "a fixed caption" and reviewer.image.value[:2] == b"\xff\xd8"
    reviewer.next()
    assert (reviewer.index, reviewer.slider.value, reviewer.file_name) == (1, 1, second)
    reviewer.text.value = "edited in the widget"
    assert "unsaved" in reviewer.status.value
    reviewer.save_and_next()
    assert read_caption((result.out_dir / second).with_suffix(".txt")) == "edited in the widget"
    assert read_metadata(result.out_dir)[1]["text"] == "edited in the widget" and reviewer.index == 2
    reviewer.slider.value = 0
    assert reviewer.file_name == first and reviewer.text.value == "a fixed caption"
    assert "edited in the widget" in captions_html(result.out_dir)
