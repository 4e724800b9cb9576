"""referseg: a reproducible study of Hu, Rohrbach & Darrell (ECCV 2016).

Segmentation from natural language expressions: an image and a referring
expression in, the pixel mask of the region it names out.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Keep `import referseg` (and `referseg --help`) light: torch loads on first use.
    if name == "predict":
        from referseg.predict import predict

        return predict
    raise AttributeError(f"module 'referseg' has no attribute {name!r}")
