"""Getting ReferIt (SPEC 2): the official text files, the data archives, and a check of a copy.

Three commands live on this module (``referseg data fetch-referit-text``,
``fetch-referit`` and ``check``):

- :func:`fetch_referit_text` places the official implementation's ReferIt text files
  (queries, splits, boxes, sizes, vocabulary) from ``ronghanghu/text_objseg`` at a pinned
  commit, or from a local folder, each checked against its SHA-256.
- :func:`fetch_referit` downloads one named source (the official ``referitdata.tar.gz``, the
  trained models, the REFER release's ``refclef.zip``, the SAIAPR TC-12 images), resuming an
  interrupted transfer, checking what arrived and extracting it safely.
- :func:`check_referit` tells whether a copy on disk reproduces the paper's split.

Downloads are generic (:class:`Source`, :func:`download`), so a test points a source at a
server on the loopback interface. Nothing here imports the training code.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import shutil
import stat
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from referseg.io import sha256_file

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- errors


class FetchError(ValueError):
    """What arrived (or what is on disk) is not what was expected; the message says what to do."""


class ChecksumError(FetchError):
    """A file's size or SHA-256 differs from the expected one; it was refused."""


class SourceUnavailableError(FileNotFoundError):
    """A source could not be reached (HTTP error, connection error); the message says where to look."""


class DownloadInterrupted(SourceUnavailableError):
    """A transfer broke off after some bytes; the ``.part`` file stays so that a rerun resumes it."""


# ---------------------------------------------------------------------------- the official text files

OFFICIAL_REPO = "ronghanghu/text_objseg"
OFFICIAL_COMMIT = "be664d66c72319363691628958727124ea38cad8"  # SPEC: commit be664d6
OFFICIAL_DATA_DIR = "exp-referit/data"
RAW_URL = "https://raw.githubusercontent.com/{repo}/{commit}/{path}"
# SHA-256 and size of each file at OFFICIAL_COMMIT, exp-referit/data/<name> (computed with
# sha256sum from a copy of that folder; the sizes are those of the commit's tree).
TEXT_FILES: dict[str, tuple[int, str]] = {
    "referit_query_train.json": (1727956, "70c9e6dd170c1cddbb345a765864d4e7da2f6dabff213973367d588ac28e20a6"),
    "referit_query_val.json": (184205, "efb5ba835d3d820f4ca29a702ba6ad5112ff0d23c14644f323015095e92a245d"),
    "referit_query_trainval.json": (1912162, "6dd3ce1e90c0885ae70f76e08e3f741bd6565937ccffb5a30efad284fc3949a3"),
    "referit_query_test.json": (1917386, "8ede8ab6f4853c5402aa7a1cedf8323f6c317d94085f765684db65f51857e464"),
    "referit_bbox.json": (3069185, "bec099400a491b51ac0a01108589b6e49c7ae73223b9f2ff9ed8918d3f03a25e"),
    "referit_imsize.json": (494071, "581f019ba6852e7f957e49026b35897c01adc0b37b8b41bf9a489a3f847bb1d1"),
    "referit_imcrop.json": (1358956, "b0a737647ab0a53f28eed99f2dc113255fe3e2cd11990024fc676c121e44c2f8"),
    "vocabulary_referit.txt": (65896, "937e1422fa991ee49a4c891981ccba6983e53031b809b8a596841e2b9c445c48"),
    "referit_train_imlist.txt": (51321, "9c733bd2f8ffb5455c6bd6d97a6558985e4b2ec7b76db107321e877fcb848889"),
    "referit_val_imlist.txt": (5702, "52d42c6af07c26bde1ba8ee678e19cb15c2051b6bb950dda0238267d6742d56e"),
    "referit_trainval_imlist.txt": (57023, "348ccc1329bfc8fda9ba67d3aacc73d102a6fe98f4744e959ba87520bb423c1c"),
    "referit_test_imlist.txt": (57048, "2217e8b2b723e40151750294defbd0f15ea7786b758fe447e82272279c42c2a1"),
}
USER_AGENT = "referseg-fetch/0.1 (+https://github.com/ronghanghu/text_objseg)"


def text_file_url(name: str, url_base: str | None = None) -> str:
    """Where an official text file is downloaded from: the pinned commit's raw file, or ``url_base/name``."""
    if url_base:
        return f"{url_base.rstrip('/')}/{name}"
    return RAW_URL.format(repo=OFFICIAL_REPO, commit=OFFICIAL_COMMIT, path=f"{OFFICIAL_DATA_DIR}/{name}")


def _has_text_file(path: Path) -> bool:
    size, sha = TEXT_FILES[path.name]
    return path.is_file() and path.stat().st_size == size and sha256_file(path) == sha


def fetch_referit_text(out: str | Path = "data/referit-text", from_dir: str | Path | None = None,
                       url_base: str | None = None, progress: bool = True, timeout: float = 60.0,
                       retries: int = 3) -> list[Path]:
    """Place the official ReferIt text files in ``out``, each checked against :data:`TEXT_FILES`.

    From ``from_dir`` when given (a copy of the official ``exp-referit/data/``), else from
    ``ronghanghu/text_objseg`` at :data:`OFFICIAL_COMMIT` (or ``url_base/<name>``). All files are
    gathered and checked in a temporary folder beside ``out`` first: a wrong file is refused
    with its name and both hashes, and ``out`` is left as it was. Files already in ``out`` with
    the right checksum are kept.
    """
    out = Path(out)
    wanted = [out / name for name in TEXT_FILES]
    todo = [path.name for path in wanted if not _has_text_file(path)]
    if not todo:
        return wanted
    if from_dir is not None and not Path(from_dir).is_dir():
        raise FileNotFoundError(f"--from {from_dir}: no such folder; give a folder holding the official files "
                                f"({OFFICIAL_DATA_DIR}/ of {OFFICIAL_REPO} at {OFFICIAL_COMMIT[:7]})")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.fetch-"))
    try:
        for name in todo:
            size, expected = TEXT_FILES[name]
            target = staging / name
            if from_dir is not None:
                source = Path(from_dir) / name
                if not source.is_file():
                    raise FileNotFoundError(
                        f"{source} does not exist: --from must hold every official text file "
                        f"({', '.join(TEXT_FILES)}); nothing was written to {out}")
                shutil.copyfile(source, target)
            else:
                url = text_file_url(name, url_base)
                try:
                    download(url, target, progress=progress, timeout=timeout, retries=retries)
                except DownloadInterrupted:
                    raise
                except SourceUnavailableError as error:
                    raise SourceUnavailableError(
                        f"{error}. The official repository {OFFICIAL_REPO} may be unreachable from here: copy "
                        f"its {OFFICIAL_DATA_DIR}/ files (commit {OFFICIAL_COMMIT[:7]}) into a folder and run "
                        f"'referseg data fetch-referit-text --from FOLDER --out {out}'") from error
            actual = sha256_file(target)
            if actual != expected:
                raise ChecksumError(
                    f"{name}: SHA-256 {actual} ({target.stat().st_size:,} bytes) differs from the official file's "
                    f"{expected} ({size:,} bytes; {OFFICIAL_REPO}@{OFFICIAL_COMMIT[:7]} {OFFICIAL_DATA_DIR}/{name}); "
                    f"refused, nothing was written to {out}")
        out.mkdir(parents=True, exist_ok=True)
        for name in todo:
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return wanted


# ---------------------------------------------------------------------------- sources

GDRIVE_REFERIT = "https://drive.google.com/drive/folders/12EEft_mg-47EwWegawyH0pHaX7781E3_"
GDRIVE_MODELS = "https://drive.google.com/drive/folders/1rPYln_jsC12Q0AQNf0pJKKseXvPA7-zg"
ARCHIVE_REFCLEF = ("https://web.archive.org/web/20220413011817/"
                   "https://bvisionweb1.cs.unc.edu/licheng/referit/data/refclef.zip")
ARCHIVE_SAIAPR = ("https://web.archive.org/web/20220515000000/"
                  "http://bvisionweb1.cs.unc.edu/licheng/referit/data/images/saiapr_tc-12.zip")
OFFICIAL_THREADS = ("https://github.com/ronghanghu/text_objseg/issues/7",
                    "https://github.com/ronghanghu/text_objseg/issues/8")
REFER_THREADS = ("https://github.com/lichengunc/refer/issues/14", "https://github.com/lichengunc/refer/issues/15",
                 "https://github.com/lichengunc/refer/issues/22", "https://github.com/lichengunc/refer/issues/26")


@dataclass(frozen=True)
class Source:
    """One file to fetch: where it is, what it must be, and where its content goes.

    ``kind`` is ``"http"`` (a plain URL, fetched with :func:`download`) or ``"gdrive-folder"``
    (``url`` is a Google Drive folder holding ``filename``, fetched with gdown). ``archive`` is
    ``"tar"``, ``"zip"`` or ``None`` (a file kept as it is, under ``extract_to``); ``required``
    names members (a trailing ``/`` means "some member under this folder") the archive must hold.
    """

    name: str
    filename: str
    url: str
    kind: str = "http"
    size: int | None = None
    sha256: str | None = None
    archive: str | None = None
    required: tuple[str, ...] = ()
    extract_to: str = ""
    check: str | None = None  # "npz": must open with numpy
    optional: bool = False
    approx_size: str = ""
    expects: str = ""
    threads: tuple[str, ...] = ()
    by_hand: str = ""

    def at(self, url_base: str) -> Source:
        """The same file from a mirror: ``url_base/filename`` over plain HTTP."""
        return replace(self, url=f"{url_base.rstrip('/')}/{self.filename}", kind="http")


@dataclass(frozen=True)
class SourceGroup:
    """What ``--source NAME`` fetches: one or more files, into a default folder."""

    name: str
    title: str
    out: str
    layout: str
    sources: tuple[Source, ...] = field(default_factory=tuple)


_OFFICIAL_BY_HAND = (
    "download referitdata.tar.gz from the Google Drive folder in a browser and put it at "
    "{out}/downloads/referitdata.tar.gz, then run this command again (it checks and extracts it); or "
    "extract it yourself so that {out}/images/<imgid>.jpg and {out}/mask/<imgid>_<k>.mat exist, and add the "
    "text files with 'referseg data fetch-referit-text --out {out}'")
_REFCLEF_BY_HAND = (
    "put refclef.zip at {out}/downloads/refclef.zip and run this command again, or unzip it yourself so that "
    "{out}/refclef/instances.json and {out}/refclef/refs(berkeley).p exist")
_SAIAPR_BY_HAND = (
    "put saiapr_tc-12.zip at {out}/downloads/saiapr_tc-12.zip and run this command again, or unzip it "
    "yourself into {out}/images/ so that {out}/images/saiapr_tc-12/<nn>/images/<id>.jpg exist")
_MODELS_BY_HAND = ("download the four files from the Google Drive folder in a browser and put them in {out}/")

_REFCLEF = Source(
    name="refclef", filename="refclef.zip", url=ARCHIVE_REFCLEF, archive="zip",
    required=("refclef/instances.json", "refclef/refs(berkeley).p"), extract_to="",
    approx_size="tens of MB (estimate; not measured here)",
    expects="refclef/instances.json (about 20k images, 99k RLE regions), refs(berkeley).p (the paper's split), "
            "refs(unc).p",
    threads=REFER_THREADS, by_hand=_REFCLEF_BY_HAND)
_SAIAPR = Source(
    name="saiapr", filename="saiapr_tc-12.zip", url=ARCHIVE_SAIAPR, archive="zip",
    required=("saiapr_tc-12/",), extract_to="images",
    approx_size="1 to 2 GB (estimate; not measured here)",
    expects="saiapr_tc-12/<nn>/images/<id>.jpg: the 19,997 SAIAPR TC-12 images the REFER release uses",
    threads=REFER_THREADS, by_hand=_SAIAPR_BY_HAND)
_MODEL_FILES = (
    ("vgg_params.npz", "about 550 MB (VGG-16, 138M float32 weights; estimate)", "npz"),
    ("referit_fc8_det_iter_25000.tfmodel", "about 0.6 GB or more (estimate)", None),
    ("referit_fc8_seg_lowres_iter_30000.tfmodel", "about 0.6 GB or more (estimate)", None),
    ("referit_fc8_seg_highres_iter_18000.tfmodel", "about 0.6 GB or more (estimate)", None),
)

SOURCES: dict[str, SourceGroup] = {
    "official": SourceGroup(
        name="official", out="data/referit",
        title="the official ReferIt data and EdgeBoxes proposals (Google Drive, via gdown)",
        layout="official: images/, mask/ and the referit_* text files",
        sources=(
            Source(name="official", filename="referitdata.tar.gz", url=GDRIVE_REFERIT, kind="gdrive-folder",
                   archive="tar", required=("images/", "mask/"), extract_to="",
                   approx_size="a few GB (estimate; not measured here)",
                   expects="images/<imgid>.jpg (about 20,000) and mask/<imgid>_<k>.mat (about 99,610 regions, "
                           "foreground where segimg_t == 0)",
                   threads=OFFICIAL_THREADS, by_hand=_OFFICIAL_BY_HAND),
            Source(name="official", filename="referit_edgeboxes_top100.zip", url=GDRIVE_REFERIT,
                   kind="gdrive-folder", archive="zip", extract_to="", optional=True,
                   approx_size="hundreds of MB (estimate; not measured here)",
                   expects="referit_edgeboxes_top100/: the top-100 EdgeBoxes proposals of each image (for the "
                           "box-retrieval stage and baseline; optional)",
                   threads=OFFICIAL_THREADS, by_hand=_OFFICIAL_BY_HAND),
        )),
    "models": SourceGroup(
        name="models", out="data/referit-models",
        title="the official trained models (Google Drive, via gdown)",
        layout="the four model files, as they are",
        sources=tuple(
            Source(name="models", filename=name, url=GDRIVE_MODELS, kind="gdrive-folder", check=check,
                   approx_size=size, expects="TensorFlow 0.x weights of the official code" if check is None
                   else "VGG-16 ImageNet weights converted from Caffe (numpy .npz)",
                   threads=OFFICIAL_THREADS, by_hand=_MODELS_BY_HAND)
            for name, size, check in _MODEL_FILES)),
    "refclef": SourceGroup(
        name="refclef", out="data/referit", layout="REFER: refclef/",
        title="the REFER release's refclef annotations (web.archive.org snapshot)", sources=(_REFCLEF,)),
    "saiapr": SourceGroup(
        name="saiapr", out="data/referit", layout="REFER: images/saiapr_tc-12/",
        title="the SAIAPR TC-12 images of the REFER release (web.archive.org snapshot)", sources=(_SAIAPR,)),
    "refer": SourceGroup(
        name="refer", out="data/referit", layout="REFER: refclef/ and images/saiapr_tc-12/",
        title="refclef and saiapr together: the whole REFER layout", sources=(_REFCLEF, _SAIAPR)),
}


def describe_sources() -> str:
    """A readable list of the sources, what each holds and where it goes."""
    lines = ["ReferIt sources (referseg data fetch-referit --source NAME):", ""]
    for group in SOURCES.values():
        lines.append(f"{group.name}: {group.title}")
        lines.append(f"  into {group.out}/ ({group.layout})")
        for source in group.sources:
            where = source.url
            lines.append(f"  - {source.filename}{' (optional)' if source.optional else ''}: "
                         f"{source.approx_size}; {source.expects}")
            lines.append(f"    from {where}")
        threads = sorted({t for s in group.sources for t in s.threads})
        lines.append(f"  if it is gone, look in: {', '.join(threads)}")
        lines.append("")
    lines += ["The Google Drive sources need gdown: pip install -e \".[fetch]\".",
              "--url-base URL fetches every file of a source from URL/<filename> instead (a mirror).",
              "Afterwards: referseg data check <folder>."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- HTTP download


class _Gone(Exception):
    """The server answered with an error or could not be reached (not retried)."""


class _Interrupted(Exception):
    """The transfer broke off (retried with a Range request)."""


def download(url: str, dest: str | Path, *, size: int | None = None, sha256: str | None = None,
             progress: bool = True, timeout: float = 60.0, retries: int = 3, chunk_size: int = 1 << 20) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming with an HTTP Range request.

    A broken transfer is resumed up to ``retries`` times; after that the ``.part`` file stays
    and :class:`DownloadInterrupted` says to run again. What arrived is checked against the
    server's Content-Length and against ``size`` / ``sha256`` when known; a wrong file is
    removed and refused (:class:`ChecksumError`). ``dest`` appears only when complete.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file() and (size is None or dest.stat().st_size == size) and (
            sha256 is None or sha256_file(dest) == sha256):
        return dest
    attempt = 0
    while True:
        try:
            _transfer(url, part, progress=progress, timeout=timeout, chunk_size=chunk_size)
            break
        except _Gone as error:
            raise SourceUnavailableError(f"{url}: {error}") from None
        except _Interrupted as error:
            attempt += 1
            have = part.stat().st_size if part.exists() else 0
            if attempt > retries:
                raise DownloadInterrupted(
                    f"{url}: the download broke off after {have:,} bytes ({error}); {part} is kept: run the "
                    f"same command again to resume it") from None
            logger.warning("%s: interrupted after %d bytes (%s); resuming (try %d of %d)", url, have, error,
                           attempt, retries)
    got = part.stat().st_size
    if size is not None and got != size:
        part.unlink()
        raise ChecksumError(f"{dest.name}: {got:,} bytes arrived from {url}, expected {size:,}; refused and removed "
                            f"(run again to download it anew)")
    if sha256 is not None:
        actual = sha256_file(part)
        if actual != sha256:
            part.unlink()
            raise ChecksumError(f"{dest.name}: SHA-256 {actual} differs from the expected {sha256} (from {url}); "
                                f"refused and removed")
    os.replace(part, dest)
    return dest


def _transfer(url: str, part: Path, progress: bool, timeout: float, chunk_size: int) -> None:
    """One request: append to ``part`` from where it ends (or start over); raise on a break."""
    from tqdm import tqdm

    start = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and start:  # nothing left past `start`: complete if the lengths agree
            match = re.fullmatch(r"bytes \*/(\d+)", error.headers.get("Content-Range", "") or "")
            if match and int(match.group(1)) == start:
                return
            part.unlink()
            raise _Interrupted(f"the server refused resuming at byte {start:,}; starting over") from None
        raise _Gone(f"HTTP error {error.code} {error.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", error)
        raise _Gone(f"cannot connect ({reason})") from None
    with response:
        if start and response.status != 206:  # the server ignored the Range header: start over
            start = 0
        elif start and not (response.headers.get("Content-Range") or "").startswith(f"bytes {start}-"):
            part.unlink()
            raise _Interrupted(f"the server resumed at another byte than {start:,}; starting over")
        length = response.headers.get("Content-Length")
        total = start + int(length) if length and length.isdigit() else None
        with open(part, "ab" if start else "wb") as handle, tqdm(
                total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=part.name[:-5],
                disable=not progress, leave=False) as bar:
            while True:
                try:
                    block = response.read(chunk_size)
                except (OSError, http.client.HTTPException) as error:
                    raise _Interrupted(str(error) or type(error).__name__) from None
                if not block:
                    break
                handle.write(block)
                bar.update(len(block))
    have = part.stat().st_size
    if total is not None and have < total:
        raise _Interrupted(f"the connection closed after {have:,} of {total:,} bytes")
    if total is not None and have > total:
        part.unlink()
        raise _Interrupted(f"{have:,} bytes arrived where the server announced {total:,}; starting over")


# ---------------------------------------------------------------------------- archives


def _member_problem(name: str) -> str | None:
    """Why an archive member's path is unsafe to extract, or None."""
    if not name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "an absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "a '..' component"
    return None


def _clean(name: str) -> str:
    name = name.replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name


def list_archive(path: Path, kind: str) -> list[str]:
    """Every member of a tar or zip archive (read to the end, so a truncated one fails here)."""
    names: list[str] = []
    try:
        if kind == "tar":
            with tarfile.open(path, "r:*") as archive:
                for member in archive.getmembers():
                    problem = _member_problem(member.name)
                    if problem is None and not (member.isfile() or member.isdir()):
                        problem = "a link or special file"
                    if problem:
                        raise FetchError(f"{path.name}: member {member.name!r} is {problem}; refused (not extracted)")
                    names.append(_clean(member.name) + ("/" if member.isdir() else ""))
        else:
            with zipfile.ZipFile(path) as archive:
                for info in archive.infolist():
                    problem = _member_problem(info.filename)
                    if problem is None and stat.S_ISLNK(info.external_attr >> 16):
                        problem = "a symbolic link"
                    if problem:
                        raise FetchError(f"{path.name}: member {info.filename!r} is {problem}; refused (not extracted)")
                    names.append(_clean(info.filename))
                bad = archive.testzip()
                if bad is not None:
                    raise FetchError(f"{path.name}: member {bad!r} is corrupt (CRC mismatch); refused")
    except FetchError:
        raise
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
        raise FetchError(f"{path.name} is not a readable {kind} archive (truncated or damaged? {error}); "
                         f"refused") from None
    if not names:
        raise FetchError(f"{path.name}: the archive is empty; refused")
    return names


def _has(names: Iterable[str], wanted: str) -> bool:
    if wanted.endswith("/"):
        return any(n.startswith(wanted) and n != wanted for n in names)
    return wanted in names


def archive_root(names: Sequence[str], required: Sequence[str], filename: str) -> str:
    """The folder inside the archive that holds ``required``: ``""`` or its single top folder."""
    if all(_has(names, r) for r in required):
        return ""
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) == 1:
        top = f"{tops.pop()}/"
        if all(_has(names, top + r) for r in required):
            return top
    sample = ", ".join(sorted(names)[:5])
    raise FetchError(f"{filename}: expected {', '.join(required)} in the archive, found {len(names):,} members "
                     f"such as {sample}; refused (is it the right file?)")


def _merge_into(source: Path, target: Path) -> None:
    """Move ``source`` (a file or folder) onto ``target``, merging folders, replacing files."""
    if source.is_dir() and target.is_dir():
        for entry in source.iterdir():
            _merge_into(entry, target / entry.name)
        source.rmdir()
    else:
        if target.is_dir():
            raise FetchError(f"{target} is a folder, but the archive has a file there; move it away and run again")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)


def extract_archive(path: Path, source: Source, out: Path) -> list[Path]:
    """Check ``path`` (it opens, its members are safe and include ``source.required``) and extract
    it into ``out/source.extract_to`` through a hidden staging folder, so a failure leaves nothing."""
    kind = source.archive or "tar"
    names = list_archive(path, kind)
    root = archive_root(names, source.required, path.name)
    target = out / source.extract_to if source.extract_to else out
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".extract-"))
    try:
        try:
            if kind == "tar":
                with tarfile.open(path, "r:*") as archive:
                    if hasattr(tarfile, "data_filter"):
                        archive.extractall(staging, filter="data")
                    else:  # members were checked above: no absolute paths, no '..', no links
                        archive.extractall(staging)
            else:
                with zipfile.ZipFile(path) as archive:
                    archive.extractall(staging)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as error:
            raise FetchError(f"{path.name}: extraction failed ({error}); nothing was placed in {out}") from None
        content = staging / root if root else staging
        placed = [target / entry.name for entry in sorted(content.iterdir())]
        target.mkdir(parents=True, exist_ok=True)
        for entry in sorted(content.iterdir()):
            _merge_into(entry, target / entry.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return placed


def _check_npz(path: Path) -> None:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as arrays:
            if not arrays.files:
                raise ValueError("it holds no arrays")
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise FetchError(f"{path.name} is not a readable numpy .npz file ({error}); refused") from None


# ---------------------------------------------------------------------------- fetching sources


def _gone_message(source: Source, url: str, error: object, out: Path) -> str:
    threads = ", ".join(source.threads) or "the dataset's issue tracker"
    return (f"source '{source.name}' is unavailable: {source.filename} could not be fetched from {url} ({error}). "
            f"Look for a newer link in {threads}; or place it by hand: {source.by_hand.format(out=out)}. "
            f"Then run 'referseg data check {out}'")


def _gdrive_fetch(source: Source, dest: Path, out: Path, progress: bool, listings: dict[str, Any]) -> None:
    """Fetch ``source.filename`` from its Google Drive folder with gdown (the ``fetch`` extra)."""
    try:
        import gdown
    except ImportError:
        raise FetchError(
            f"source '{source.name}' is on Google Drive and needs gdown: pip install -e \".[fetch]\" "
            f"(or pip install gdown); or download {source.filename} from {source.url} in a browser and put it at "
            f"{dest}, then run again") from None
    try:
        if source.url not in listings:
            listings[source.url] = gdown.download_folder(url=source.url, skip_download=True, quiet=not progress)
        entries = [f for f in listings[source.url] or [] if PurePosixPath(str(f.path)).name == source.filename]
        if not entries:
            raise SourceUnavailableError(_gone_message(source, source.url, "the folder does not list it", out))
        result = gdown.download(id=entries[0].id, output=str(dest), quiet=not progress, resume=True)
    except SourceUnavailableError:
        raise
    except Exception as error:  # gdown raises its own errors, requests' and OSError
        raise SourceUnavailableError(_gone_message(source, source.url, error, out)) from None
    if not result or not dest.is_file():
        raise SourceUnavailableError(_gone_message(source, source.url, "gdown fetched nothing", out))


def _verify(path: Path, source: Source) -> None:
    if source.size is not None and path.stat().st_size != source.size:
        got = path.stat().st_size
        path.unlink()
        raise ChecksumError(f"{source.filename}: {got:,} bytes, expected {source.size:,}; refused and removed")
    if source.sha256 is not None:
        actual = sha256_file(path)
        if actual != source.sha256:
            path.unlink()
            raise ChecksumError(f"{source.filename}: SHA-256 {actual} differs from the expected {source.sha256}; "
                                f"refused and removed")


def fetch(sources: Sequence[Source], out: str | Path, *, url_base: str | None = None, progress: bool = True,
          timeout: float = 60.0, retries: int = 3, keep_archives: bool = False,
          say: Callable[[str], None] | None = None) -> list[Path]:
    """Fetch, check and place each source's file under ``out``; return what was placed.

    Downloads go to ``out/downloads/`` (a file already there, e.g. placed by hand, is used as
    it is); an archive that checks out is extracted and then removed unless ``keep_archives``.
    A file that fails a check is removed and refused; an optional source that is gone is
    skipped with a warning; a required one raises :class:`SourceUnavailableError`.
    """
    out = Path(out)
    say = say or (lambda text: print(text, file=sys.stderr))
    downloads = out / "downloads"
    for stale in out.glob(".extract-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    created = not out.exists()
    try:
        return _fetch_each(sources, out, downloads, url_base, progress, timeout, retries, keep_archives, say)
    finally:  # leave no empty folder behind
        if downloads.is_dir() and not any(downloads.iterdir()):
            downloads.rmdir()
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()


def _fetch_each(sources: Sequence[Source], out: Path, downloads: Path, url_base: str | None, progress: bool,
                timeout: float, retries: int, keep_archives: bool, say: Callable[[str], None]) -> list[Path]:
    listings: dict[str, Any] = {}
    placed: list[Path] = []
    for original in sources:
        source = original.at(url_base) if url_base else original
        dest = downloads / source.filename
        try:
            if dest.is_file():
                say(f"{source.filename}: using {dest}")
                _verify(dest, source)
            elif source.kind == "gdrive-folder":
                downloads.mkdir(parents=True, exist_ok=True)
                _gdrive_fetch(source, dest, out, progress, listings)
                _verify(dest, source)
            else:
                say(f"{source.filename}: downloading {source.url}")
                download(source.url, dest, size=source.size, sha256=source.sha256, progress=progress,
                         timeout=timeout, retries=retries)
        except DownloadInterrupted:
            raise
        except SourceUnavailableError as error:
            message = str(error) if str(error).startswith("source '") else _gone_message(
                source, source.url, str(error).removeprefix(f"{source.url}: "), out)
            if source.optional:
                say(f"warning: optional {message}")
                continue
            raise SourceUnavailableError(message) from None
        try:
            if source.archive:
                placed += extract_archive(dest, source, out)
                if not keep_archives:
                    dest.unlink()
            else:
                if source.check == "npz":
                    _check_npz(dest)
                target = (out / source.extract_to if source.extract_to else out) / source.filename
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(dest, target)
                placed.append(target)
        except FetchError as error:
            if dest.exists():  # a broken file would only be found again next time
                dest.unlink()
                raise type(error)(f"{error}; {dest} was removed") from None
            raise
        say(f"{source.filename}: placed in {out / source.extract_to if source.extract_to else out}")
    return placed


def fetch_referit(source: str, out: str | Path | None = None, *, url_base: str | None = None, text: bool = True,
                  text_from: str | Path | None = None, progress: bool = True, timeout: float = 60.0,
                  retries: int = 3, keep_archives: bool = False) -> list[Path]:
    """Fetch the source group ``source`` (:data:`SOURCES`) into ``out`` (default: the group's folder).

    For ``official`` the text files (queries, sizes, vocabulary) are added too, from the pinned
    commit or ``text_from``, unless ``text`` is False.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)} "
                         f"('referseg data fetch-referit' lists them)")
    group = SOURCES[source]
    out = Path(out or group.out)
    placed = fetch(group.sources, out, url_base=url_base, progress=progress, timeout=timeout, retries=retries,
                   keep_archives=keep_archives)
    if group.name == "official" and text:
        placed += fetch_referit_text(out, from_dir=text_from, progress=progress, timeout=timeout, retries=retries)
    return placed


# ---------------------------------------------------------------------------- checking a copy

# SPEC 2: (images with queries, regions, pairs) of the paper's split.
SPEC_COUNTS: dict[str, tuple[int, int, int]] = {
    "train": (8995, 44649, 54134),
    "val": (1000, 4866, 5842),
    "trainval": (9995, 49515, 59976),
    "test": (9994, 49730, 60105),
}
# The REFER release lacks 19579.jpg, 17975.jpg (train) and 19575.jpg (test) and the loader skips
# them. In the official files 19579 has 2 regions / 7 pairs (train), 19575 has 2 / 2 (test) and
# 17975 none, so a complete REFER copy should have SPEC 2's counts minus those (derived from the
# official files, not measured on a REFER copy).
REFER_COUNTS: dict[str, tuple[int, int, int]] = {
    "train": (8994, 44647, 54127),
    "val": (1000, 4866, 5842),
    "trainval": (9994, 49513, 59969),
    "test": (9993, 49728, 60103),
}
REQUIRED_SPLITS = ("trainval", "test")  # the paper trains on trainval and tests on test
LIST_CAP = 20


@dataclass
class SplitCheck:
    split: str
    expected: tuple[int, int, int] | None
    found: tuple[int, int, int] | None
    bad_files: int = 0

    @property
    def status(self) -> str:
        if self.found is None:
            return "absent" if self.split in REQUIRED_SPLITS else "absent (not needed)"
        if self.expected is None:
            return "not checked"
        problems = []
        if self.found != self.expected:
            problems.append("counts differ")
        if self.bad_files:
            problems.append(f"{self.bad_files:,} file{'s' if self.bad_files != 1 else ''} missing or unreadable")
        return ", ".join(problems) or "ok"

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "not checked", "absent (not needed)")


@dataclass
class CheckReport:
    """What :func:`check_referit` found; ``text()`` is the printable table, ``ok`` the verdict."""

    root: Path
    layout: str
    expected_from: str
    splits: list[SplitCheck]
    missing_images: list[str] = field(default_factory=list)
    unreadable_images: list[str] = field(default_factory=list)
    missing_masks: list[str] = field(default_factory=list)
    unreadable_masks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.splits) and all(s.ok for s in self.splits) and not (
            self.missing_images or self.unreadable_images or self.missing_masks or self.unreadable_masks)

    def text(self) -> str:
        def counts(c: tuple[int, int, int] | None) -> str:
            return " / ".join(f"{n:,}" for n in c) if c else "-"

        header = ("split", "expected (images / regions / pairs)", "found (images / regions / pairs)", "status")
        rows = [header] + [(s.split, counts(s.expected), counts(s.found), s.status) for s in self.splits]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"ReferIt at {self.root}: {self.layout}", f"expected counts: {self.expected_from}", ""]
        lines += ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
        for title, names in (("missing images", self.missing_images), ("unreadable images", self.unreadable_images),
                             ("missing masks", self.missing_masks), ("unreadable masks", self.unreadable_masks)):
            if names:
                shown = ", ".join(names[:LIST_CAP])
                more = f" ... and {len(names) - LIST_CAP:,} more" if len(names) > LIST_CAP else ""
                lines += ["", f"{title} ({len(names):,}): {shown}{more}"]
        if self.notes:
            lines += [""] + self.notes
        lines += ["", "OK: this copy reproduces the paper's split" if self.ok else
                  "NOT OK: this copy would not reproduce the paper's split (see the status column and the lists above)"]
        return "\n".join(lines)


def _layout(root: Path) -> str:
    from referseg.data.refer import IMAGE_DIRS, DatasetNotFoundError

    if (root / "refclef").is_dir():
        wanted = ["refclef/instances.json", "refclef/refs(berkeley).p", IMAGE_DIRS["refclef"] + "/"]
        missing = [w for w in wanted if not (root / w).exists()]
        if missing:
            raise DatasetNotFoundError(
                f"{root} is an incomplete ReferIt copy in the REFER layout: missing {', '.join(missing)} "
                f"(see data/README.md; 'referseg data fetch-referit' lists the sources)")
        return "refer"
    if any(root.glob("referit_query_*.json")):
        missing = [w for w in ("mask/", "images/") if not (root / w).is_dir()]
        if missing:
            raise DatasetNotFoundError(
                f"{root} is an incomplete ReferIt copy in the official layout: missing {', '.join(missing)} "
                f"(they come in referitdata.tar.gz: 'referseg data fetch-referit --source official')")
        return "official"
    if not root.is_dir():
        raise DatasetNotFoundError(f"{root} does not exist; get ReferIt first ('referseg data fetch-referit' "
                                   f"lists the sources, data/README.md the layouts)")
    raise DatasetNotFoundError(
        f"{root} holds no ReferIt copy: expected refclef/instances.json + refclef/refs(berkeley).p + "
        f"images/saiapr_tc-12/ (REFER layout) or referit_query_*.json + mask/ + images/ (official layout)")


def _image_problem(path: Path, height: int, width: int) -> str | None:
    """None, ``"missing"`` or ``"unreadable"`` (it does not open, or its size differs from the record)."""
    from referseg.data.images import image_size  # the one decoder's header reader

    if not path.is_file():
        return "missing"
    try:
        size = image_size(path)
    except (FileNotFoundError, ValueError):
        return "unreadable"
    return None if size == (height, width) else "unreadable"


def check_referit(root: str | Path, expected: dict[str, Any] | None = None, masks: bool = True,
                  progress: bool = True) -> CheckReport:
    """Check a ReferIt copy: layout, per-split counts against SPEC 2 (or ``expected``), every
    image opening at its recorded size, every mask decoding (unless ``masks`` is False).

    ``expected`` maps a split to ``(images, regions, pairs)`` or to a dict with those keys; only
    its splits are then checked. The loaders of :mod:`referseg.data.refer` read the copy.
    """
    from tqdm import tqdm

    from referseg.data.refer import OfficialReferIt, Refer

    root = Path(root)
    layout = _layout(root)
    notes: list[str] = []
    if layout == "refer":
        refer: Any = Refer(root, "refclef", "berkeley")
        layout_text = "REFER layout (refclef/instances.json, refs(berkeley).p, images/saiapr_tc-12/)"
        default, default_from = REFER_COUNTS, (
            "SPEC 2 minus the 3 images the REFER release lacks (19579.jpg, 17975.jpg, 19575.jpg)")
    else:
        try:
            refer = OfficialReferIt(root)
        except FileNotFoundError as error:  # no referit_imsize.json and an image is missing
            raise FileNotFoundError(f"{error}. Add referit_imsize.json ('referseg data fetch-referit-text --out "
                                    f"{root}') so that the check can list every missing image") from None
        layout_text = "official layout (referit_query_*.json, mask/, images/)"
        default, default_from = SPEC_COUNTS, "SPEC 2 (the paper's split)"
    if expected is not None:
        wanted = {split: _counts(value, split) for split, value in expected.items()}
        default_from = "given by the caller"
    else:
        wanted = dict(default)
    splits = list(dict.fromkeys([*wanted, *refer.splits]))
    pairs = {split: refer.pairs(split) for split in splits if split in refer.splits}

    image_status: dict[int, str | None] = {}
    image_ids = sorted({p.image_id for split_pairs in pairs.values() for p in split_pairs})
    for image_id in tqdm(image_ids, desc="images", disable=not progress, leave=False):
        record = refer.images[image_id]
        image_status[image_id] = _image_problem(refer.image_path(image_id), record["height"], record["width"])
    mask_status: dict[int, str | None] = {}
    if masks:
        ann_ids = sorted({p.ann_id for split_pairs in pairs.values() for p in split_pairs})
        for ann_id in tqdm(ann_ids, desc="masks", disable=not progress, leave=False):
            try:
                refer.load_mask(ann_id)
                mask_status[ann_id] = None
            except FileNotFoundError:
                mask_status[ann_id] = "missing"
            except Exception:  # any decoding failure makes the mask unusable
                mask_status[ann_id] = "unreadable"
    else:
        notes.append("masks were not checked (--no-masks)")

    rows = []
    for split in splits:
        split_pairs = pairs.get(split)
        if split_pairs is None:
            rows.append(SplitCheck(split, wanted.get(split), None))
            continue
        images = {p.image_id for p in split_pairs}
        regions = {p.ann_id for p in split_pairs}
        bad = sum(image_status[i] is not None for i in images) + sum(mask_status.get(a) is not None for a in regions)
        rows.append(SplitCheck(split, wanted.get(split), (len(images), len(regions), len(split_pairs)), bad))

    def named(status: dict[int, str | None], kind: str, name: Callable[[int], str]) -> list[str]:
        return [name(key) for key, value in sorted(status.items()) if value == kind]

    def image_name(image_id: int) -> str:
        path = refer.image_path(image_id)
        return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)

    def mask_name(ann_id: int) -> str:
        return f"mask/{ann_id // 1000}_{ann_id % 1000}.mat" if layout == "official" else f"annotation {ann_id}"

    skipped = getattr(refer, "skipped", {})
    if skipped.get("refs"):
        notes.append(f"skipped by the loader: {skipped['refs']:,} refs ({skipped['pairs']:,} expressions) on "
                     f"{skipped['images']:,} images absent from instances.json (SPEC 2: the release lacks 3)")
    return CheckReport(
        root=root, layout=layout_text, expected_from=default_from, splits=rows,
        missing_images=named(image_status, "missing", image_name),
        unreadable_images=named(image_status, "unreadable", image_name),
        missing_masks=named(mask_status, "missing", mask_name),
        unreadable_masks=named(mask_status, "unreadable", mask_name),
        notes=notes)


def _counts(value: Any, split: str) -> tuple[int, int, int]:
    if isinstance(value, dict):
        value = [value.get(k) for k in ("images", "regions", "pairs")]
    try:
        images, regions, pairs = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"expected counts of split {split!r}: give [images, regions, pairs] or "
                         f"{{\"images\": n, \"regions\": n, \"pairs\": n}}, got {value!r}") from None
    return images, regions, pairs


def load_expected(path: str | Path) -> dict[str, tuple[int, int, int]]:
    """Expected counts from a JSON file: ``{"test": [images, regions, pairs], ...}``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"--expected {path}: no such file") from None
    except (OSError, ValueError) as error:
        raise ValueError(f"--expected {path}: not readable JSON ({error})") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"--expected {path}: expected an object mapping splits to [images, regions, pairs]")
    return {str(split): _counts(value, split) for split, value in data.items()}
