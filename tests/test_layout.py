"""The package's shape: its import order, module sizes, one image decoder, and notebooks that reuse
the package's functions instead of defining their own copies and whose lines fit the book."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "referseg"
IMPORT_GRAPH = Path(__file__).resolve().parents[1].parent / "shared" / "hooks" / "import_graph.py"
IMAGE_DECODER = PACKAGE / "data" / "images.py"
MAX_LINES = {"referseg/train.py": 300, "referseg/ablations.py": 350, "referseg/model/segmenter.py": 250}
# Calls that decode an image file: only referseg/data/images.py may make them.
DECODER_CALLS = {("cv2", "imread"), ("Image", "open"), ("PIL.Image", "open")}
DECODER_IMPORTS = {("cv2", "imread"), ("PIL.Image", "open")}


def package_sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def notebook_sources() -> list[Path]:
    return sorted((ROOT / "notebooks").glob("*.py"))


def parse(path: Path) -> ast.Module:
    try:
        return ast.parse(path.read_text(), str(path))
    except SyntaxError as error:
        pytest.fail(f"{path.relative_to(ROOT)} is not valid Python: {error}")


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def module_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """The statements of a module body, including those inside module-level if/try/with/for blocks
    (a notebook cell is module level too), but not those inside functions or classes."""
    for node in body:
        yield node
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        for field in ("body", "orelse", "finalbody"):
            yield from module_level(getattr(node, field, []) or [])
        for handler in getattr(node, "handlers", []) or []:
            yield from module_level(handler.body)
        for case in getattr(node, "cases", []) or []:  # match statements
            yield from module_level(case.body)


def dotted(node: ast.expr) -> str | None:
    """``a.b.c`` of a Name/Attribute chain, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


# --- (1) the import order of DESIGN.md ---------------------------------------------------------------


def test_imports_follow_the_design_order_without_circles():
    if not IMPORT_GRAPH.is_file():
        pytest.skip(f"the import graph script {IMPORT_GRAPH} is absent (../shared is not checked out)")
    result = subprocess.run([sys.executable, str(IMPORT_GRAPH), str(ROOT)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, f"import graph:\n{result.stdout}{result.stderr}"


# --- (2) module sizes -------------------------------------------------------------------------------


@pytest.mark.parametrize("module, limit", sorted(MAX_LINES.items()))
def test_modules_stay_within_their_size(module, limit):
    lines = len((ROOT / module).read_text().splitlines())
    assert lines <= limit, f"{module} has {lines} lines; keep it at most {limit} (move a part to its own module)"


# --- (3) one image decoder ----------------------------------------------------------------------------


def test_the_image_decoder_is_defined_once():
    assert "read_image" in {node.name for node in module_level(parse(IMAGE_DECODER).body)
                            if isinstance(node, ast.FunctionDef)}, "referseg/data/images.py defines read_image"
    others = [f"{relative(path)}:{node.lineno}" for path in package_sources() if path != IMAGE_DECODER
              for node in ast.walk(parse(path))
              if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "read_image"]
    assert not others, f"read_image is defined outside referseg/data/images.py: {', '.join(others)}"


def test_only_the_image_decoder_opens_image_files():
    found: dict[tuple[str, int], str] = {}
    for path in package_sources():
        if path == IMAGE_DECODER:
            continue
        for node in ast.walk(parse(path)):
            if isinstance(node, ast.Attribute):
                base = dotted(node.value)
                if (base, node.attr) in DECODER_CALLS:
                    found[relative(path), node.lineno] = f"{base}.{node.attr}"
            elif isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    if (node.module, alias.name) in DECODER_IMPORTS:
                        found[relative(path), node.lineno] = f"from {node.module} import {alias.name}"
        # what ast cannot see through an alias (``import cv2 as cv``) the text still shows
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for name in ("imread(", "Image.open("):
                if name in code:
                    found.setdefault((relative(path), number), name.rstrip("("))
    assert not found, ("images are decoded outside referseg/data/images.py (use its read_image or image_size): "
                       + "; ".join(f"{where}:{line} {what}" for (where, line), what in sorted(found.items())))


# --- (4) notebooks reuse the package ------------------------------------------------------------------


def package_names() -> dict[str, str]:
    """``{name: module}`` of every top-level function and class of the package."""
    names: dict[str, str] = {}
    for path in package_sources():
        for node in module_level(parse(path).body):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.setdefault(node.name, relative(path))
    return names


def test_package_names_are_collected():
    names = package_names()
    assert names["read_image"] == "referseg/data/images.py" and names["Run"] == "referseg/runs.py"
    assert "__init__" not in names  # methods are not module level


@pytest.mark.parametrize("notebook", notebook_sources(), ids=lambda path: path.name)
def test_notebooks_do_not_redefine_package_functions(notebook):
    names = package_names()
    copies = [f"{node.name} (line {node.lineno}; the package's is in {names[node.name]})"
              for node in module_level(parse(notebook).body)
              if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in names]
    assert not copies, (f"{relative(notebook)} defines functions the package already has; import them instead: "
                        + ", ".join(copies))


# --- (5) notebooks that fit the book's code column ----------------------------------------------

NOTEBOOK_LINE = 88  # characters: what a code block of the book holds at a 1280 px window


@pytest.mark.parametrize("notebook", notebook_sources(), ids=lambda path: path.name)
def test_notebook_lines_fit_the_books_code_column(notebook):
    wide = [f"line {number} ({len(line)} characters)"
            for number, line in enumerate(notebook.read_text(encoding="utf-8").splitlines(), 1)
            if len(line) > NOTEBOOK_LINE]
    assert not wide, (f"{relative(notebook)} has lines longer than {NOTEBOOK_LINE} characters, which "
                      f"scroll in the book (wrap them by hand): {', '.join(wide)}")
