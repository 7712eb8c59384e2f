"""Data sets by name: the data manifest, :func:`fetch`, and Unsplash Lite photos.

``data_manifest.csv`` (at the repository root, with a copy shipped inside the package) has one
row per data set: ``name,source,sha256,size,license,description,target``. ``source`` is an
https URL, ``gdrive:<file id>``, or ``sdnb-tiny:<kind>`` for the small sample images that
``python -m sdnb.tiny DIR`` writes offline (listed for their licence, not downloaded). ``target`` is the
file name of the download inside ``dest``.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import requests
from tqdm.auto import tqdm

from sdnb.data.archive import UnsafeArchiveError, extract
from sdnb.data.download import ChecksumError, download, download_gdrive, sha256_file

__all__ = [
    "ChecksumError", "ManifestEntry", "UnsafeArchiveError", "download", "extract", "fetch",
    "fetch_unsplash_lite", "read_manifest", "sha256_file", "unsplash_image_url",
]

MANIFEST_COLUMNS = ("name", "source", "sha256", "size", "license", "description", "target")
_ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".rar")
UNSPLASH_LICENSE_NOTE = (
    "Unsplash Lite data set: Unsplash Data License Terms (unsplash.com/data-terms); photo by the "
    "named photographer on Unsplash. Stored for internal model training; do not redistribute."
)


@dataclass(frozen=True)
class ManifestEntry:
    """One row of the data manifest."""

    name: str
    source: str
    sha256: str | None
    size: int | None
    license: str
    description: str
    target: str

    @property
    def is_archive(self) -> bool:
        return self.target.lower().endswith(_ARCHIVE_SUFFIXES)


def default_manifest() -> Path:
    """The manifest shipped in the package, else the one at the repository root."""
    packaged = resources.files("sdnb.data") / "data_manifest.csv"
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "data_manifest.csv"


def read_manifest(manifest: str | Path | None = None) -> dict[str, ManifestEntry]:
    """Read the manifest into ``{name: ManifestEntry}``; a malformed row raises naming the file and line."""
    path = Path(manifest) if manifest is not None else default_manifest()
    entries: dict[str, ManifestEntry] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != MANIFEST_COLUMNS:
            raise ValueError(f"{path}: columns must be {','.join(MANIFEST_COLUMNS)}, got {reader.fieldnames}")
        for row in reader:
            where = f"{path}, line {reader.line_num}"
            try:
                size = int(row["size"]) if row["size"] else None
            except ValueError:
                raise ValueError(f"{where}: size {row['size']!r} is not an integer") from None
            digest = row["sha256"].strip().lower() or None
            if digest is not None and (len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest)):
                raise ValueError(f"{where}: sha256 {row['sha256']!r} is not 64 hex digits")
            if not row["source"].startswith(("https://", "http://", "gdrive:", "sdnb-tiny:")):
                raise ValueError(f"{where}: source {row['source']!r} must be an URL, gdrive:<id> or sdnb-tiny:<kind>")
            if row["name"] in entries:
                raise ValueError(f"{where}: duplicate name {row['name']!r}")
            entries[row["name"]] = ManifestEntry(
                row["name"], row["source"], digest, size, row["license"], row["description"], row["target"]
            )
    return entries


def fetch(name: str, dest: str | Path, manifest: str | Path | None = None, *, unpack: bool = True) -> Path:
    """Fetch the data set ``name`` from the manifest into the folder ``dest``; return its path.

    The download lands at ``dest/<target>`` (resumed, verified, done once). An archive is then
    extracted into ``dest/<name>/`` (unless ``unpack=False``), which is returned; otherwise the
    downloaded file is. Calling it again does no request and no extraction.
    """
    entries = read_manifest(manifest)
    if name not in entries:
        raise KeyError(f"no data set {name!r} in the manifest; known: {', '.join(sorted(entries))}")
    entry, dest = entries[name], Path(dest)
    if entry.source.startswith("sdnb-tiny:"):
        raise ValueError(f"{name!r} is part of the embedded default, written offline rather than downloaded: "
                         f"run `python -m sdnb.tiny {dest}` (it writes {entry.target} there)")
    file = dest / entry.target
    if entry.source.startswith("gdrive:"):
        download_gdrive(entry.source.split(":", 1)[1], file, sha256=entry.sha256, size=entry.size)
    else:
        download(entry.source, file, sha256=entry.sha256, size=entry.size)
    if entry.is_archive and unpack:
        extract(file, dest / name)
        return dest / name
    return file


def unsplash_image_url(photo_image_url: str, width: int = 1024) -> str:
    """The Unsplash (imgix) image URL for a JPEG at most ``width`` pixels wide (never upscaled)."""
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    parts = urlsplit(photo_image_url)
    query = dict(parse_qsl(parts.query))
    query.update({"w": str(width), "fit": "max", "fm": "jpg", "q": "90"})
    return urlunsplit(parts._replace(query=urlencode(query)))


def _read_photos(photos_tsv: Path) -> list[dict[str, str]]:
    files = sorted(photos_tsv.glob("photos.tsv*")) if photos_tsv.is_dir() else [photos_tsv]
    if not files:
        raise FileNotFoundError(f"no photos.tsv* in {photos_tsv}")
    rows: list[dict[str, str]] = []
    for file in files:
        with open(file, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t")
            missing = {"photo_id", "photo_image_url"} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{file}: missing column(s) {', '.join(sorted(missing))}")
            rows.extend(r for r in reader if r.get("photo_id") and r.get("photo_image_url"))
    return rows


def fetch_unsplash_lite(
    photos_tsv: str | Path, dest: str | Path, n: int = 500, seed: int = 0, width: int = 1024,
    retries: int = 3, backoff: float = 1.0,
) -> list[Path]:
    """Download ``n`` Unsplash Lite photos, chosen reproducibly by ``seed``, at most ``width`` px wide.

    ``photos_tsv`` is the ``photos.tsv000`` of the Unsplash Lite data set (or the folder holding
    it). Each photo is saved as ``dest/<photo_id>.jpg``; ``dest/unsplash.jsonl`` keeps one line per
    saved photo with its id, photographer, url, ``ai_description`` and a license note. A photo that
    fails is reported and skipped. sdnb does not redistribute these images: they are fetched from
    Unsplash by each user under the Unsplash Data License Terms.
    """
    rows = sorted(_read_photos(Path(photos_tsv)), key=lambda r: r["photo_id"])
    chosen = random.Random(seed).sample(rows, min(n, len(rows)))
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    saved: list[Path] = []
    records: list[dict[str, str]] = []
    failed: list[tuple[str, str]] = []
    with requests.Session() as session:
        for row in tqdm(chosen, desc="unsplash photos"):
            pid = row["photo_id"]
            url = unsplash_image_url(row["photo_image_url"], width)
            try:
                path = download(url, dest / f"{pid}.jpg", retries=retries, backoff=backoff, session=session)
            except (requests.RequestException, ConnectionError, OSError) as e:
                failed.append((pid, f"{type(e).__name__}: {e}"))
                continue
            saved.append(path)
            records.append({
                "photo_id": pid, "file_name": path.name, "photographer": row.get("photographer_username", ""),
                "url": row.get("photo_url", ""), "image_url": url,
                "ai_description": row.get("ai_description", ""), "license": UNSPLASH_LICENSE_NOTE,
            })
    with open(dest / "unsplash.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    for pid, reason in failed:
        print(f"unsplash: skipped photo {pid}: {reason}")
    if failed:
        print(f"unsplash: {len(saved)} of {len(chosen)} photos saved, {len(failed)} skipped")
    return saved
