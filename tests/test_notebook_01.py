"""notebooks/01_captioning.ipynb run headless with papermill on the tiny BLIP and the embedded photos."""

from __future__ import annotations

import ast
import csv
import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from sdnb.caption import CaptionConfig
from sdnb.config import ConfigError

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "01_captioning.ipynb"


def _parameters_cell() -> dict:
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    source = next("".join(c["source"]) for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))
    return {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(source).body}


def test_the_notebook_defaults_make_a_valid_config_and_bad_values_name_the_parameter():
    defaults = _parameters_cell()
    cfg = CaptionConfig(**defaults)
    assert cfg.generation()["repetition_penalty"] == 1.4 and cfg.suffix == " unsplash photography"
    assert set(defaults) == {f.name for f in dataclasses.fields(CaptionConfig)}  # each parameter reaches the config
    for name, bad in (("num_beams", 0), ("top_p", 1.5), ("min_length", 99), ("sweep_grid", {"beams": [1]}),
                      ("jpeg_quality", 101)):
        with pytest.raises(ConfigError, match=name):
            CaptionConfig(**{**defaults, name: bad})


def test_notebook_captions_the_photos(tiny_assets, tmp_path, monkeypatch):
    import papermill

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel's torch: one thread beats two contended ones
    photos = tmp_path / "photos"
    shutil.copytree(tiny_assets.photos, photos)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in photos.rglob("*") if p.is_file()}
    run = tmp_path / "run"
    papermill.execute_notebook(
        str(NOTEBOOK), str(tmp_path / "01.ipynb"), progress_bar=False, kernel_name="python3",
        parameters=dict(run_dir=str(run), image_dir=str(photos), captioner_id=str(tiny_assets.blip), device="cpu",
                        mixed_precision="no", num_beams=2, min_length=2, max_length=8, sweep_images=3,
                        sweep_grid={"repetition_penalty": [1.0, 1.4]}, sync_dir=str(tmp_path / "drive")),
    )

    assert json.loads((run / "config.json").read_text())["num_beams"] == 2
    with open(run / "skipped.csv", newline="", encoding="utf-8") as f:
        assert [row["file"] for row in csv.DictReader(f)] == ["broken.jpg"]
    readable = [p for p in before if p.suffix.lower() in (".jpg", ".jpeg", ".png") and p.name != "broken.jpg"]
    lines = (run / "train" / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(readable) > 0
    for row in map(json.loads, lines):
        image = run / "train" / row["file_name"]
        assert image.is_file() and row["text"].endswith(" unsplash photography")
        assert image.with_suffix(".txt").read_text(encoding="utf-8").strip() == row["text"]
    for grid in ("photos.png", "sweep.png", "sweep.html"):
        assert (run / "grids" / grid).stat().st_size > 5_000, grid
    assert (run / "grids" / "sweep.html").read_text(encoding="utf-8").count("<tr>") == 1 + 2  # header + 2 settings
    cells = [c for c in json.loads((tmp_path / "01.ipynb").read_text())["cells"] if c["cell_type"] == "code"]
    reviewer = next(c for c in cells if "review(" in "".join(c["source"]))
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in reviewer["outputs"])
    mirrored = tmp_path / "drive" / "train" / "metadata.jsonl"  # the captions survive a reset runtime
    assert mirrored.read_text(encoding="utf-8") == (run / "train" / "metadata.jsonl").read_text(encoding="utf-8")
    assert before == {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in photos.rglob("*") if p.is_file()}
