"""Download, check and extract a data set archive (``mipnerf360 download``).

    mipnerf360 download URL --dest DEST_DIR [--archive resources/x.zip] [--sha256 HEX]

* An archive already at ``--archive`` (default ``resources/<file name of the URL>``) is used
  as is, with no network access (place the official archives there on offline machines).
* Otherwise it is fetched to ``<archive>.part``, resuming an interrupted transfer with an
  HTTP ``Range`` request, and renamed to ``<archive>`` only when complete.
* With ``--sha256`` the archive must match it; without, the checksum is recorded in
  ``<archive>.sha256`` (and checked against that record on later runs).
* The zip is tested (central directory, member CRCs, no member outside the target) before
  anything is extracted; extraction goes to a temporary folder beside ``DEST_DIR`` that is
  renamed to ``DEST_DIR`` at the end (``io.atomic_dir``), so ``DEST_DIR`` is either complete
  or absent. The ``.part`` file is the one file written outside ``io``: it is appended to
  as the bytes arrive (archives are gigabytes), and renamed when complete.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

from mipnerf360 import io
from mipnerf360.errors import UserError

CHUNK = 1 << 20


class DownloadError(UserError, RuntimeError):
    """A download, checksum or archive problem; the message names the file."""


def sha256sum(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(CHUNK), b""):
                h.update(block)
    except OSError as e:
        raise DownloadError(f"{os.fspath(path)}: cannot read: {e.strerror or e}") from None
    return h.hexdigest()


def _total_from_content_range(value: str | None) -> int | None:
    # "bytes 100-199/1000" or "bytes */1000"
    if not value or "/" not in value:
        return None
    total = value.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None


def fetch(
    url: str,
    path: str | os.PathLike,
    *,
    retries: int = 5,
    timeout: float = 60.0,
    log: Callable[[str], None] = print,
) -> Path:
    """Download ``url`` to ``path`` through ``path + '.part'``, resuming with HTTP Range.

    A ``.part`` file left by an interrupted run (or by a dropped connection in this run) is
    continued from its current size when the server answers 206 for that offset; a server
    that ignores Range (200) restarts the transfer.
    """
    path = Path(path)
    part = path.with_name(path.name + ".part")
    if urllib.parse.urlparse(url).scheme not in ("http", "https", "file", "ftp"):
        raise DownloadError(f"{url}: not a URL (expected http://, https://, ftp:// or file://)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"{path.parent}: cannot create the folder: {e.strerror or e}") from None
    err: Exception | None = None
    for attempt in range(1, retries + 1):
        have = part.stat().st_size if part.exists() else 0
        req = urllib.request.Request(url, headers={"User-Agent": "mipnerf360-download"})
        if have:
            req.add_header("Range", f"bytes={have}-")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                if have and resp.status == 206:
                    start = int(
                        resp.headers.get("Content-Range", "bytes 0-").split()[1].split("-")[0]
                    )
                    if start != have:
                        raise DownloadError(f"{url}: server resumed at byte {start}, not {have}")
                    mode = "ab"
                    log(f"resuming {path.name} at byte {have}")
                else:
                    mode, have = "wb", 0
                total = resp.headers.get("Content-Length")
                total = have + int(total) if total is not None else None
                with open(part, mode) as f:
                    for block in iter(lambda: resp.read(CHUNK), b""):
                        f.write(block)
            size = part.stat().st_size
            if total is not None and size != total:
                raise http.client.IncompleteRead(b"", total - size)
            os.replace(part, path)
            log(f"downloaded {url} -> {path} ({size} bytes)")
            return path
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:
                total = _total_from_content_range(e.headers.get("Content-Range"))
                if total == have:  # the .part file was already complete
                    os.replace(part, path)
                    return path
                part.unlink()  # stale .part larger than the file: start again
                continue
            if 400 <= e.code < 500:
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
            err = e
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            err = e
        if attempt < retries:
            log(f"{url}: {err!r}; retrying ({attempt}/{retries})")
            time.sleep(min(2.0**attempt, 30.0) * 0.05)
    raise DownloadError(f"{url}: download to {part} failed after {retries} tries: {err}")


def verify_zip(path: str | os.PathLike) -> list[str]:
    """Check that ``path`` is a readable zip whose members have valid CRCs and stay inside
    the extraction folder; returns the member names. Raises DownloadError naming the file."""
    path = os.fspath(path)
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            bad = zf.testzip()
    except zipfile.BadZipFile as e:
        raise DownloadError(f"{path}: not a valid zip archive ({e}); delete it and rerun") from None
    except (OSError, EOFError, zlib.error, zipfile.LargeZipFile, NotImplementedError) as e:
        raise DownloadError(f"{path}: corrupt zip archive, cannot read it ({e})") from None
    if bad is not None:
        raise DownloadError(f"{path}: corrupt zip archive (bad CRC in member {bad!r})")
    for name in names:
        parts = Path(name).parts
        if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
            raise DownloadError(f"{path}: unsafe member path {name!r} in the archive")
    if not names:
        raise DownloadError(f"{path}: the zip archive is empty")
    return names


def extract(archive: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract a verified zip to ``dest`` atomically (temp folder beside it, then rename).
    macOS resource forks (``__MACOSX/``) are skipped."""
    archive, dest = os.fspath(archive), Path(dest)
    verify_zip(archive)
    with io.atomic_dir(dest) as tmp, zipfile.ZipFile(archive) as zf:
        members = [m for m in zf.namelist() if not m.startswith("__MACOSX/")]
        try:
            zf.extractall(tmp, members=members)
        except OSError as e:
            raise DownloadError(f"{dest}: cannot extract {archive}: {e.strerror or e}") from None
    return dest


def check_sha256(
    archive: str | os.PathLike, sha256: str | None, log: Callable[[str], None] = print
) -> str:
    """Compare the archive with a pinned sha256, or with / into ``<archive>.sha256``."""
    archive = Path(archive)
    actual = sha256sum(archive)
    record = archive.with_name(archive.name + ".sha256")
    if sha256:
        if actual.lower() != sha256.lower():
            raise DownloadError(
                f"{archive}: sha256 mismatch: expected {sha256.lower()}, got {actual} "
                "(wrong or corrupt archive; delete it and rerun)"
            )
        log(f"{archive}: sha256 {actual} matches the pinned value")
    elif record.exists():
        text = record.read_text(errors="replace")
        recorded = text.split()[0] if text.strip() else ""
        if recorded.lower() != actual:
            raise DownloadError(
                f"{archive}: sha256 {actual} differs from the one recorded in {record} "
                f"({recorded}); delete whichever is stale and rerun"
            )
        log(f"{archive}: sha256 {actual} matches {record}")
    else:
        io.write_text(record, f"{actual}  {archive.name}\n")
        log(f"{archive}: sha256 {actual} (not pinned; recorded in {record})")
    return actual


def download(
    url: str,
    dest: str | os.PathLike,
    archive: str | os.PathLike | None = None,
    sha256: str | None = None,
    *,
    log: Callable[[str], None] = print,
    **fetch_kw,
) -> Path:
    """Get the archive (offline copy or resumable download), check it, extract it to dest."""
    dest = Path(dest)
    if archive is None:
        name = os.path.basename(urllib.parse.urlparse(url).path) or "archive.zip"
        archive = Path("resources") / name
    archive = Path(archive)
    if dest.exists() and not dest.is_dir():
        raise DownloadError(f"{dest}: exists and is not a folder")
    if archive.is_dir():
        raise DownloadError(f"{archive}: is a folder, not an archive file")
    if dest.exists() and any(dest.iterdir()):
        log(f"{dest} already exists (extraction is atomic, so it is complete); nothing to do")
        return dest
    if archive.exists():
        log(f"using the archive already at {archive} (no download)")
        downloaded = False
    else:
        fetch(url, archive, log=log, **fetch_kw)
        downloaded = True
    try:
        check_sha256(archive, sha256, log=log)
        verify_zip(archive)
    except DownloadError:
        if downloaded:  # move the bad file aside so that a rerun downloads it again
            bad = archive.with_name(archive.name + ".bad")
            os.replace(archive, bad)
            log(f"moved the rejected download to {bad}")
        raise
    extract(archive, dest)
    log(f"extracted {archive} -> {dest}")
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mipnerf360 download", description=__doc__.split("\n")[0])
    p.add_argument("url", help="archive URL (http/https)")
    p.add_argument("--dest", required=True, help="folder to extract to (created atomically)")
    p.add_argument("--archive", help="where the archive is kept (default resources/<name>)")
    p.add_argument("--sha256", help="expected sha256 of the archive (else recorded)")
    p.add_argument("--retries", type=int, default=5, help="download attempts (each resumes)")
    p.add_argument("--timeout", type=float, default=60.0, help="socket timeout in seconds")
    a = p.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, flush=True)

    download(a.url, a.dest, a.archive, a.sha256, log=log, retries=a.retries, timeout=a.timeout)
    return 0
