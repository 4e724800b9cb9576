"""Screenshot a page of the built book with headless Chromium and check that it shows its table.

``python -m referseg.screenshot _build/html`` shoots the evaluation chapter (the intro page
until that chapter exists) and fails unless the HTML has a table naming "overall IoU" and
the picture is not blank. It is how CI sees that the book renders, not just that it builds.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np

from referseg.data.images import read_image

PAGES = ("book/notebooks/07_evaluation.html", "book/intro.html")  # first one that exists
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
REQUIRED_TEXT = "overall IoU"
WINDOW = (1280, 2400)
MIN_COLOURS = 32  # a rendered page has anti-aliased text, a navigation bar and table rules
MIN_INKED_ROWS = 0.10  # fraction of the content column's pixel rows that are not plain white


def find_chromium() -> str | None:
    """Path of a Chromium or Chrome executable, or None when none is installed."""
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def default_page(html_dir: Path) -> Path:
    """The evaluation chapter when it was built, else the introduction."""
    for page in PAGES:
        if (html_dir / page).exists():
            return html_dir / page
    raise FileNotFoundError(f"none of {', '.join(PAGES)} in {html_dir}; build the book first (make book)")


def take_screenshot(page: Path, png: Path, window: tuple[int, int] = WINDOW, chromium: str | None = None,
                    timeout: float = 120, section: str = "") -> Path:
    """Render ``page`` offline in headless Chromium into ``png`` (window width x height).

    With ``section`` (an element id), what precedes that section on the page is hidden, so that
    the picture starts at it: headless screenshots ignore ``#anchor`` scrolling.
    """
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError(f"no Chromium found (looked for {', '.join(CHROMIUM_NAMES)}); "
                                "install it, e.g. apt-get install -y chromium")
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    shown = page
    if section:  # a copy beside the page, so that its relative links to styles still resolve
        shown = page.with_name(f".screenshot-{page.name}")
        style = f'<style>*:has(~ section[id="{section}"]) {{ display: none !important; }}</style>'
        shown.write_text(page.read_text(encoding="utf-8").replace("</head>", style + "</head>", 1),
                         encoding="utf-8")
    try:
        with tempfile.TemporaryDirectory(prefix="referseg-chromium-") as profile_dir:
            command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                       "--no-first-run", "--disable-background-networking", "--disable-component-update",
                       "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile_dir}",
                       f"--screenshot={png.resolve()}", f"--window-size={window[0]},{window[1]}",
                       shown.resolve().as_uri()]
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    finally:
        if shown != page:
            shown.unlink(missing_ok=True)
    if not png.exists():
        raise RuntimeError(f"Chromium wrote no screenshot of {page} (exit {result.returncode}):\n"
                           f"{result.stderr[-2000:]}")
    return png


class _TableText(HTMLParser):
    """Collects the text of every <table> of a page, and the id of the last section opened before it."""

    def __init__(self) -> None:
        super().__init__()
        self.depth, self.tables, self.sections, self.section = 0, [], [], ""

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "section":
            self.section = dict(attrs).get("id") or self.section
        if tag == "table":
            self.depth += 1
            if self.depth == 1:
                self.tables.append("")
                self.sections.append(self.section)

    def handle_endtag(self, tag: str) -> None:
        if tag == "table" and self.depth:
            self.depth -= 1

    def handle_data(self, data: str) -> None:
        if self.depth:
            self.tables[-1] += data + " "


def table_section(html: str, text: str = REQUIRED_TEXT) -> str | None:
    """The id of the section holding the first table that mentions ``text`` ("" when the page
    has no sections), or None when no table does; case, underscores and spacing are ignored."""
    def norm(s: str) -> str:
        return " ".join(s.replace("_", " ").lower().split())

    parser = _TableText()
    parser.feed(html)
    return next((sec for table, sec in zip(parser.tables, parser.sections, strict=True) if norm(text) in norm(table)), None)


def table_with(html: str, text: str = REQUIRED_TEXT) -> bool:
    """Whether a table of the page mentions ``text``."""
    return table_section(html, text) is not None


def image_stats(png: Path) -> dict[str, float]:
    """Distinct colours, and the fraction of pixel rows of the content column that are not plain white."""
    pixels = read_image(png)
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    content = pixels[:, pixels.shape[1] // 4:]  # right of the navigation sidebar
    inked = float((content < 245).any(axis=(1, 2)).mean())
    return {"width": pixels.shape[1], "height": pixels.shape[0], "colours": colours, "inked_rows": inked}


def check_screenshot(page: Path, png: Path, text: str = REQUIRED_TEXT) -> list[str]:
    """Problems with a rendered page: no table naming ``text``, or a blank-looking picture."""
    problems = []
    if not table_with(page.read_text(encoding="utf-8"), text):
        problems.append(f"{page} has no <table> mentioning {text!r}")
    stats = image_stats(png)
    if stats["colours"] < MIN_COLOURS or stats["inked_rows"] < MIN_INKED_ROWS:
        problems.append(f"{png} looks blank: {stats['colours']} colours, "
                        f"{stats['inked_rows']:.0%} of rows not white")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m referseg.screenshot", description=__doc__.splitlines()[0])
    parser.add_argument("html_dir", type=Path, help="the built book, e.g. _build/html")
    parser.add_argument("--page", default=None, help=f"page relative to html_dir (default: first of {PAGES})")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: _build/screenshots/<page>.png)")
    parser.add_argument("--text", default=REQUIRED_TEXT, help="text a table of the page must contain")
    args = parser.parse_args(argv)
    page = args.html_dir / args.page if args.page else default_page(args.html_dir)
    png = args.out or args.html_dir.parent / "screenshots" / f"{page.stem}.png"
    # start the picture at the table's section, so that it shows the table
    take_screenshot(page, png, section=table_section(page.read_text(encoding="utf-8"), args.text) or "")
    stats = image_stats(png)
    print(f"{png}: {stats['width']}x{stats['height']}, {stats['colours']} colours, "
          f"{stats['inked_rows']:.0%} of rows not white")
    problems = check_screenshot(page, png, args.text)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
