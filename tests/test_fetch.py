"""Fetching ReferIt (SPEC 2): the official text files with their checksums, downloads from a
loopback HTTP server (Range resume, truncated / wrong / unsafe archives, a gone source), safe
extraction, ``data check`` on both layouts, and the CLI's messages and exit codes."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import re
import shutil
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import write_official_referit
from PIL import Image

from referseg import cli
from referseg.data.fetch import (
    SOURCES,
    SPEC_COUNTS,
    TEXT_FILES,
    ChecksumError,
    DownloadInterrupted,
    FetchError,
    Source,
    SourceUnavailableError,
    check_referit,
    download,
    fetch,
    fetch_referit_text,
)

# ---------------------------------------------------------------------------- loopback server


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files`` with Range support; can drop a connection after N bytes once."""

    timeout = 10  # seconds a request's socket may stay silent

    def do_GET(self) -> None:  # noqa: N802 -- http.server's naming
        server = self.server
        name = self.path.lstrip("/")
        requested = self.headers.get("Range")
        server.requests.append((name, requested))
        data = server.files.get(name)
        if data is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        if requested and not server.ignore_range:
            match = re.fullmatch(r"bytes=(\d+)-", requested)
            start = int(match.group(1)) if match else 0
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
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        drop = server.drop_after.pop(name, None)
        if drop is not None:  # send a part, then close the connection mid-body
            self.wfile.write(body[:drop])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 -- keep the test output quiet
        pass


@pytest.fixture
def server():
    """A ThreadingHTTPServer on 127.0.0.1 (port chosen by the OS), stopped by the finalizer or,
    at the latest, by a watchdog after 120 s."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.files, httpd.requests, httpd.drop_after, httpd.ignore_range = {}, [], {}, False
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    watchdog = threading.Timer(120, httpd.shutdown)
    watchdog.daemon = True
    watchdog.start()
    yield httpd
    watchdog.cancel()
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


# ---------------------------------------------------------------------------- fixture archives

FIXTURE_QUERIES = {"301_1": ["the left thing"], "302_1": ["sky", "the top part"]}
FIXTURE_COUNTS = {"test": [2, 2, 3]}  # images, regions, pairs


def _official_files() -> dict[str, bytes]:
    """A tiny copy in the official layout: 2 PIL images, 2 .mat masks, referit_query_test.json."""
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    files = {}
    for image_id, (h, w) in ((301, (36, 48)), (302, (48, 36))):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buffer, format="JPEG")
        files[f"images/{image_id}.jpg"] = buffer.getvalue()
        segimg = np.ones((h, w), dtype=np.uint8)
        segimg[4:h // 2, 3:w // 2] = 0  # the region's pixels are 0
        buffer = io.BytesIO()
        savemat(buffer, {"segimg_t": segimg})
        files[f"mask/{image_id}_1.mat"] = buffer.getvalue()
    files["referit_query_test.json"] = json.dumps(FIXTURE_QUERIES).encode()
    return files


def _tar_gz(files: dict[str, bytes], extra: list[tarfile.TarInfo] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for info in extra or []:
            archive.addfile(info)
    return buffer.getvalue()


def _source(server, filename: str, data: bytes, **fields) -> Source:
    server.files[filename] = data
    defaults = {"archive": "tar", "required": ("images/", "mask/"), "threads": ("https://example.org/issue/1",),
                "by_hand": "put it at {out}/downloads/" + filename}
    return Source(name="fixture", filename=filename, url=f"{server.url}/{filename}", **{**defaults, **fields})


# ---------------------------------------------------------------------------- fetch-referit-text


def test_text_files_from_folder_arrive_with_their_checksums(official_referit: Path, tmp_path: Path):
    out = tmp_path / "referit-text"
    paths = fetch_referit_text(out, from_dir=official_referit)
    assert sorted(p.name for p in paths) == sorted(TEXT_FILES)
    for path in paths:
        size, sha = TEXT_FILES[path.name]
        assert path.stat().st_size == size
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
    assert [p.name for p in tmp_path.iterdir()] == ["referit-text"]  # no staging folder left
    assert fetch_referit_text(out, from_dir=tmp_path / "nowhere") == paths  # all there: nothing to fetch


def test_text_file_with_one_byte_changed_is_refused(official_referit: Path, tmp_path: Path):
    copy = tmp_path / "copy"
    shutil.copytree(official_referit, copy)
    target = copy / "referit_imsize.json"
    data = bytearray(target.read_bytes())
    data[100] ^= 1
    target.chmod(0o644)
    target.write_bytes(bytes(data))
    out = tmp_path / "out"
    with pytest.raises(ChecksumError) as error:
        fetch_referit_text(out, from_dir=copy)
    message = str(error.value)
    assert "referit_imsize.json" in message
    assert TEXT_FILES["referit_imsize.json"][1] in message
    assert hashlib.sha256(bytes(data)).hexdigest() in message
    assert not out.exists() or not any(out.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # no staging folder left either


def test_text_files_over_http_from_a_mirror(official_referit: Path, tmp_path: Path, server):
    for name in TEXT_FILES:
        server.files[name] = (official_referit / name).read_bytes()
    server.drop_after["referit_bbox.json"] = 100_000  # one broken transfer, resumed
    paths = fetch_referit_text(tmp_path / "t", url_base=server.url, progress=False, timeout=10)
    assert all(hashlib.sha256(p.read_bytes()).hexdigest() == TEXT_FILES[p.name][1] for p in paths)
    assert ("referit_bbox.json", "bytes=100000-") in server.requests


def test_text_fetch_names_the_folder_to_copy_when_the_repository_is_unreachable(tmp_path: Path, server):
    with pytest.raises(SourceUnavailableError, match="fetch-referit-text --from FOLDER"):
        fetch_referit_text(tmp_path / "t", url_base=server.url + "/gone", progress=False, timeout=10)
    assert not (tmp_path / "t").exists()


# ---------------------------------------------------------------------------- downloads


def test_interrupted_download_resumes_with_a_range_request(tmp_path: Path, server):
    data = np.random.default_rng(1).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    server.files["blob.bin"] = data
    server.drop_after["blob.bin"] = 70_000
    dest = tmp_path / "blob.bin"
    with pytest.raises(DownloadInterrupted, match="run the same command again"):
        download(f"{server.url}/blob.bin", dest, progress=False, timeout=10, retries=0)
    part = tmp_path / "blob.bin.part"
    assert part.stat().st_size == 70_000 and not dest.exists()
    download(f"{server.url}/blob.bin", dest, sha256=hashlib.sha256(data).hexdigest(), progress=False, timeout=10)
    assert dest.read_bytes() == data and not part.exists()
    assert server.requests == [("blob.bin", None), ("blob.bin", "bytes=70000-")]


def test_broken_transfer_is_resumed_within_one_call(tmp_path: Path, server):
    data = bytes(range(256)) * 1000
    server.files["blob.bin"] = data
    server.drop_after["blob.bin"] = 12_345
    download(f"{server.url}/blob.bin", tmp_path / "blob.bin", size=len(data), progress=False, timeout=10)
    assert (tmp_path / "blob.bin").read_bytes() == data
    assert server.requests[-1] == ("blob.bin", "bytes=12345-")


def test_server_that_ignores_range_starts_over(tmp_path: Path, server):
    data = b"0123456789" * 5000
    server.files["blob.bin"] = data
    server.ignore_range = True
    (tmp_path / "blob.bin.part").write_bytes(b"garbage!")
    download(f"{server.url}/blob.bin", tmp_path / "blob.bin", progress=False, timeout=10)
    assert (tmp_path / "blob.bin").read_bytes() == data


def test_wrong_size_is_refused_and_removed(tmp_path: Path, server):
    server.files["blob.bin"] = b"x" * 1000
    with pytest.raises(ChecksumError, match="1,000 bytes arrived.*expected 1,001"):
        download(f"{server.url}/blob.bin", tmp_path / "blob.bin", size=1001, progress=False, timeout=10)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- archives


def test_good_archive_extracts_into_the_official_layout_and_checks(tmp_path: Path, server):
    archive = _tar_gz(_official_files())
    source = _source(server, "referitdata.tar.gz", archive, sha256=hashlib.sha256(archive).hexdigest())
    out = tmp_path / "referit"
    placed = fetch([source], out, progress=False, timeout=10, say=lambda _: None)
    assert {p.name for p in placed} == {"images", "mask", "referit_query_test.json"}
    assert sorted(p.name for p in (out / "images").iterdir()) == ["301.jpg", "302.jpg"]
    assert sorted(p.name for p in out.iterdir()) == ["images", "mask", "referit_query_test.json"]  # archive gone

    against_spec = check_referit(out, progress=False)
    assert not against_spec.ok
    rows = {row.split: row for row in against_spec.splits}
    assert rows["test"].found == (2, 2, 3) and rows["test"].expected == SPEC_COUNTS["test"]
    assert rows["test"].status == "counts differ" and rows["trainval"].status == "absent"
    text = against_spec.text()
    assert "counts differ" in text and "NOT OK" in text and "9,994 / 49,730 / 60,105" in text

    given = check_referit(out, expected=FIXTURE_COUNTS, progress=False)
    assert given.ok, given.text()
    assert "OK: this copy reproduces" in given.text()


def test_truncated_archive_is_refused(tmp_path: Path, server):
    archive = _tar_gz(_official_files())
    source = _source(server, "referitdata.tar.gz", archive[: len(archive) * 2 // 3])
    out = tmp_path / "referit"
    with pytest.raises(FetchError, match="referitdata.tar.gz is not a readable tar archive"):
        fetch([source], out, progress=False, timeout=10, say=lambda _: None)
    assert not out.exists()  # nothing extracted, the broken download removed


def test_archive_with_the_wrong_checksum_is_refused(tmp_path: Path, server):
    source = _source(server, "referitdata.tar.gz", _tar_gz(_official_files()), sha256="0" * 64)
    with pytest.raises(ChecksumError, match="referitdata.tar.gz: SHA-256 [0-9a-f]{64} differs from the expected 0{64}"):
        fetch([source], tmp_path / "referit", progress=False, timeout=10, say=lambda _: None)
    assert not (tmp_path / "referit").exists()


def test_file_that_is_not_an_archive_is_refused(tmp_path: Path, server):
    source = _source(server, "referitdata.tar.gz", b"<html>This file was moved</html>" * 50)
    with pytest.raises(FetchError, match="not a readable tar archive"):
        fetch([source], tmp_path / "referit", progress=False, timeout=10, say=lambda _: None)
    assert not (tmp_path / "referit").exists()


def test_archive_without_the_expected_members_is_refused(tmp_path: Path, server):
    source = _source(server, "referitdata.tar.gz", _tar_gz({"README": b"hello"}))
    with pytest.raises(FetchError, match="expected images/, mask/ in the archive"):
        fetch([source], tmp_path / "referit", progress=False, timeout=10, say=lambda _: None)


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_archive_with_an_unsafe_member_is_refused(tmp_path: Path, server, kind: str):
    files = _official_files()
    if kind == "symlink":
        link = tarfile.TarInfo("images/303.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive = _tar_gz(files, [link])
    else:
        files[{"dotdot": "images/../../escaped.txt", "absolute": "/tmp/escaped.txt"}[kind]] = b"boo"
        archive = _tar_gz(files)
    out = tmp_path / "deep" / "referit"
    with pytest.raises(FetchError, match="refused"):
        fetch([_source(server, "referitdata.tar.gz", archive)], out, progress=False, timeout=10, say=lambda _: None)
    assert not out.exists() and not (tmp_path / "escaped.txt").exists()


def test_zip_archive_extracts_under_its_folder(tmp_path: Path, server):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("saiapr_tc-12/00/images/25.jpg", b"jpeg bytes")
    source = _source(server, "saiapr_tc-12.zip", buffer.getvalue(), archive="zip", required=("saiapr_tc-12/",),
                     extract_to="images")
    fetch([source], tmp_path / "referit", progress=False, timeout=10, say=lambda _: None)
    assert (tmp_path / "referit/images/saiapr_tc-12/00/images/25.jpg").read_bytes() == b"jpeg bytes"


def test_archive_placed_by_hand_is_checked_and_extracted(tmp_path: Path):
    out = tmp_path / "referit"
    (out / "downloads").mkdir(parents=True)
    (out / "downloads" / "referitdata.tar.gz").write_bytes(_tar_gz(_official_files()))
    source = Source(name="fixture", filename="referitdata.tar.gz", url="http://127.0.0.1:9/gone",
                    archive="tar", required=("images/", "mask/"))
    fetch([source], out, progress=False, timeout=5, say=lambda _: None)
    assert sorted(p.name for p in out.iterdir()) == ["images", "mask", "referit_query_test.json"]


# ---------------------------------------------------------------------------- the CLI


def test_cli_fetches_the_official_source_from_a_mirror_then_checks_it(tmp_path: Path, server, capsys):
    server.files["referitdata.tar.gz"] = _tar_gz(_official_files())  # the optional EdgeBoxes zip is absent
    out = tmp_path / "referit"
    code = cli.main(["data", "fetch-referit", "--source", "official", "--out", str(out), "--url-base", server.url,
                     "--no-text", "--timeout", "10"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "warning: optional source 'official' is unavailable: referit_edgeboxes_top100.zip" in captured.err
    assert f"referseg data check {out}" in captured.out

    assert cli.main(["data", "check", str(out)]) == 1
    assert "counts differ" in capsys.readouterr().out
    expected = tmp_path / "expected.json"
    expected.write_text(json.dumps(FIXTURE_COUNTS))
    assert cli.main(["data", "check", str(out), "--expected", str(expected)]) == 0
    assert "OK: this copy reproduces" in capsys.readouterr().out


def test_cli_models_source_from_a_mirror(tmp_path: Path, server, capsys):
    buffer = io.BytesIO()
    np.savez(buffer, conv1_1_w=np.zeros((3, 3), np.float32))
    server.files["vgg_params.npz"] = buffer.getvalue()
    for source in SOURCES["models"].sources[1:]:
        server.files[source.filename] = b"tfmodel weights"
    out = tmp_path / "referit-models"
    assert cli.main(["data", "fetch-referit", "--source", "models", "--out", str(out), "--url-base", server.url,
                     "--timeout", "10"]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == sorted(s.filename for s in SOURCES["models"].sources)


def test_cli_refuses_a_models_file_that_is_not_npz(tmp_path: Path, server, capsys):
    server.files["vgg_params.npz"] = b"not an npz"
    out = tmp_path / "m"
    assert cli.main(["data", "fetch-referit", "--source", "models", "--out", str(out), "--url-base",
                     server.url, "--timeout", "10"]) == 2
    assert "vgg_params.npz is not a readable numpy .npz file" in capsys.readouterr().err
    assert not out.exists()


def test_cli_gone_source_says_where_to_look_and_what_to_place(tmp_path: Path, server, capsys):
    out = tmp_path / "referit"
    code = cli.main(["data", "fetch-referit", "--source", "refclef", "--out", str(out), "--url-base",
                     server.url + "/moved", "--timeout", "10"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    err = lines[-1]  # the one-line error comes after the progress lines
    assert err.startswith("error: source 'refclef' is unavailable") and sum(x.startswith("error") for x in lines) == 1
    assert "HTTP error 404" in err and "https://github.com/lichengunc/refer/issues/26" in err
    assert f"{out}/refclef/instances.json" in err and "referseg data check" in err
    assert not out.exists()


def test_cli_unreachable_server_is_a_gone_source(tmp_path: Path, capsys):
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = cli.main(["data", "fetch-referit", "--source", "saiapr", "--out", str(tmp_path / "r"), "--url-base",
                     f"http://127.0.0.1:{port}", "--timeout", "5"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot connect" in err and "saiapr_tc-12.zip" in err


def test_cli_lists_the_sources_without_a_source(capsys):
    assert cli.main(["data", "fetch-referit"]) == 0
    out = capsys.readouterr().out
    for name in SOURCES:
        assert f"\n{name}: " in out
    assert "referitdata.tar.gz" in out and "refclef.zip" in out and 'pip install -e ".[fetch]"' in out
    assert "https://github.com/ronghanghu/text_objseg/issues/7" in out


def test_cli_unknown_source_and_missing_folder_are_one_line_errors(tmp_path: Path, capsys):
    assert cli.main(["data", "fetch-referit", "--source", "imagenet"]) == 2
    assert "unknown source 'imagenet'" in capsys.readouterr().err
    assert cli.main(["data", "fetch-referit-text", "--from", str(tmp_path / "nowhere"),
                     "--out", str(tmp_path / "t")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert cli.main(["data", "check", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "holds no ReferIt copy" in err


def test_cli_fetch_referit_text_from_folder(official_referit: Path, tmp_path: Path, capsys):
    assert cli.main(["data", "fetch-referit-text", "--from", str(official_referit), "--out", str(tmp_path / "t")]) == 0
    assert "12 official ReferIt text files" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["fetch-referit-text", "fetch-referit", "check"])
def test_new_subcommands_have_help(command: str, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["data", command, "--help"])
    assert exit_.value.code == 0 and "usage: referseg data" in capsys.readouterr().out


@pytest.mark.skipif(__import__("importlib").util.find_spec("gdown") is not None, reason="gdown is installed")
def test_google_drive_source_without_gdown_names_the_extra(tmp_path: Path, capsys):
    assert cli.main(["data", "fetch-referit", "--source", "official", "--out", str(tmp_path / "r")]) == 2
    assert 'pip install -e ".[fetch]"' in capsys.readouterr().err


# ---------------------------------------------------------------------------- data check


def test_check_names_a_removed_image_official_layout(tmp_path: Path):
    data = write_official_referit(tmp_path / "official", with_imsize=True)
    root = data["root"]
    counts = {"train": [1, 2, 3], "val": [1, 1, 1], "trainval": [2, 3, 4], "test": [1, 2, 2]}
    assert check_referit(root, expected=counts, progress=False).ok
    (root / "images" / "203.jpg").unlink()
    (root / "mask" / "201_2.mat").write_bytes(b"not a mat file")
    report = check_referit(root, expected=counts, progress=False)
    assert not report.ok
    assert report.missing_images == ["images/203.jpg"] and report.unreadable_masks == ["mask/201_2.mat"]
    rows = {row.split: row.status for row in report.splits}
    assert rows["test"] == "1 file missing or unreadable" and rows["val"] == "ok"
    assert "missing images (1): images/203.jpg" in report.text()


def test_check_names_a_removed_image_refer_layout(make_refer):
    data = make_refer("refclef", "berkeley")
    root = data["root"]
    counts = {split: [data["images"][split], data["regions"][split], data["pairs"][split]]
              for split in ("train", "val", "test")}
    report = check_referit(root, expected=counts, progress=False)
    assert report.ok, report.text()
    assert "REFER layout" in report.text() and "skipped by the loader: 3 refs" in report.text()
    removed = next((root / "images/saiapr_tc-12").rglob("104.jpg"))
    removed.unlink()
    report = check_referit(root, expected=counts, progress=False)
    assert not report.ok
    assert report.missing_images == [str(removed.relative_to(root))]
    assert str(removed.relative_to(root)) in report.text()


def test_check_lists_at_most_twenty_names(tmp_path: Path):
    root = tmp_path / "many"
    (root / "images").mkdir(parents=True)
    (root / "mask").mkdir()
    (root / "referit_query_test.json").write_text(json.dumps({f"{i}_1": ["thing"] for i in range(1, 26)}))
    (root / "referit_imsize.json").write_text(json.dumps({f"{i}.jpg": [8, 8] for i in range(1, 26)}))
    report = check_referit(root, expected={"test": [25, 25, 25]}, progress=False)
    text = report.text()
    assert len(report.missing_images) == 25 and "missing images (25):" in text and "... and 5 more" in text
    assert "missing masks (25):" in text and not report.ok
