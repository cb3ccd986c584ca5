"""mipnerf360.download against a local HTTP server (127.0.0.1) that supports Range."""

import hashlib
import http.server
import io
import threading
import zipfile

import pytest

from mipnerf360 import cli
from mipnerf360 import download as dl
from mipnerf360 import io as mio


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict = {}  # path -> bytes
    truncate_first: set = set()  # paths whose first response is cut in half
    log: list = []  # (path, Range header)

    def do_GET(self):  # noqa: N802
        self.log.append((self.path, self.headers.get("Range")))
        data = self.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path in self.truncate_first:
            self.truncate_first.discard(self.path)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _Handler.files, _Handler.truncate_first, _Handler.log = {}, set(), []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", _Handler
    httpd.shutdown()
    httpd.server_close()


def make_zip(files: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in files.items():
            zf.writestr(name, content)
    return buf.getvalue()


# Incompressible-ish content so the archive is big enough to be cut in half meaningfully.
GOOD = make_zip(
    {
        "scenes/a/images/0.txt": bytes(range(256)) * 400,
        "scenes/a/poses.txt": "1 2 3\n",
        "__MACOSX/scenes/._a": "junk",
    }
)


def test_good_archive_downloads_verifies_records_and_extracts(server, tmp_path):
    base, h = server
    h.files["/data.zip"] = GOOD
    dest = tmp_path / "data" / "ds"
    out = dl.download(f"{base}/data.zip", dest, archive=tmp_path / "res" / "data.zip", log=print)
    assert out == dest
    assert (dest / "scenes/a/poses.txt").read_text() == "1 2 3\n"
    assert (dest / "scenes/a/images/0.txt").read_bytes() == bytes(range(256)) * 400
    assert not (dest / "__MACOSX").exists()
    record = (tmp_path / "res" / "data.zip.sha256").read_text().split()
    assert record == [hashlib.sha256(GOOD).hexdigest(), "data.zip"]
    assert not list(tmp_path.glob("data/.ds.tmp-*"))  # no temporary folder left behind


def test_pinned_checksum_accepted(server, tmp_path):
    base, h = server
    h.files["/data.zip"] = GOOD
    sha = hashlib.sha256(GOOD).hexdigest()
    dl.download(f"{base}/data.zip", tmp_path / "d", tmp_path / "data.zip", sha256=sha.upper())
    assert (tmp_path / "d" / "scenes/a/poses.txt").exists()


def test_resume_from_partial_file(server, tmp_path):
    base, h = server
    h.files["/data.zip"] = GOOD
    archive = tmp_path / "data.zip"
    (tmp_path / "data.zip.part").write_bytes(GOOD[:1000])
    dl.download(f"{base}/data.zip", tmp_path / "d", archive)
    assert h.log == [("/data.zip", "bytes=1000-")]
    assert archive.read_bytes() == GOOD
    assert not (tmp_path / "data.zip.part").exists()


def test_dropped_connection_is_resumed(server, tmp_path):
    base, h = server
    h.files["/data.zip"] = GOOD
    h.truncate_first.add("/data.zip")
    archive = tmp_path / "data.zip"
    dl.download(f"{base}/data.zip", tmp_path / "d", archive)
    assert h.log[0] == ("/data.zip", None)
    assert h.log[1] == ("/data.zip", f"bytes={len(GOOD) // 2}-")
    assert archive.read_bytes() == GOOD


def test_complete_part_file_416(server, tmp_path):
    base, h = server
    h.files["/data.zip"] = GOOD
    (tmp_path / "data.zip.part").write_bytes(GOOD)
    dl.fetch(f"{base}/data.zip", tmp_path / "data.zip")
    assert (tmp_path / "data.zip").read_bytes() == GOOD


def test_wrong_checksum_fails_and_does_not_extract(server, tmp_path, capsys):
    base, h = server
    h.files["/data.zip"] = GOOD
    archive, dest = tmp_path / "data.zip", tmp_path / "d"
    with pytest.raises(dl.DownloadError, match=r"data\.zip: sha256 mismatch"):
        dl.download(f"{base}/data.zip", dest, archive, sha256="0" * 64)
    assert not dest.exists()
    assert not archive.exists() and (tmp_path / "data.zip.bad").exists()  # set aside
    # the CLI reports it as an error naming the file
    args = [f"{base}/data.zip", "--dest", str(dest), "--archive", str(archive)]
    assert cli.main(["download", *args, "--sha256", "0" * 64]) == 1
    assert "data.zip: sha256 mismatch" in capsys.readouterr().err
    assert not dest.exists()


def test_corrupt_zip_fails_and_does_not_extract(server, tmp_path):
    base, h = server
    bad = bytearray(GOOD)
    with zipfile.ZipFile(io.BytesIO(GOOD)) as zf:
        info = zf.getinfo("scenes/a/images/0.txt")
    mid = info.header_offset + 30 + len(info.filename) + info.compress_size // 2
    bad[mid : mid + 8] = bytes(8)  # damage the deflated payload: CRC or inflate error
    bad = bytes(bad)
    h.files["/bad.zip"] = bad
    h.files["/notzip.zip"] = b"<html>quota exceeded</html>"
    for name, pattern in [
        ("bad.zip", r"bad\.zip: corrupt zip archive"),
        ("notzip.zip", r"notzip\.zip: not a valid zip"),
    ]:
        dest = tmp_path / name.replace(".zip", "")
        with pytest.raises(dl.DownloadError, match=pattern):
            dl.download(f"{base}/{name}", dest, tmp_path / name)
        assert not dest.exists()
        assert not list(tmp_path.glob(".*tmp-*"))


def test_unsafe_member_rejected(tmp_path):
    archive = tmp_path / "evil.zip"
    archive.write_bytes(make_zip({"../escape.txt": "x"}))
    with pytest.raises(dl.DownloadError, match="unsafe member"):
        dl.extract(archive, tmp_path / "d")
    assert not (tmp_path / "escape.txt").exists()


def test_offline_archive_used_without_network(tmp_path):
    archive = tmp_path / "resources" / "data.zip"
    archive.parent.mkdir()
    archive.write_bytes(GOOD)
    # port 9 on 127.0.0.1 (discard) is not served: any network access would fail
    url = "http://127.0.0.1:9/data.zip"
    sha = hashlib.sha256(GOOD).hexdigest()
    assert (
        dl.main(
            [
                url,
                "--dest",
                str(tmp_path / "d"),
                "--archive",
                str(archive),
                "--sha256",
                sha,
                "--retries",
                "1",
            ]
        )
        == 0
    )
    assert (tmp_path / "d" / "scenes/a/poses.txt").exists()


def test_recorded_checksum_detects_a_replaced_archive(tmp_path):
    archive = tmp_path / "data.zip"
    archive.write_bytes(GOOD)
    dl.check_sha256(archive, None)
    archive.write_bytes(make_zip({"other.txt": "other"}))
    with pytest.raises(dl.DownloadError, match="differs from the one recorded"):
        dl.check_sha256(archive, None)


def test_http_404_names_the_url(server, tmp_path):
    base, _ = server
    with pytest.raises(dl.DownloadError, match="missing.zip: HTTP 404"):
        dl.fetch(f"{base}/missing.zip", tmp_path / "missing.zip", retries=1)


@pytest.mark.parametrize(
    "args,message",
    [
        (["notaurl", "--dest", "{t}/d"], "notaurl: not a URL"),
        (["http://127.0.0.1:9/a.zip", "--dest", "{t}/file"], "file: exists and is not a folder"),
        (["http://127.0.0.1:9/a.zip", "--dest", "{t}/d", "--archive", "{t}"], "is a folder"),
    ],
)
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, args, message):
    (tmp_path / "file").write_text("x")
    args = [a.format(t=tmp_path) for a in args]
    assert cli.main(["download", *args, "--retries", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mipnerf360 download: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1


def test_extracted_folder_and_record_have_umask_modes(tmp_path):
    archive = tmp_path / "data.zip"
    archive.write_bytes(GOOD)
    dl.download("http://127.0.0.1:9/data.zip", tmp_path / "d", archive)
    mask = mio.umask()
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~mask
    assert (tmp_path / "data.zip.sha256").stat().st_mode & 0o777 == 0o666 & ~mask
