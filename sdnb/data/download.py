"""Resumable, verified downloads over HTTP(S) and from Google Drive.

A download is written to ``<file>.part`` and renamed only once it is complete and its
checksum agrees; a small ``<file>.sha256`` stamp then records the verified hash, size and URL, so a
second call returns at once without a request or a re-hash (only for the same expected hash). A file
whose checksum does not agree is set aside as ``<file>.bad`` and never used.

Without a recorded checksum the body is still checked: its size must be the one the server announced
(``Content-Length`` / ``Content-Range``), and a web page (``Content-Type: text/html``) is refused for a
file that is not one (a login wall, Google Drive's "cannot scan for viruses" page, a moved link); the size
and SHA-256 of what was fetched are recorded in the stamp, with the URL (for the data manifest). A redirect
loop's error names the URL.
"""

from __future__ import annotations

import hashlib
import http.client
import time
from collections.abc import Iterator
from pathlib import Path

import requests
import urllib3
from tqdm.auto import tqdm

__all__ = ["ChecksumError", "DownloadError", "download", "download_gdrive", "sha256_file"]

_RETRYABLE = (
    requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.HTTPError, http.client.HTTPException, ConnectionError, TimeoutError,
)


class ChecksumError(ValueError):
    """A downloaded file's SHA-256 (or size) is not the one expected; the file was set aside."""


class DownloadError(OSError):
    """The server sent something that is not the file (a web page, a redirect loop); retrying will not help."""


class _ServerError(Exception):
    """A 5xx answer: worth retrying."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _stamp(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _read_stamp(path: Path) -> tuple[str, int] | None:
    """(sha256, size) recorded for ``path``, or None if absent or unreadable."""
    try:
        digest, size = _stamp(path).read_text().split()[:2]
        return digest.lower(), int(size)
    except (OSError, ValueError):
        return None


def _write_stamp(path: Path, digest: str, url: str = "") -> None:
    _stamp(path).write_text(f"{digest} {path.stat().st_size} {path.name} {url}".rstrip() + "\n")


def _already_verified(path: Path, sha256: str | None, size: int | None) -> bool:
    """True if ``path`` is complete and verified, hashing it only when no stamp says so."""
    if not path.is_file():
        return False
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        return False
    stamp = _read_stamp(path)
    if stamp is not None and stamp[1] == actual_size and (sha256 is None or stamp[0] == sha256):
        return True
    digest = sha256_file(path)  # a file without a (matching) stamp: check it once
    if sha256 is not None and digest != sha256:
        return False
    _write_stamp(path, digest)
    return True


def _set_aside(part: Path, final: Path) -> Path:
    bad = final.with_name(final.name + ".bad")
    part.replace(bad)
    return bad


def _verify_and_finish(part: Path, path: Path, sha256: str | None, size: int | None, url: str = "",
                       announced: int | None = None) -> Path:
    """Check size and hash of a finished ``.part``; rename it to ``path`` or set it aside. `announced`: the size the
    server gave (Content-Length), checked when no `size` is recorded."""
    actual_size = part.stat().st_size
    for expected, source in ((size, "recorded"), (announced, "announced by the server")):
        if expected is not None and actual_size != expected:
            bad = _set_aside(part, path)
            raise ChecksumError(f"{path.name}: expected {expected} bytes ({source}), got {actual_size}; "
                                f"set aside as {bad}")
    digest = sha256_file(part)
    if sha256 is not None and digest != sha256:
        bad = _set_aside(part, path)
        raise ChecksumError(
            f"{path.name}: SHA-256 mismatch, expected {sha256}, got {digest}; "
            f"the file was set aside as {bad} and not used"
        )
    part.replace(path)
    _write_stamp(path, digest, url)
    return path


def _total_from_content_range(value: str | None) -> int | None:
    """The total size in a ``Content-Range: bytes a-b/total`` header, if given."""
    if value and "/" in value and not value.endswith("/*"):
        try:
            return int(value.rsplit("/", 1)[1])
        except ValueError:
            return None
    return None


def _blocks(r: requests.Response, chunk: int) -> Iterator[bytes]:
    """The body in blocks of at most ``chunk`` bytes, handing over whatever has arrived
    (``read1``) so that a connection cut mid-block loses as little as possible."""
    read1 = getattr(r.raw, "read1", None)
    if read1 is None:  # urllib3 < 2
        yield from r.iter_content(chunk_size=chunk)
        return
    while block := read1(chunk):
        yield block


def _get(session: requests.Session, url: str, headers: dict[str, str], timeout: float) -> requests.Response:
    """session.get, streaming; a redirect loop is an error that names the URL and where it led."""
    try:
        return session.get(url, headers=headers, stream=True, timeout=timeout)
    except requests.TooManyRedirects as err:
        chain = [r.url for r in err.response.history][-3:] if err.response is not None else []
        raise DownloadError(f"{url}: too many redirects (over {session.max_redirects}: a redirect loop"
                            f"{', via ' + ' -> '.join(chain) if chain else ''}); the link is broken or needs a login: "
                            "open it in a browser") from err


def _check_type(r: requests.Response, url: str, part: Path) -> None:
    """Refuse a web page served in place of a file that is not one (a login wall, a confirmation page)."""
    name = part.name[: -len(".part")]
    kind = r.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if kind == "text/html" and not name.lower().endswith((".html", ".htm")):
        raise DownloadError(f"{url}: the server sent a web page (Content-Type: text/html) instead of {name}: the link "
                            "may need a login or a confirmation (Google Drive's virus-scan page), or has moved; open "
                            "it in a browser and use the file's direct link")


def _fetch_once(session: requests.Session, url: str, part: Path, timeout: float, chunk: int) -> tuple[bool, int | None]:
    """One request that appends to ``part`` (resuming with Range): (body complete, the file's size as announced)."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Accept-Encoding": "identity"}  # byte ranges count the bytes on the wire
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with _get(session, url, headers, timeout) as r:
        if r.status_code == 416 and offset:  # nothing left to send, or a bogus part
            total = _total_from_content_range(r.headers.get("Content-Range"))
            if total == offset:
                return True, total
            part.unlink()
            return False, None
        if r.status_code >= 500:
            raise _ServerError(f"{url}: HTTP {r.status_code}")
        r.raise_for_status()  # 4xx other than 416: not worth retrying
        _check_type(r, url, part)
        if r.status_code == 206:
            start = int(r.headers.get("Content-Range", "bytes 0-").split()[1].split("-")[0])
            if start != offset:  # another range than asked for: start over
                part.unlink(missing_ok=True)
                return False, None
        else:  # 200: the server ignored Range, so the body is the whole file
            offset = 0
        length = r.headers.get("Content-Length")
        expected = _total_from_content_range(r.headers.get("Content-Range")) if r.status_code == 206 else None
        expected = expected or (offset + int(length) if length is not None else None)
        received = offset
        with open(part, "ab" if offset else "wb") as f, tqdm(
            total=expected, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
            desc=part.name[: -len(".part")], leave=False,
        ) as bar:
            for block in _blocks(r, chunk):
                f.write(block)
                received += len(block)
                bar.update(len(block))
        return expected is None or received >= expected, expected


def download(
    url: str,
    path: str | Path,
    sha256: str | None = None,
    size: int | None = None,
    retries: int = 5,
    backoff: float = 1.0,
    chunk: int = 1 << 20,
    timeout: float = 60.0,
    session: requests.Session | None = None,
) -> Path:
    """Download ``url`` to ``path``, resuming a partial file and verifying it.

    An existing verified ``path`` returns at once (no request). Connection errors, truncated
    bodies and 5xx answers are retried up to ``retries`` times in a row without progress,
    sleeping ``backoff * 2**k`` seconds; a server that ignores ``Range`` is handled by starting
    over. With ``sha256`` (hex) or ``size`` given, a file that disagrees raises
    :class:`ChecksumError` and is set aside as ``<path>.bad``.
    """
    path = Path(path)
    sha256 = sha256.lower() if sha256 else None
    if _already_verified(path, sha256, size):
        return path
    if path.exists():  # present but wrong: keep it out of the way, never use it
        _set_aside(path, path)
        _stamp(path).unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    own_session = session is None
    session = session or requests.Session()
    try:
        announced = _fetch_with_retries(session, url, path, part, size, retries, backoff, chunk, timeout)
    finally:
        if own_session:
            session.close()
    return _verify_and_finish(part, path, sha256, size, url, announced)


def _fetch_with_retries(session: requests.Session, url: str, path: Path, part: Path, size: int | None, retries: int,
                        backoff: float, chunk: int, timeout: float) -> int | None:
    """Fetch into `part` until the body is complete; give up after `retries` failures in a row without progress.
    Returns the file's size as the server announced it (None if it did not)."""
    failures, announced = 0, None
    while True:
        before = part.stat().st_size if part.exists() else 0
        if size is not None and before == size:
            return announced
        if size is not None and before > size:
            part.unlink()
        try:
            complete, announced = _fetch_once(session, url, part, timeout, chunk)
            if complete:
                return announced
            error: Exception = ConnectionError(f"{url}: body ended early")
        except (*_RETRYABLE, _ServerError) as e:
            error = e
        after = part.stat().st_size if part.exists() else 0
        failures = 0 if after > before else failures + 1
        if failures > retries:
            raise ConnectionError(f"downloading {url} to {path} failed {failures} times in a row") from error
        time.sleep(backoff * 2 ** max(failures - 1, 0))


def download_gdrive(file_id: str, path: str | Path, sha256: str | None = None, size: int | None = None) -> Path:
    """Download a Google Drive file by id with ``gdown`` (resumable), then verify it like :func:`download`."""
    import gdown  # imported here: only needed for Drive-hosted files

    path = Path(path)
    sha256 = sha256.lower() if sha256 else None
    if _already_verified(path, sha256, size):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    if gdown.download(id=file_id, output=str(part), quiet=False, resume=True) is None:
        raise ConnectionError(f"gdown could not download Google Drive file {file_id} to {path}")
    return _verify_and_finish(part, path, sha256, size, f"gdrive:{file_id}")
