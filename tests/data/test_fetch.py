"""Downloads against a real HTTP server on 127.0.0.1, and safe archive extraction."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sdnb.data.download import DownloadError
from sdnb.data.fetch import (
    ChecksumError, UnsafeArchiveError, download, extract, fetch, fetch_unsplash_lite, read_manifest,
    unsplash_image_url,
)

BLOB = os.urandom(300_000)
BLOB_SHA = hashlib.sha256(BLOB).hexdigest()
REPO = Path(__file__).resolve().parents[2]


class Server:
    """Serves ``files`` with Range support; can cut the first response short, ignore Range, or fail."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {"/blob.bin": BLOB}
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.drop_first_after: int | None = None  # bytes sent before the connection is cut
        self.ignore_range = False
        self.fail_first: int = 0  # this many 503 answers first
        self.content_type = "application/octet-stream"
        self.redirects: dict[str, str] = {}  # path -> Location
        self.cut_always: int | None = None  # every body ends after this many bytes (Content-Length says more)
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                server.requests.append((self.path.split("?")[0], self.headers.get("Range")))
                if server.fail_first:
                    server.fail_first -= 1
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.path in server.redirects:
                    self.send_response(302)
                    self.send_header("Location", server.redirects[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = server.files.get(self.path.split("?")[0])
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start, status = 0, 200
                rng = self.headers.get("Range")
                if rng and not server.ignore_range:
                    start, status = int(rng.split("=")[1].split("-")[0]), 206
                body = data[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Content-Type", server.content_type)
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if server.cut_always is not None:
                    self.wfile.write(body[:server.cut_always])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if server.drop_first_after is not None:
                    cut, server.drop_first_after = server.drop_first_after, None
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    with Server() as s:
        yield s


def test_interrupted_download_resumes_with_range(server, tmp_path):
    server.drop_first_after = 100_000
    path = download(f"{server.url}/blob.bin", tmp_path / "blob.bin", sha256=BLOB_SHA, backoff=0.01)
    assert path.read_bytes() == BLOB
    assert [r for _, r in server.requests] == [None, "bytes=100000-"]  # resumed where it was cut
    assert not (tmp_path / "blob.bin.part").exists()


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.drop_first_after = 100_000
    server.ignore_range = True
    path = download(f"{server.url}/blob.bin", tmp_path / "blob.bin", sha256=BLOB_SHA, backoff=0.01)
    assert path.read_bytes() == BLOB
    assert server.requests[1][1] is not None  # asked to resume, got the whole file (200)


def test_server_errors_are_retried_then_give_up(server, tmp_path):
    server.fail_first = 2
    download(f"{server.url}/blob.bin", tmp_path / "a.bin", sha256=BLOB_SHA, backoff=0.01)
    assert len(server.requests) == 3
    server.fail_first = 10
    with pytest.raises(ConnectionError, match="failed 3 times"):
        download(f"{server.url}/blob.bin", tmp_path / "b.bin", retries=2, backoff=0.01)


def test_wrong_checksum_is_refused_and_set_aside(server, tmp_path):
    wrong = "0" * 64
    with pytest.raises(ChecksumError) as err:
        download(f"{server.url}/blob.bin", tmp_path / "blob.bin", sha256=wrong, backoff=0.01)
    message = str(err.value)
    assert "blob.bin" in message and wrong in message and BLOB_SHA in message
    assert not (tmp_path / "blob.bin").exists()
    assert (tmp_path / "blob.bin.bad").read_bytes() == BLOB


def test_existing_file_with_wrong_hash_is_replaced(server, tmp_path):
    (tmp_path / "blob.bin").write_bytes(b"stale")
    download(f"{server.url}/blob.bin", tmp_path / "blob.bin", sha256=BLOB_SHA)
    assert (tmp_path / "blob.bin").read_bytes() == BLOB
    assert (tmp_path / "blob.bin.bad").read_bytes() == b"stale"


def test_second_call_makes_no_request(server, tmp_path):
    url = f"{server.url}/blob.bin"
    download(url, tmp_path / "blob.bin", sha256=BLOB_SHA)
    download(url, tmp_path / "blob.bin", sha256=BLOB_SHA)
    download(url, tmp_path / "blob.bin")  # without a checksum too: the stamp says it is complete
    assert len(server.requests) == 1


def test_a_stamp_for_an_older_hash_is_not_accepted_under_a_new_one(server, tmp_path):
    url, path = f"{server.url}/blob.bin", tmp_path / "blob.bin"
    download(url, path, sha256=BLOB_SHA)
    assert (tmp_path / "blob.bin.sha256").read_text() == f"{BLOB_SHA} {len(BLOB)} blob.bin {url}\n"  # size, hash, URL
    newer = os.urandom(len(BLOB))  # the data set was re-released: same size, new hash
    server.files["/blob.bin"] = newer
    download(url, path, sha256=hashlib.sha256(newer).hexdigest())
    assert path.read_bytes() == newer and len(server.requests) == 2
    assert (tmp_path / "blob.bin.bad").read_bytes() == BLOB  # the older file set aside, not used


def test_without_a_checksum_a_web_page_a_truncated_body_and_a_redirect_loop_are_refused(server, tmp_path):
    server.content_type = "text/html; charset=utf-8"  # a login wall or a "confirm download" page
    with pytest.raises(DownloadError) as err:
        download(f"{server.url}/blob.bin", tmp_path / "a.bin", backoff=0.01)
    assert str(err.value) == (f"{server.url}/blob.bin: the server sent a web page (Content-Type: text/html) instead "
                              "of a.bin: the link may need a login or a confirmation (Google Drive's virus-scan page), "
                              "or has moved; open it in a browser and use the file's direct link")
    assert not (tmp_path / "a.bin").exists() and len(server.requests) == 1  # not retried
    server.content_type, server.cut_always, server.ignore_range = "application/zip", 1000, True  # always cut short
    with pytest.raises(ConnectionError, match="failed 3 times in a row"):
        download(f"{server.url}/blob.bin", tmp_path / "b.bin", retries=2, backoff=0.01)
    assert not (tmp_path / "b.bin").exists()  # never taken for the file
    server.redirects = {"/loop": "/loop"}
    with pytest.raises(DownloadError, match=f"^{server.url}/loop: too many redirects \\(over 30: a redirect loop, via "):
        download(f"{server.url}/loop", tmp_path / "c.bin", backoff=0.01)


def _tar_bytes(members: list[tarfile.TarInfo], payload: bytes = b"x") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for info in members:
            if info.isfile():
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
            else:
                tf.addfile(info)
    return buf.getvalue()


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize(
    "member, match",
    [
        (tarfile.TarInfo("../evil.txt"), r"'\.\.' component"),
        (tarfile.TarInfo("data/../../evil.txt"), r"'\.\.' component"),
        (tarfile.TarInfo("/tmp/evil.txt"), "absolute path"),
        (_link("data/link", "../../outside"), "points outside"),
        (_link("data/link", "/etc/passwd"), "absolute path"),
        (_link("hard", "../outside", tarfile.LNKTYPE), "points outside"),
    ],
)
def test_unsafe_tar_members_are_refused(tmp_path, member, match):
    archive = tmp_path / "bad.tar.gz"
    archive.write_bytes(_tar_bytes([tarfile.TarInfo("ok.txt"), member]))
    with pytest.raises(UnsafeArchiveError, match=match) as err:
        extract(archive, tmp_path / "out")
    assert member.name in str(err.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil.txt").exists()
    assert not (tmp_path / ".out.extracting").exists()


@pytest.mark.parametrize("name", ["../evil.txt", "/abs/evil.txt", "a\\..\\..\\evil.txt"])
def test_unsafe_zip_members_are_refused(tmp_path, name):
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok.txt", "fine")
        zf.writestr(zipfile.ZipInfo(name), "evil")
    with pytest.raises(UnsafeArchiveError, match=r"absolute|'\.\.'"):
        extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_zip_symlink_pointing_outside_is_refused(tmp_path):
    archive = tmp_path / "link.zip"
    info = zipfile.ZipInfo("data/link")
    info.external_attr = (0o120777 << 16)  # S_IFLNK
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(info, "../../secret")
    with pytest.raises(UnsafeArchiveError, match="points outside"):
        extract(archive, tmp_path / "out")


def test_safe_archive_extracts_once_with_links_inside(tmp_path):
    archive = tmp_path / "good.tar.gz"
    archive.write_bytes(_tar_bytes([tarfile.TarInfo("d/a.txt"), _link("d/b.txt", "a.txt")], payload=b"hello"))
    files = extract(archive, tmp_path / "out")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in files) == ["d/a.txt", "d/b.txt"]
    assert (tmp_path / "out/d/b.txt").read_bytes() == b"hello"
    (tmp_path / "out/d/a.txt").write_bytes(b"changed")  # a second call must not extract again
    extract(archive, tmp_path / "out")
    assert (tmp_path / "out/d/a.txt").read_bytes() == b"changed"


def test_interrupted_extraction_is_redone(tmp_path):
    archive = tmp_path / "good.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a.txt", "A")
    leftover = tmp_path / ".out.extracting"  # what a killed extraction leaves behind
    leftover.mkdir()
    (leftover / "half.txt").write_text("partial")
    files = extract(archive, tmp_path / "out")
    assert [p.name for p in files] == ["a.txt"] and not leftover.exists()


FAKE_UNRAR = """#!/bin/sh
# Stands in for unrar: members come from <archive>.members, one "name" or "name -> target" a line.
if [ "$1" = lb ]; then cut -d' ' -f1 "$2.members"; exit 0; fi
archive=$4; dest=$5
while read -r name arrow target; do
  mkdir -p "$dest$(dirname "$name")"
  if [ -n "$target" ]; then ln -s "$target" "$dest$name"; else echo data > "$dest$name"; fi
done < "$archive.members"
"""


@pytest.mark.parametrize(
    "members, match",
    [
        ("train/Original/1_A.png\ntrain/Original/2_N.png\n", None),
        ("ok.png\n../evil.png\n", r"'\.\.' component"),
        ("ok.png\ntrain/link -> ../../outside\n", "points outside"),
    ],
)
def test_rar_goes_through_an_external_tool_with_the_same_checks(tmp_path, monkeypatch, members, match):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "unrar").write_text(FAKE_UNRAR)
    (bin_dir / "unrar").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir) + os.pathsep + os.environ.get("PATH", ""))
    archive = tmp_path / "fives.rar"
    archive.write_bytes(b"Rar!\x1a\x07\x01\x00" + b"\x00" * 32)
    (tmp_path / "fives.rar.members").write_text(members)
    if match is None:
        files = extract(archive, tmp_path / "out")
        assert [p.relative_to(tmp_path / "out").as_posix() for p in files] == [
            "train/Original/1_A.png", "train/Original/2_N.png"]
    else:
        with pytest.raises(UnsafeArchiveError, match=match):
            extract(archive, tmp_path / "out")
        assert not (tmp_path / "out").exists() and not (tmp_path / ".out.extracting").exists()


def test_an_archive_that_expands_past_the_limit_is_refused_before_writing(tmp_path):
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(3):
            zf.writestr(f"zeros{i}.bin", b"\0" * 10_000_000)  # 30 MB of zeros, ~30 kB compressed
    size = archive.stat().st_size
    with pytest.raises(UnsafeArchiveError) as err:
        extract(archive, tmp_path / "out", max_bytes=100 * size)
    assert str(err.value) == (f"bomb.zip: its files would take 0.030 GB once extracted, over the limit of "
                              f"{100 * size / 1e9:.3f} GB (max_bytes; by default 100x the archive's size): a zip bomb? "
                              "Refusing to extract; pass a larger max_bytes if this size is expected")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.extracting").exists()
    assert len(extract(archive, tmp_path / "out", max_bytes=30_000_000)) == 3  # a limit it fits in
    tar = tmp_path / "bomb.tar.gz"
    with tarfile.open(tar, "w:gz") as tf:
        tf.add(tmp_path / "out" / "zeros0.bin", "zeros0.bin")
    with pytest.raises(UnsafeArchiveError, match="bomb.tar.gz: its files would take 0.010 GB once extracted"):
        extract(tar, tmp_path / "out2", max_bytes=1_000_000)


def test_fetch_by_name_downloads_extracts_and_is_idempotent(server, tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("photos.tsv000", "photo_id\tphoto_image_url\n")
    server.files["/lite.zip"] = buf.getvalue()
    sha = hashlib.sha256(buf.getvalue()).hexdigest()
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "name,source,sha256,size,license,description,target\n"
        f"lite,{server.url}/lite.zip,{sha},{len(buf.getvalue())},test,\"a, test\",lite.zip\n"
    )
    out = fetch("lite", tmp_path / "data", manifest)
    assert out == tmp_path / "data" / "lite" and (out / "photos.tsv000").is_file()
    assert fetch("lite", tmp_path / "data", manifest) == out
    assert len(server.requests) == 1
    with pytest.raises(KeyError, match="lite"):
        fetch("nope", tmp_path / "data", manifest)


def test_repo_manifest_is_valid_and_packaged_copy_identical():
    root, packaged = REPO / "data_manifest.csv", REPO / "sdnb" / "data" / "data_manifest.csv"
    assert root.read_bytes() == packaged.read_bytes(), "sdnb/data/data_manifest.csv must be a copy of data_manifest.csv"
    entries = read_manifest(root)
    assert {"fives", "unsplash-lite", "tiny-fundus", "tiny-photos"} <= set(entries)
    assert entries["fives"].source.startswith("https://") and entries["fives"].is_archive
    assert read_manifest() == entries  # the default is the packaged copy


def test_bad_manifest_rows_are_named(tmp_path):
    bad = tmp_path / "m.csv"
    bad.write_text("name,source,sha256,size,license,description,target\nx,https://h/x,abc,,l,d,x.bin\n")
    with pytest.raises(ValueError, match=r"line 2: sha256 'abc'"):
        read_manifest(bad)


def test_unsplash_lite_fetch_is_reproducible_and_skips_failures(server, tmp_path):
    from PIL import Image

    lines = ["photo_id\tphoto_url\tphoto_image_url\tphotographer_username\tai_description"]
    for i in range(8):
        buf = io.BytesIO()
        Image.new("RGB", (8, 6), (i * 30, 0, 0)).save(buf, "JPEG")
        if i != 3:  # photo p3 is missing on the server: a 404
            server.files[f"/img/p{i}"] = buf.getvalue()
        lines.append(f"p{i}\thttps://unsplash.com/photos/p{i}\t{server.url}/img/p{i}?ixid=abc\tuser{i}\ta photo {i}")
    tsv = tmp_path / "photos.tsv000"
    tsv.write_text("\n".join(lines) + "\n", encoding="utf-8")

    saved = fetch_unsplash_lite(tsv, tmp_path / "a", n=8, seed=1, width=512, retries=0, backoff=0.01)
    assert sorted(p.name for p in saved) == [f"p{i}.jpg" for i in range(8) if i != 3]
    records = [json.loads(x) for x in (tmp_path / "a/unsplash.jsonl").read_text().splitlines()]
    assert {r["photo_id"] for r in records} == {p.stem for p in saved}
    r0 = next(r for r in records if r["photo_id"] == "p0")
    assert r0["photographer"] == "user0" and r0["ai_description"] == "a photo 0" and "Unsplash" in r0["license"]
    assert "w=512" in r0["image_url"] and "ixid=abc" in r0["image_url"]

    def pick(seed: int, folder: str) -> list[str]:
        return [p.stem for p in fetch_unsplash_lite(tsv, tmp_path / folder, n=3, seed=seed, retries=0)]

    assert pick(5, "x") == pick(5, "y")  # same seed, same photos


def test_unsplash_url_keeps_query_and_bounds_width():
    url = unsplash_image_url("https://images.unsplash.com/photo-1?ixid=xyz&w=4000", 1024)
    assert url.startswith("https://images.unsplash.com/photo-1?") and "ixid=xyz" in url
    assert "w=1024" in url and "w=4000" not in url and "fit=max" in url
    with pytest.raises(ValueError, match="width"):
        unsplash_image_url("https://images.unsplash.com/x", 0)
