"""Atomic writes: a result file is either complete or absent, never half written. File digests."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_save(path: str | Path, write: Callable[[IO], None]) -> None:
    """Call ``write(handle)`` on a binary temporary file, then rename (e.g. ``torch.save``)."""
    with atomic_open(path, "wb") as handle:
        write(handle)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a whole file, read in chunks (the official VGG-16 file is 528 MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# Modules left out of :func:`code_hash`, so that editing them does not make a kept result (the
# ablation grid, the sweep) stale: those that only present, command or record numbers computed
# elsewhere, the photographs section (neither the grid nor the sweep runs it), and config.py,
# whose profiles a kept result records and compares field by field (read_summary).
PRESENTATION = ("viz.py", "book.py", "screenshot.py", "cli.py", "provenance.py", "photos.py", "config.py")


def package_hash(exclude: tuple[str, ...] = ()) -> str:
    """Hash of the package's version and of its ``referseg/**/*.py`` sources (less those under
    ``exclude``, paths relative to the package): which code made a result."""
    import hashlib

    import referseg

    package = Path(referseg.__file__).parent
    digest = hashlib.sha256(referseg.__version__.encode())
    for path in sorted(package.rglob("*.py")):
        name = path.relative_to(package).as_posix()
        if not any(name == part or (part.endswith("/") and name.startswith(part)) for part in exclude):
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def code_hash() -> str:
    """Hash of the code that trains and evaluates (the package less :data:`PRESENTATION`); the profile,
    compared field by field, covers the rest."""
    return package_hash(PRESENTATION)
