"""Check every page of the built book in headless Chromium, and screenshot two of them.

``python -m referseg.screenshot _build/html`` opens each page of the book offline and checks,
after MathJax has run, that it shows

- no raw TeX: no ``\\(``, ``\\)``, ``\\[``, ``\\]`` or ``$$`` in its visible text outside code,
  and no MathJax error;
- no wide code: no code block or text output wider than its column (it would scroll);
- no broken image: every ``<img>`` loads;
- no console error: no JavaScript exception, ``console.error`` or failed load;
- no outside request: every URL the page loads is a ``file://`` URL under the build folder
  (or ``data:``); other hosts are made unreachable, so that nothing leaves the machine.

It prints one row per page and exits 1 when any check fails (``--ignore`` reports a check
without failing on it). It also keeps two pictures in ``_build/screenshots/``: the evaluation
chapter, started at its table of results (the picture fails when the page has no table
naming "overall IoU" or looks blank), and the method chapter, whose equations show MathJax at
work. It is how CI sees that the book renders, not just that it builds.

Chromium is driven through the DevTools protocol over ``--remote-debugging-pipe`` (file
descriptors 3 and 4, NUL-terminated JSON messages): no Python package beyond the standard
library, and nothing listens on a port.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np

from referseg.data.images import read_image

PAGES = ("book/notebooks/07_evaluation.html", "book/intro.html")  # first one that exists
SECOND_PAGES = ("book/method.html", "book/intro.html")  # the other picture kept: first that exists
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
REQUIRED_TEXT = "overall IoU"
WINDOW = (1280, 2400)
MIN_COLOURS = 32  # a rendered page has anti-aliased text, a navigation bar and table rules
MIN_INKED_ROWS = 0.10  # fraction of the content column's pixel rows that are not plain white
CHECKS = ("raw_tex", "wide_code", "broken_images", "console_errors", "outside_requests")
SKIPPED_DIRS = ("_static", "_sources", "_images", "_panels_static")
INSIDE_SCHEMES = ("data:", "blob:", "about:")
TEX_DELIMITERS = ("\\(", "\\)", "\\[", "\\]", "$$")

# Runs in the page once it has loaded: waits until MathJax has typeset it, fonts are in and
# every image (lazy ones too) has loaded or failed.
SETTLE_SCRIPT = r"""
(async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) { await MathJax.startup.promise; }
  await document.fonts.ready;
  await Promise.all([...document.images].map(img => {
    img.loading = "eager";
    if (img.complete) return null;
    return new Promise(done => {
      img.addEventListener("load", done); img.addEventListener("error", done); setTimeout(done, 15000);
    });
  }));
  await new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)));
})()
"""

# Then measures: broken images, code wider than its column and TeX left as text. Folded content
# (hidden cells, solutions) is unfolded first, since a reader can unfold it too.
MEASURE_SCRIPT = r"""
(async () => {
  const broken = [...document.images].filter(img => !img.complete || img.naturalWidth === 0)
                                     .map(img => img.getAttribute("src") || img.currentSrc);
  document.querySelectorAll("details").forEach(d => { d.open = true; });
  document.querySelectorAll(".toggle-hidden").forEach(e => e.classList.remove("toggle-hidden"));
  await new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)));
  const blocks = new Map();
  for (const el of document.querySelectorAll("pre, div.highlight")) {
    if (el.clientWidth === 0 || el.scrollWidth <= el.clientWidth + 1) continue;
    const block = el.closest("div.highlight") || el;
    const widest = Math.max(...block.textContent.split("\n").map(line => line.length));
    blocks.set(block, {chars: widest, overflow_px: el.scrollWidth - el.clientWidth});
  }
  const skip = "script, style, pre, code, kbd, samp, textarea, mjx-container, .MathJax";
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const tex = [];
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const parent = node.parentElement;
    if (!parent || parent.closest(skip) || parent.getClientRects().length === 0) continue;
    const text = node.textContent;
    for (const delimiter of DELIMITERS) {
      const at = text.indexOf(delimiter);
      if (at >= 0) { tex.push(text.slice(Math.max(0, at - 30), at + 30).trim()); break; }
    }
  }
  for (const error of document.querySelectorAll("mjx-merror")) {
    tex.push("MathJax error: " + (error.getAttribute("data-mjx-error") || error.textContent));
  }
  return {raw_tex: tex, wide_code: [...blocks.values()], broken_images: broken};
})()
""".replace("DELIMITERS", json.dumps(TEX_DELIMITERS))


def find_chromium() -> str | None:
    """Path of a Chromium or Chrome executable, or None when none is installed."""
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def default_page(html_dir: Path, pages: tuple[str, ...] = PAGES) -> Path:
    """The evaluation chapter when it was built, else the introduction."""
    for page in pages:
        if (html_dir / page).exists():
            return html_dir / page
    raise FileNotFoundError(f"none of {', '.join(pages)} in {html_dir}; build the book first (make book)")


def book_pages(html_dir: Path) -> list[Path]:
    """Every HTML page of the built book (not the theme's assets, not redirects such as index.html)."""
    pages = []
    for path in sorted(html_dir.rglob("*.html")):
        if path.relative_to(html_dir).parts[0] in SKIPPED_DIRS or path.name.startswith(".screenshot-"):
            continue
        head = path.read_text(encoding="utf-8", errors="replace")[:2000].lower()
        if 'http-equiv="refresh"' in head:
            continue
        pages.append(path)
    return pages


class DevToolsError(RuntimeError):
    """Chromium answered a DevTools command with an error, or not at all."""


class Chromium:
    """A headless Chromium driven over ``--remote-debugging-pipe``.

    Commands go to its file descriptor 3 and answers and events come from its descriptor 4,
    each a JSON object ending in NUL. A reader thread files answers by id and events in a list.
    Every host name resolves to nothing, so a page cannot reach the network.
    """

    def __init__(self, chromium: str | None = None, window: tuple[int, int] = WINDOW, timeout: float = 60):
        self.executable = chromium or find_chromium()
        if self.executable is None:
            raise FileNotFoundError(f"no Chromium found (looked for {', '.join(CHROMIUM_NAMES)}); "
                                    "install it, e.g. apt-get install -y chromium")
        self.window, self.timeout = window, timeout
        self._profile = tempfile.TemporaryDirectory(prefix="referseg-chromium-")
        commands_read, self._commands = os.pipe()
        self._answers, answers_write = os.pipe()

        def child_fds() -> None:  # the browser's ends of the pipes become its descriptors 3 and 4
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (commands_read, answers_write)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        command = [self.executable, "--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
                   "--disable-quic", "--no-first-run", "--no-default-browser-check",
                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                   "--disable-extensions", "--hide-scrollbars", "--mute-audio",
                   "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",
                   "--allow-file-access-from-files", f"--user-data-dir={self._profile.name}",
                   f"--window-size={window[0]},{window[1]}", "about:blank"]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, pass_fds=(3, 4), preexec_fn=child_fds)
        os.close(commands_read)
        os.close(answers_write)
        self._next_id, self._lock, self._arrived = 0, threading.Lock(), threading.Condition()
        self._answered: dict[int, dict] = {}
        self._targets: dict[str, str] = {}
        self.events: list[dict] = []
        self._closed, self.stderr_tail = False, ""
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._drain_stderr, daemon=True).start()

    def _drain_stderr(self) -> None:
        with self.process.stderr as stream:
            for line in stream:
                self.stderr_tail = (self.stderr_tail + line.decode(errors="replace"))[-4000:]

    def _read(self) -> None:
        buffer = b""
        while chunk := os.read(self._answers, 1 << 16):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            with self._arrived:
                for raw in messages:
                    message = json.loads(raw)
                    if "id" in message:
                        self._answered[message["id"]] = message
                    else:
                        self.events.append(message)
                self._arrived.notify_all()
        os.close(self._answers)  # Chromium exited
        with self._arrived:
            self._closed = True
            self._arrived.notify_all()

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float | None = None) -> dict:
        """Send one DevTools command and wait for its result."""
        with self._lock:
            self._next_id += 1
            ident = self._next_id
            message = {"id": ident, "method": method, "params": params or {}}
            if session:
                message["sessionId"] = session
            data = json.dumps(message).encode() + b"\0"
            while data:
                data = data[os.write(self._commands, data):]
        deadline = time.monotonic() + (timeout or self.timeout)
        with self._arrived:
            while ident not in self._answered:
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    raise DevToolsError(f"no answer to {method} from Chromium "
                                        f"({'it exited' if self._closed else 'timed out'}):\n{self.stderr_tail}")
                self._arrived.wait(left)
            answer = self._answered.pop(ident)
        if "error" in answer:
            raise DevToolsError(f"{method}: {answer['error'].get('message')}")
        return answer.get("result", {})

    def wait_for(self, method: str, session: str, timeout: float | None = None) -> dict:
        """The first event ``method`` of ``session`` (waiting for it when it has not arrived)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        with self._arrived:
            while True:
                for event in self.events:
                    if event.get("method") == method and event.get("sessionId") == session:
                        return event
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    raise DevToolsError(f"no {method} from Chromium within {timeout or self.timeout} s")
                self._arrived.wait(left)

    def session_events(self, session: str) -> list[dict]:
        with self._arrived:
            return [event for event in self.events if event.get("sessionId") == session]

    def open(self, url: str) -> str:
        """A new tab showing ``url`` once loaded and settled (MathJax, fonts, images); returns its
        session id, the ``session`` of later commands."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self._targets[session] = target
        for domain in ("Page", "Runtime", "Network", "Log"):
            self.send(f"{domain}.enable", session=session)
        self.send("Emulation.setDeviceMetricsOverride", {"width": self.window[0], "height": self.window[1],
                                                         "deviceScaleFactor": 1, "mobile": False}, session)
        self.send("Page.navigate", {"url": url}, session)
        self.wait_for("Page.loadEventFired", session)
        self.evaluate(session, SETTLE_SCRIPT)
        return session

    def evaluate(self, session: str, expression: str) -> Any:
        """The value of a JavaScript expression in the page (awaited when it is a promise)."""
        result = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                "returnByValue": True}, session)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise DevToolsError(f"script failed: {details.get('exception', {}).get('description') or details}")
        return result["result"].get("value")

    def screenshot(self, session: str, png: Path) -> Path:
        data = self.send("Page.captureScreenshot", {"format": "png"}, session)["data"]
        png.parent.mkdir(parents=True, exist_ok=True)
        png.write_bytes(base64.b64decode(data))
        return png

    def close_tab(self, session: str) -> None:
        self.send("Target.closeTarget", {"targetId": self._targets.pop(session)})

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.send("Browser.close", timeout=10)
            except DevToolsError:
                pass
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        os.close(self._commands)
        self._profile.cleanup()

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class PageReport:
    """What the checks found on one page: one list of findings per check (empty: it passed)."""

    page: str
    raw_tex: list[str] = field(default_factory=list)
    wide_code: list[str] = field(default_factory=list)
    broken_images: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    outside_requests: list[str] = field(default_factory=list)

    def failed(self, ignore: tuple[str, ...] = ()) -> list[str]:
        return [check for check in CHECKS if check not in ignore and getattr(self, check)]


def is_inside(url: str, html_dir: Path) -> bool:
    """Whether loading ``url`` stays in the build folder (``data:`` and the like included)."""
    root = html_dir.resolve().as_uri().rstrip("/") + "/"
    return url.startswith(INSIDE_SCHEMES) or url.split("#")[0].startswith(root)


def page_findings(events: list[dict], measured: dict, html_dir: Path, page: str) -> PageReport:
    """Sort a page's DevTools events and in-page measurements into the five checks."""
    report = PageReport(page)
    report.raw_tex = list(measured["raw_tex"])
    report.wide_code = [f"{block['chars']} chars (+{block['overflow_px']} px)" for block in measured["wide_code"]]
    report.broken_images = list(measured["broken_images"])
    outside = set()
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Network.requestWillBeSent":
            url = params["request"]["url"]
            if not is_inside(url, html_dir) and url not in outside:
                outside.add(url)
                report.outside_requests.append(url)
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            report.console_errors.append(details.get("exception", {}).get("description") or details.get("text", ""))
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            report.console_errors.append(" ".join(str(arg.get("value", arg.get("description", "")))
                                                  for arg in params.get("args", [])))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            entry = params["entry"]
            if entry.get("url") and not is_inside(entry["url"], html_dir):
                continue  # an outside request, reported as such
            report.console_errors.append(f"{entry.get('text', '')} {entry.get('url', '')}".strip())
    return report


HIDE_BEFORE_SECTION = """(() => {
  const style = document.createElement("style");
  style.textContent = '*:has(~ section[id="SECTION"]) { display: none !important; }';
  document.head.appendChild(style);
  window.scrollTo(0, 0);
  return new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)));
})()"""


def shoot(browser: Chromium, session: str, png: Path, section: str = "") -> Path:
    """Picture of the open page; with ``section`` (an element id), what precedes that section is
    hidden first, so that the picture starts at it (headless screenshots ignore ``#anchor``)."""
    png.unlink(missing_ok=True)
    if section:
        browser.evaluate(session, HIDE_BEFORE_SECTION.replace("SECTION", section.replace('"', "")))
    return browser.screenshot(session, png)


def check_page(browser: Chromium, page: Path, html_dir: Path) -> PageReport:
    """Open one page in a new tab and run the five checks on it."""
    session = browser.open(page.resolve().as_uri())
    try:
        measured = browser.evaluate(session, MEASURE_SCRIPT)
        events = browser.session_events(session)
    finally:
        browser.close_tab(session)
    return page_findings(events, measured, html_dir, page.relative_to(html_dir).as_posix())


def picture(browser: Chromium, page: Path, png: Path, section: str = "") -> Path:
    """A picture of ``page`` as a reader first sees it (in a tab of its own: the checks unfold)."""
    session = browser.open(page.resolve().as_uri())
    try:
        return shoot(browser, session, png, section)
    finally:
        browser.close_tab(session)


def check_book(html_dir: Path, pages: list[Path] | None = None, shots: dict[Path, tuple[Path, str]] | None = None,
               chromium: str | None = None, window: tuple[int, int] = WINDOW) -> list[PageReport]:
    """Run the five checks on every page (default: all of ``html_dir``), taking the pictures ``shots``."""
    pages = pages if pages is not None else book_pages(html_dir)
    with Chromium(chromium, window) as browser:
        for page, (png, section) in (shots or {}).items():
            picture(browser, page, png, section)
        return [check_page(browser, page, html_dir) for page in pages]


def results_table(reports: list[PageReport], ignore: tuple[str, ...] = ()) -> str:
    """One row per page, one column per check (the number of findings; 0 is a pass)."""
    names = ["page", "raw TeX", "wide code", "broken images", "console errors", "outside requests"]
    width = max([len(names[0]), *(len(r.page) for r in reports)])
    lines = [f"{names[0]:<{width}}  " + "  ".join(names[1:]), "-" * (width + 2 + len("  ".join(names[1:])))]
    for report in reports:
        cells = []
        for check, name in zip(CHECKS, names[1:], strict=True):
            count = len(getattr(report, check))
            mark = "" if not count else (" (ignored)" if check in ignore else " FAIL")
            cells.append(f"{count}{mark}".ljust(len(name)))
        lines.append(f"{report.page:<{width}}  " + "  ".join(cells).rstrip())
    return "\n".join(lines)


def findings_text(reports: list[PageReport], limit: int = 5) -> str:
    """The findings behind the failures of the table, a few per page and check."""
    lines = []
    for report in reports:
        for check in CHECKS:
            found = getattr(report, check)
            for item in found[:limit]:
                lines.append(f"{report.page}: {check}: {item}")
            if len(found) > limit:
                lines.append(f"{report.page}: {check}: ... and {len(found) - limit} more")
    return "\n".join(lines)


def take_screenshot(page: Path, png: Path, window: tuple[int, int] = WINDOW, chromium: str | None = None,
                    timeout: float = 120, section: str = "") -> Path:
    """Render ``page`` offline in headless Chromium into ``png`` (window width x height).

    With ``section`` (an element id), what precedes that section on the page is hidden, so that
    the picture starts at it.
    """
    png.unlink(missing_ok=True)
    with Chromium(chromium, window, timeout) as browser:
        return picture(browser, page, png, section)


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


def check_screenshot(page: Path, png: Path, text: str | None = REQUIRED_TEXT) -> list[str]:
    """Problems with a rendered page: no table naming ``text`` (when given), or a blank-looking picture."""
    problems = []
    if text and not table_with(page.read_text(encoding="utf-8"), text):
        problems.append(f"{page} has no <table> mentioning {text!r}")
    stats = image_stats(png)
    if stats["colours"] < MIN_COLOURS or stats["inked_rows"] < MIN_INKED_ROWS:
        problems.append(f"{png} looks blank: {stats['colours']} colours, "
                        f"{stats['inked_rows']:.0%} of rows not white")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m referseg.screenshot", description=__doc__.splitlines()[0])
    parser.add_argument("html_dir", type=Path, help="the built book, e.g. _build/html")
    parser.add_argument("--page", action="append", default=None,
                        help="check only this page, relative to html_dir (repeatable; default: every page)")
    parser.add_argument("--out", type=Path, default=None,
                        help="PNG of the evaluation page (default: _build/screenshots/<page>.png)")
    parser.add_argument("--text", default=REQUIRED_TEXT, help="text a table of the evaluation page must contain")
    parser.add_argument("--ignore", action="append", default=[], choices=CHECKS,
                        help="report this check without failing on it (repeatable)")
    args = parser.parse_args(argv)
    html_dir = args.html_dir
    pages = [html_dir / page for page in args.page] if args.page else book_pages(html_dir)
    missing = [page for page in pages if not page.exists()]
    if not pages or missing:
        print(f"error: {', '.join(map(str, missing)) or 'no pages'} in {html_dir}; build the book first (make book)",
              file=sys.stderr)
        return 1
    main_page = default_page(html_dir)
    shot_dir = html_dir.parent / "screenshots"
    shots = {main_page: (args.out or shot_dir / f"{main_page.stem}.png",
                         table_section(main_page.read_text(encoding="utf-8"), args.text) or "")}
    second = next((html_dir / p for p in SECOND_PAGES if (html_dir / p).exists() and html_dir / p != main_page), None)
    if second is not None:
        shots[second] = (shot_dir / f"{second.stem}.png", "")
    shots = {page: shot for page, shot in shots.items() if page in pages}

    start = time.perf_counter()
    reports = check_book(html_dir, pages, shots)
    ignore = tuple(args.ignore)
    print(results_table(reports, ignore))
    print(f"{len(reports)} pages checked in {time.perf_counter() - start:.1f} s")
    details = findings_text(reports)
    if details:
        print("\n" + details)
    problems = [f"{r.page}: {', '.join(r.failed(ignore))}" for r in reports if r.failed(ignore)]
    for page, (png, _) in shots.items():
        stats = image_stats(png)
        print(f"{png}: {stats['width']}x{stats['height']}, {stats['colours']} colours, "
              f"{stats['inked_rows']:.0%} of rows not white")
        problems += check_screenshot(page, png, args.text if page == main_page else None)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
