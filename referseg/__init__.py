"""referseg: a reproducible study of Hu, Rohrbach & Darrell (ECCV 2016).

Segmentation from natural language expressions: an image and a referring
expression in, the pixel mask of the region it names out.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path
from typing import Any


def _version() -> str:
    """The version pyproject.toml states, through the installed metadata (its one source).

    A source tree that was never installed has no metadata: then pyproject.toml beside the
    package is read directly, and without it the version is ``0+unknown``.
    """
    try:
        return metadata.version("referseg")
    except metadata.PackageNotFoundError:
        pass
    try:
        text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return "0+unknown"
    # The `version` key of the [project] table (no TOML parser on Python 3.10).
    project = re.search(r"^\[project\][ \t]*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    found = project and re.search(r"""^version\s*=\s*["']([^"']+)["']""", project.group(1), re.M)
    return found.group(1) if found else "0+unknown"


__version__ = _version()


def __getattr__(name: str) -> Any:
    # Keep `import referseg` (and `referseg --help`) light: torch loads on first use.
    if name == "predict":
        from referseg.predict import predict

        return predict
    raise AttributeError(f"module 'referseg' has no attribute {name!r}")
