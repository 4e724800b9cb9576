"""The book machinery: parameters cells, validation, papermill runs, skipping, failures,
the student edition, the Jupyter Book build, its offline assets, its launch buttons and the
checks of every page in headless Chromium.

Every run happens in a temporary copy of the book's files (``build_book(root=...)``), so
the tests never touch a developer's ``book/notebooks``, ``runs`` or ``_build``.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
from PIL import Image

from referseg.book import (
    BUILD_RECORD,
    HIDE_TAG,
    INJECTED_TAG,
    PARAMETERS,
    PLACEHOLDERS,
    build_book,
    build_html_book,
    hide_injected_parameters,
    lock_summary,
    lock_text,
    notebook_needs,
    notebook_sources,
    package_hash,
    parameter_names,
    read_notebook,
    toc_notebooks,
)
from referseg.bookext import REPOSITORY_ENV, repository_options, unique_scripts
from referseg.screenshot import (
    CHECKS,
    book_pages,
    check_book,
    check_screenshot,
    default_page,
    find_chromium,
    findings_text,
    results_table,
    table_section,
    table_with,
)
from referseg.screenshot import main as screenshot_main

REPO = Path(__file__).resolve().parents[1]
PARAMETERS_CELL = '''# %% tags=["parameters"]
profile = "cpu"
run_dir = "runs/cpu"
device = "auto"
seed = 0
overrides = {}
'''
TINY_NOTEBOOK = '''# %% [markdown]
# # A tiny chapter

''' + PARAMETERS_CELL + '''
# %%
from pathlib import Path

from referseg.config import get_profile

config = get_profile(profile, **overrides)
Path(run_dir, "tiny.txt").write_text(f"{config.name} {seed}")
print(config.grid)

# %% [markdown]
# 1. How many cells does the grid have?

# %% tags=["solution", "hide-cell"]
answer_to_exercise_one = config.grid ** 2

# %% [markdown] tags=["solution"]
# ```{admonition} Solution
# :class: dropdown
#
# The square of the side of the grid.
# ```
'''
FAILING_NOTEBOOK = '''# %% [markdown]
# # A chapter that fails

''' + PARAMETERS_CELL + '''
# %%
value = 1

# %%
raise ValueError("deliberate failure for the test")

# %%
never_reached = True
'''


def with_needs(source: str, needs: list[str]) -> str:
    """A jupytext source with the header line ``referseg: {needs: [...]}``."""
    header = ("# ---\n# jupyter:\n#   referseg:\n#     needs: [" + ", ".join(needs) + "]\n# ---\n\n")
    return header + source


def sleeping(seconds: float, name: str) -> str:
    """A chapter that writes ``<run_dir>/<name>.txt`` after sleeping ``seconds``."""
    return ("# %% [markdown]\n# # A slow chapter\n\n" + PARAMETERS_CELL
            + f"\n# %%\nimport time\nfrom pathlib import Path\n\ntime.sleep({seconds})\n"
              f"Path(run_dir, {name!r} + '.txt').write_text('done')\n")


def make_project(dest: Path, notebooks: dict[str, str] | None = None) -> Path:
    """The book's config and prose copied into ``dest`` with the repository's notebooks and TOC,
    or with the given ``{name: jupytext source}`` notebooks and a TOC listing exactly those.
    The package's sources come too: the method chapter includes their code."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy(REPO / name, dest / name)
    (dest / "book").mkdir()
    for path in [*(REPO / "book").glob("*.md"), REPO / "book" / "references.bib"]:
        shutil.copy(path, dest / "book" / path.name)
    shutil.copytree(REPO / "book" / "_static", dest / "book" / "_static")
    shutil.copytree(REPO / "referseg", dest / "referseg", ignore=shutil.ignore_patterns("__pycache__"))
    (dest / "notebooks").mkdir()
    if notebooks is None:
        for path in notebook_sources(REPO):
            shutil.copy(path, dest / "notebooks" / path.name)
        return dest
    for name, source in notebooks.items():
        (dest / "notebooks" / f"{name}.py").write_text(source)
    chapters = "".join(f"  - file: book/notebooks/{name}\n" for name in sorted(notebooks))
    (dest / "_toc.yml").write_text(f"format: jb-book\nroot: book/intro\nchapters:\n{chapters}")
    return dest


def run_book(**kwargs) -> tuple[int, str]:
    """build_book's return code and what it printed on stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = build_book(**kwargs)
    return code, out.getvalue()


def mtimes(root: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (root / "book" / "notebooks").glob("*.ipynb")}


# ---------------------------------------------------------------------------- sources (fast)


def test_every_notebook_has_a_parameters_cell():
    sources = notebook_sources(REPO)
    assert sources, "no notebooks/NN_*.py found"
    for path in sources:
        names = parameter_names(read_notebook(path))
        assert names is not None, f"{path.name} has no cell tagged 'parameters'"
        assert set(PARAMETERS) <= names, f"{path.name}: parameters cell lacks {set(PARAMETERS) - names}"


def test_needs_default_to_every_earlier_notebook_and_name_only_earlier_ones(tmp_path):
    sources = {tmp_path / f"{name}.py": None for name in ("01_a", "02_b", "03_c")}
    for path, source in zip(sources, (TINY_NOTEBOOK, with_needs(TINY_NOTEBOOK, []), TINY_NOTEBOOK), strict=True):
        path.write_text(source)
    sources = {path: read_notebook(path) for path in sources}
    assert notebook_needs(sources) == {"01_a": (), "02_b": (), "03_c": ("01_a", "02_b")}
    later = tmp_path / "02_b.py"
    later.write_text(with_needs(TINY_NOTEBOOK, ["03_c"]))
    with pytest.raises(ValueError, match=r"02_b\.py: referseg\.needs names 03_c, which is not an earlier notebook"):
        notebook_needs({path: read_notebook(path) for path in sources})


def test_the_book_s_notebooks_declare_what_they_need():
    """Every chapter but the appendix names what it reads; the chain the book's numbers flow
    through is declared, and the chapters beside it need no more than the data."""
    needs = notebook_needs({path: read_notebook(path) for path in notebook_sources(REPO)})
    assert needs["01_data"] == () and needs["09_real_text"] == ()
    assert needs["05_stage2_high_resolution"] == ("04_stage1_low_resolution",)
    assert set(needs["99_appendix"]) == set(needs) - {"99_appendix"}


def test_toc_lists_exactly_the_notebooks():
    assert sorted(toc_notebooks(REPO)) == [p.stem for p in notebook_sources(REPO)]


def test_annotated_parameters_are_parameters_too():
    cell = nbformat.v4.new_code_cell(
        "from typing import Optional\n\n"
        'profile: str = "cpu"  # paper, cpu or smoke\n'
        "seeds: Optional[list[int]] = None  # e.g. [0, 1]\n"
        "threads: int  # annotated, never assigned: no parameter\n"
        "seed = 0\n",
        metadata={"tags": ["parameters"]})
    assert parameter_names(nbformat.v4.new_notebook(cells=[cell])) == {"profile", "seeds", "seed"}


def parameters_cell(nb) -> nbformat.NotebookNode:
    return next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))


@pytest.mark.parametrize("path", notebook_sources(REPO), ids=lambda path: path.name)
def test_every_parameter_has_a_type_and_a_meaning(path, tmp_path):
    """Each parameter reads ``name: type = default  # meaning``, on one line, so that
    ``papermill --help-notebook`` lists its name, type, default and meaning."""
    import papermill

    source = parameters_cell(read_notebook(path)).source
    lines = source.splitlines()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue  # typing, for the annotations
        assert isinstance(node, ast.AnnAssign) and node.value is not None, (
            f"{path.name}, line {node.lineno} of the parameters cell: write `name: type = value  # meaning`")
        assert node.lineno == node.end_lineno, f"{path.name}: {node.target.id} spans several lines"
        assert "  # " in lines[node.lineno - 1], f"{path.name}: {node.target.id} has no comment saying what it is"
    notebook = tmp_path / f"{path.stem}.ipynb"
    nbformat.write(read_notebook(path), notebook)
    inferred = papermill.inspect_notebook(str(notebook))
    assert set(inferred) == parameter_names(read_notebook(path))
    for name, parameter in inferred.items():
        assert parameter["inferred_type_name"] not in ("None", ""), f"{path.name}: {name} has no type for papermill"
        assert parameter["help"], f"{path.name}: {name} has no meaning for papermill"


def test_the_injected_parameters_cell_is_tagged_to_be_removed():
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("profile = 'cpu'", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("profile = 'smoke'", metadata={"tags": [INJECTED_TAG]}),
        nbformat.v4.new_code_cell("print(profile)")])
    assert hide_injected_parameters(nb)
    assert [c.metadata.get("tags", []) for c in nb.cells] == [["parameters"], [INJECTED_TAG, HIDE_TAG], []]
    assert not hide_injected_parameters(nb)  # already tagged


LITERALINCLUDE = re.compile(r"^(?P<fence>`{3,}|:{3,})\{literalinclude\}\s+(?P<file>\S+)\s*\n"
                            r"(?P<options>(?:[ \t]*:[\w-]+:.*\n)*)", re.MULTILINE)


def included_objects() -> list[tuple[str, Path, str, bool]]:
    """``(page, file, object, dedent)`` of every ``literalinclude`` with ``:pyobject:`` in book/*.md."""
    found = []
    for page in sorted((REPO / "book").glob("*.md")):
        for match in LITERALINCLUDE.finditer(page.read_text()):
            options = dict(re.findall(r"^[ \t]*:([\w-]+):[ \t]*(.*)$", match["options"], re.MULTILINE))
            if "pyobject" in options:
                found.append((page.name, (page.parent / match["file"]).resolve(), options["pyobject"].strip(),
                              "dedent" in options))
    return found


def object_lines(path: Path, dotted: str) -> list[str] | None:
    """The source lines of a function, class or ``Class.method`` of a module (decorators
    included), or None when the module has no such object."""
    source = path.read_text()
    body, node = ast.parse(source).body, None
    for name in dotted.split("."):
        node = next((n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                     and n.name == name), None)
        if node is None:
            return None
        body = node.body
    start = min([node.lineno] + [d.lineno for d in node.decorator_list])
    return source.splitlines()[start - 1:node.end_lineno]


def test_the_method_chapter_shows_the_package_code():
    objects = {(path.relative_to(REPO).as_posix(), name) for page, path, name, _ in included_objects()
               if page == "method.md"}
    expected = {("referseg/model/segmenter.py", "spatial_channels"), ("referseg/model/segmenter.py", "Segmenter.forward"),
                ("referseg/model/segmenter.py", "bilinear_kernel"), ("referseg/losses.py", "weighted_sigmoid_ce"),
                ("referseg/data/transforms.py", "letterbox_image"), ("referseg/data/transforms.py", "undo_letterbox"),
                ("referseg/data/transforms.py", "prediction_mask"), ("referseg/metrics.py", "overall_iou"),
                ("referseg/metrics.py", "summarize")}
    assert expected <= objects, f"book/method.md does not show {sorted(expected - objects)}"


@pytest.mark.parametrize("page, path, name, dedent", [
    pytest.param(*included, id=f"{included[0]}:{included[2]}") for included in included_objects()])
def test_every_included_object_exists_and_fits_the_code_column(page, path, name, dedent):
    assert path.is_file(), f"book/{page} includes {path}, which does not exist"
    lines = object_lines(path, name)
    assert lines is not None, f"book/{page} includes {name} from {path.name}, which has no such object"
    indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip()) if dedent else 0
    wide = [line.strip() for line in lines if len(line) - indent > 88]
    assert not wide, f"book/{page}: {name} has lines wider than the book's code column (88): {wide}"


# ---------------------------------------------------------------------------- validation (fast)


def test_unknown_profile_is_refused_with_the_valid_ones(tmp_path):
    root = make_project(tmp_path / "project", {"01_tiny": TINY_NOTEBOOK})
    with pytest.raises(ValueError, match="unknown profile 'laptop'; valid profiles: paper, cpu, smoke"):
        build_book(profile="laptop", root=root)
    assert not (root / "book" / "notebooks").exists()


def test_unknown_parameter_is_refused_with_the_valid_ones(tmp_path):
    root = make_project(tmp_path / "project", {"01_tiny": TINY_NOTEBOOK})
    with pytest.raises(ValueError, match=r"unknown profile parameter 'spatial_chanels'; valid parameters: .*spatial_channels"):
        build_book(profile="smoke", overrides={"spatial_chanels": 2}, root=root)
    assert not (root / "book" / "notebooks").exists()


def test_paper_profile_without_referit_stops_before_the_first_notebook(tmp_path):
    root = make_project(tmp_path / "project", {"01_tiny": TINY_NOTEBOOK})
    with pytest.raises(FileNotFoundError) as error:
        build_book(profile="paper", root=root)
    message = str(error.value)
    assert "refclef/instances.json" in message and "data/README.md" in message
    assert not (root / "book" / "notebooks").exists() and not (root / "runs").exists()


def test_notebook_without_a_complete_parameters_cell_is_refused(tmp_path):
    incomplete = TINY_NOTEBOOK.replace("overrides = {}\n", "", 1)
    root = make_project(tmp_path / "project", {"01_tiny": incomplete})
    with pytest.raises(ValueError, match="01_tiny.py: the cell tagged 'parameters' must assign .*missing: overrides"):
        build_book(profile="smoke", root=root)
    assert not (root / "book" / "notebooks").exists()


def test_toc_that_disagrees_with_the_notebooks_is_refused(tmp_path):
    root = make_project(tmp_path / "project", {"01_tiny": TINY_NOTEBOOK})
    (root / "notebooks" / "50_extra.py").write_text(FAILING_NOTEBOOK)
    with pytest.raises(ValueError, match="_toc.yml lists the notebooks"):
        build_book(profile="smoke", root=root)
    assert not (root / "book" / "notebooks").exists()


# ---------------------------------------------------------------------------- execution (slow)


@pytest.mark.slow
def test_a_failing_notebook_stops_the_run_and_the_book_is_not_built(tmp_path, capsys):
    root = make_project(tmp_path / "project", {"00_fail": FAILING_NOTEBOOK, "01_tiny": TINY_NOTEBOOK})
    old_book = root / "_build" / "html" / "index.html"  # a book from an earlier, successful build
    old_book.parent.mkdir(parents=True)
    old_book.write_text("<html>old</html>")
    code = build_book(profile="smoke", root=root)
    err = capsys.readouterr().err
    assert code == 1
    source = read_notebook(root / "notebooks" / "00_fail.py")
    failing = next(i for i, cell in enumerate(source.cells) if "deliberate failure" in cell.source)
    assert f"notebook 00_fail failed in cell {failing} of its source" in err  # not counting papermill's cell
    assert "deliberate failure for the test" in err
    assert not old_book.exists() and "removed as out of date" in err
    assert "notebook 00_fail failed" in (root / "_build" / "STALE.txt").read_text()
    assert "raise ValueError" in err  # the failing cell's first line
    partial = nbformat.read(root / "book" / "notebooks" / "00_fail.ipynb", as_version=4)
    assert partial.metadata.papermill.exception is True
    assert not (root / "book" / "notebooks" / "00_fail.stamp").exists()
    assert not (root / "book" / "notebooks" / "01_tiny.ipynb").exists(), "ran past the failure"
    assert not (root / "_build" / "html").exists(), "built the book after a failure"


def check_skips(root: Path) -> None:
    code, out = run_book(profile="smoke", root=root, build_html=False)
    assert code == 0 and "skipped" not in out
    first = mtimes(root)
    assert set(first) == {"01_tiny.ipynb", "02_tiny.ipynb"}
    assert (root / "runs" / "smoke" / "tiny.txt").read_text() == "smoke 0"

    code, out = run_book(profile="smoke", root=root, build_html=False)
    assert code == 0 and out.count("unchanged, skipped") == 2
    assert mtimes(root) == first

    code, out = run_book(profile="smoke", overrides={"seed": 1}, root=root, build_html=False)
    assert code == 0 and "skipped" not in out
    executed = nbformat.read(root / "book" / "notebooks" / "02_tiny.ipynb", as_version=4)
    assert executed.metadata.papermill.parameters["overrides"] == {"seed": 1}
    assert (root / "runs" / "smoke" / "tiny.txt").read_text() == "smoke 1"

    # an edited first notebook re-runs, and so does the unchanged one after it
    source = root / "notebooks" / "01_tiny.py"
    source.write_text(source.read_text() + "\n# %%\nprint('edited')\n")
    before = mtimes(root)
    code, out = run_book(profile="smoke", overrides={"seed": 1}, root=root, build_html=False)
    assert code == 0 and "skipped" not in out
    assert all(mtimes(root)[name] > before[name] for name in before)

    # force re-runs what is unchanged; so does a deleted run folder
    code, out = run_book(profile="smoke", overrides={"seed": 1}, root=root, build_html=False, force=True)
    assert code == 0 and "skipped" not in out
    shutil.rmtree(root / "runs")
    code, out = run_book(profile="smoke", overrides={"seed": 1}, root=root, build_html=False)
    assert code == 0 and "skipped" not in out


@pytest.mark.slow
def test_unchanged_notebooks_are_skipped_and_changes_rerun_them(tmp_path):
    root = make_project(tmp_path / "project", {"01_tiny": TINY_NOTEBOOK, "02_tiny": TINY_NOTEBOOK})
    package = package_hash()
    try:
        check_skips(root)
    except AssertionError:
        if package_hash() != package:  # another process edited referseg/ meanwhile: re-running was right
            pytest.skip("referseg's sources changed while the test ran, so every notebook re-ran rightly")
        raise


@pytest.mark.slow
def test_notebooks_that_do_not_need_each_other_run_at_once(tmp_path):
    root = make_project(tmp_path / "project", {
        "01_first": sleeping(3, "first"), "02_beside": with_needs(sleeping(3, "beside"), []),
        "03_after": with_needs(sleeping(0, "after"), ["01_first"])})
    code, out = run_book(profile="smoke", root=root, build_html=False, jobs=2)
    assert code == 0, out

    def times(name: str) -> tuple[str, str]:
        papermill = nbformat.read(root / "book" / "notebooks" / f"{name}.ipynb", as_version=4).metadata.papermill
        return papermill.start_time, papermill.end_time

    assert times("02_beside")[0] < times("01_first")[1], "the independent notebook waited"
    assert times("03_after")[0] >= times("01_first")[1], "started before the notebook it needs ended"
    record = json.loads((root / "book" / "notebooks" / BUILD_RECORD).read_text())
    assert record["jobs"] == 2 and record["skipped"] == [] and set(record["executed"]) == {
        "01_first", "02_beside", "03_after"}
    assert record["wall_s"] < sum(
        nbformat.read(root / "book" / "notebooks" / f"{n}.ipynb", as_version=4).metadata.papermill.duration
        for n in record["executed"])

    # an edit re-runs the notebook and those that need it, not the one beside it
    source = root / "notebooks" / "01_first.py"
    source.write_text(source.read_text() + "\n# %%\nprint('edited')\n")
    code, out = run_book(profile="smoke", root=root, build_html=False, jobs=2)
    assert code == 0 and "02_beside                unchanged, skipped" in out
    assert re.search(r"^01_first +\d+\.\d s$", out, re.MULTILINE) and re.search(r"^03_after +\d+\.\d s$", out,
                                                                                  re.MULTILINE)
    second = json.loads((root / "book" / "notebooks" / BUILD_RECORD).read_text())
    assert second["skipped"] == ["02_beside"]

    # a build that runs nothing keeps the record of the one that made the notebooks
    code, out = run_book(profile="smoke", root=root, build_html=False, jobs=2)
    assert code == 0 and out.count("unchanged, skipped") == 3
    assert json.loads((root / "book" / "notebooks" / BUILD_RECORD).read_text()) == second


@pytest.mark.slow
def test_nothing_starts_beside_a_notebook_that_runs_alone(tmp_path):
    trains = sleeping(2, "trains").replace("# %% [markdown]", "# ---\n# jupyter:\n#   referseg:\n"
                                          "#     alone: true\n# ---\n\n# %% [markdown]", 1)
    root = make_project(tmp_path / "project", {"01_trains": trains, "02_side": with_needs(sleeping(0, "side"), [])})
    code, out = run_book(profile="smoke", root=root, build_html=False, jobs=2)
    assert code == 0, out
    meta = {name: nbformat.read(root / "book" / "notebooks" / f"{name}.ipynb", as_version=4).metadata.papermill
            for name in ("01_trains", "02_side")}
    assert meta["02_side"].start_time >= meta["01_trains"].end_time


@pytest.mark.slow
def test_ctrl_c_stops_the_build_at_once_and_its_kernels_with_it(tmp_path):
    import os
    import signal
    import time

    slow = ("# %% [markdown]\n# # Slow\n\n" + PARAMETERS_CELL + "\n# %%\nimport os\nimport time\n"
            "from pathlib import Path\n\nPath(run_dir, f'pid-{os.getpid()}').touch()\ntime.sleep(300)\n")
    root = make_project(tmp_path / "project", {"01_slow": slow, "02_beside": with_needs(slow, [])})
    script = ("import sys\nfrom referseg.book import build_book\ntry:\n"
              f"    build_book(profile='smoke', root={str(root)!r}, build_html=False)\n"
              "except KeyboardInterrupt:\n    sys.exit(130)\n")
    build = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while (len(kernels := list((root / "runs" / "smoke").glob("pid-*"))) < 2 and time.monotonic() < deadline
           and build.poll() is None):
        time.sleep(0.2)
    assert len(kernels) == 2, build.communicate()  # both notebooks are running
    sent = time.monotonic()
    build.send_signal(signal.SIGINT)
    _, err = build.communicate(timeout=60)
    assert build.returncode == 130 and time.monotonic() - sent < 30, err
    assert "stopped unfinished: 01_slow, 02_beside" in err
    for kernel in (int(path.name.removeprefix("pid-")) for path in kernels):
        for _ in range(50):  # each kernel notices that its parent is gone
            try:
                os.kill(kernel, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"kernel {kernel} still runs after the build was interrupted")
    assert not list((root / "book" / "notebooks").glob("*.stamp")), "an interrupted notebook counts as done"


@pytest.mark.slow
def test_student_edition_has_no_solutions_or_outputs_and_still_runs(tmp_path):
    root = make_project(tmp_path / "project", {"01_tiny": TINY_NOTEBOOK})
    teacher = read_notebook(root / "notebooks" / "01_tiny.py")
    solutions = [c for c in teacher.cells if "solution" in c.metadata.get("tags", [])]
    assert len(solutions) == 2

    code, out = run_book(profile="cpu", student=True, root=root)
    assert code == 0, out
    student = nbformat.read(root / "student" / "01_tiny.ipynb", as_version=4)
    assert [c.cell_type for c in student.cells] == [c.cell_type for c in teacher.cells]
    assert not [c for c in student.cells if "solution" in c.metadata.get("tags", [])]
    text = "\n".join(c.source for c in student.cells)
    assert "answer_to_exercise_one" not in text and "square of the side" not in text
    assert text.count(PLACEHOLDERS["code"].strip()) == 1 and text.count(PLACEHOLDERS["markdown"]) == 1
    assert all(not c.outputs and c.execution_count is None for c in student.cells if c.cell_type == "code")
    checked = nbformat.read(root / "_build" / "student-check" / "01_tiny.ipynb", as_version=4)
    assert checked.metadata.papermill.parameters["profile"] == "smoke"
    assert not (root / "book" / "notebooks").exists(), "the student edition ran the book"


@pytest.mark.slow
def test_a_student_edition_that_no_longer_runs_is_reported(tmp_path, capsys):
    uses_solution = TINY_NOTEBOOK + "\n# %%\nprint(answer_to_exercise_one)\n"
    root = make_project(tmp_path / "project", {"01_tiny": uses_solution})
    assert build_book(profile="cpu", student=True, root=root) == 1
    err = capsys.readouterr().err
    assert "student/01_tiny failed" in err and "NameError" in err


@pytest.fixture(scope="module")
def built_book(tmp_path_factory) -> tuple[Path, int, str]:
    """Every notebook executed under the smoke profile, then the book built from those outputs."""
    root = make_project(tmp_path_factory.mktemp("book") / "project")
    code, out = run_book(profile="smoke", root=root)
    return root, code, out


@pytest.mark.slow
def test_every_notebook_runs_under_smoke_and_the_book_builds_without_warnings(built_book):
    root, code, out = built_book
    assert code == 0, out  # jupyter-book ran with --warningiserror
    html = root / "_build" / "html"
    assert (html / "index.html").exists()
    for path in notebook_sources(root):
        executed = nbformat.read(root / "book" / "notebooks" / f"{path.stem}.ipynb", as_version=4)
        papermill = executed.metadata.papermill
        assert papermill.exception is not True
        assert papermill.parameters == {"profile": "smoke", "run_dir": "runs/smoke", "device": "auto",
                                        "seed": 0, "overrides": {}}
        injected = [c for c in executed.cells if INJECTED_TAG in c.metadata.get("tags", [])]
        assert len(injected) == 1 and HIDE_TAG in injected[0].metadata.tags
        assert (html / "book" / "notebooks" / f"{path.stem}.html").exists()
        assert re.search(rf"^{path.stem} +\d+\.\d s$", out, re.MULTILINE), out
    for page in ("intro", "method", "spec", "paper_profile", "teaching", "appendix", "bibliography"):
        assert (html / "book" / f"{page}.html").exists()
    bibliography = (html / "book" / "bibliography.html").read_text()
    assert "Segmentation from Natural Language Expressions" in bibliography


@pytest.mark.slow
def test_each_notebook_of_the_book_started_after_those_it_needs_ended(built_book):
    root, code, _ = built_book
    assert code == 0
    needs = notebook_needs({path: read_notebook(path) for path in notebook_sources(root)})
    meta = {name: nbformat.read(root / "book" / "notebooks" / f"{name}.ipynb", as_version=4).metadata.papermill
            for name in needs}
    for name, needed in needs.items():
        for need in needed:
            assert meta[name].start_time >= meta[need].end_time, f"{name} started before {need} ended"


@pytest.mark.slow
def test_the_book_shows_no_injected_parameters_cell(built_book):
    root, code, _ = built_book
    assert code == 0
    for path in notebook_sources(root):
        page = (root / "_build" / "html" / "book" / "notebooks" / f"{path.stem}.html").read_text()
        assert "tag_parameters" in page, f"{path.stem}: the chapter's own parameters cell is missing"
        assert f"tag_{INJECTED_TAG}" not in page, f"{path.stem}: papermill's injected cell is on the page"
        assert '<span class="c1"># Parameters</span>' not in page, f"{path.stem}: the injected cell's code is shown"


TABLE_CELL = re.compile(r"<t[dh]\b[^>]*>(.*?)</t[dh]>", re.DOTALL)


@pytest.mark.slow
def test_no_table_of_a_chapter_shows_nan(built_book):
    root, code, _ = built_book
    assert code == 0
    found = []
    for page in sorted((root / "_build" / "html" / "book").rglob("*.html")):
        for cell in TABLE_CELL.findall(page.read_text()):
            text = re.sub(r"<[^>]+>", "", cell).strip()
            if text.lower() in ("nan", "<na>", "nat") or re.search(r"\bNaN\b", text):
                found.append(f"{page.relative_to(root / '_build' / 'html')}: {text!r}")
    assert found == [], "table cells without a number show NaN: " + "; ".join(found)


@pytest.mark.slow
def test_papermill_lists_each_parameter_with_its_type_default_and_meaning(built_book):
    root, code, _ = built_book
    assert code == 0
    executed = root / "book" / "notebooks" / "04_stage1_low_resolution.ipynb"
    papermill = Path(sys.executable).with_name("papermill")
    result = subprocess.run([str(papermill), "--help-notebook", str(executed)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = " ".join(result.stdout.split())
    for listed in ('profile: str (default "cpu") paper, cpu or smoke', "seed: int (default 0)",
                   "overrides: dict (default {})", "retrain: bool (default False)"):
        assert listed in out, result.stdout


@pytest.mark.slow
def test_figures_are_numbered_and_referenced_in_every_chapter(built_book):
    root, code, _ = built_book
    assert code == 0
    for path in notebook_sources(root):
        if path.stem == "99_appendix":
            continue  # tables only
        page = (root / "_build" / "html" / "book" / "notebooks" / f"{path.stem}.html").read_text()
        if "this chapter measures nothing" in page:
            continue  # its data is absent here (09: ReferIt's text files): it says how to get them
        figures = re.findall(r'<figure[^>]*id="(fig-[\w-]+)"', page)
        assert figures, f"{path.stem} has no numbered figure"
        assert re.search(r'<span class="caption-number">Fig\. \d+ </span>', page)
        for name in figures:
            assert f'href="#{name}"' in page.replace(f'href="#{name}" title="Link to this image"', ""), (
                f"{path.stem}: the text never refers to figure {name}")


@pytest.mark.slow
def test_appendix_reads_the_timings_of_the_executed_notebooks(built_book):
    root, code, _ = built_book
    assert code == 0
    page = (root / "_build" / "html" / "book" / "notebooks" / "99_appendix.html").read_text()
    executed = [p.stem for p in notebook_sources(root) if p.stem != "99_appendix"]
    assert executed and all(name in page for name in executed)


# ---------------------------------------------------------------------------- screenshot


def test_table_check_finds_the_metric_only_inside_a_table():
    assert table_with("<table><tr><th>overall_IoU</th></tr></table>")
    assert table_with("<table><tr><td>Overall  IoU</td></tr></table>")
    assert not table_with("<p>overall IoU</p><table><tr><td>precision</td></tr></table>")
    page = ('<section id="top"><table><tr><td>P@0.5</td></tr></table><section id="results">'
            '<table><tr><td>overall IoU</td></tr></table></section></section>')
    assert table_section(page) == "results"


def test_blank_screenshot_is_reported(tmp_path):
    page = tmp_path / "page.html"
    page.write_text("<table><tr><td>overall IoU</td></tr></table>")
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((600, 800, 3), 255, np.uint8)).save(blank)
    problems = check_screenshot(page, blank)
    assert len(problems) == 1 and "looks blank" in problems[0]


needs_chromium = pytest.mark.skipif(find_chromium() is None,
                                    reason="no Chromium installed (apt-get install -y chromium)")


@pytest.mark.slow
@needs_chromium
def test_screenshot_of_the_built_book_shows_its_table(built_book):
    root, code, _ = built_book
    assert code == 0
    png = root / "_build" / "screenshots" / "page.png"
    html = root / "_build" / "html"
    page = default_page(html)
    assert screenshot_main([str(html), "--page", page.relative_to(html).as_posix(), "--out", str(png)]) == 0
    assert Image.open(png).size == (1280, 2400)
    assert check_screenshot(page, png) == []
    assert not list(page.parent.glob(".screenshot-*")), "left a temporary copy of the page"


@pytest.mark.slow
@needs_chromium
def test_every_page_of_the_built_book_passes_the_browser_checks(built_book):
    root, code, _ = built_book
    assert code == 0
    html = root / "_build" / "html"
    reports = check_book(html)
    pages = {report.page for report in reports}
    assert {"book/intro.html", "book/method.html", "book/notebooks/07_evaluation.html", "search.html"} <= pages
    assert len(pages) == len(book_pages(html))
    failed = {report.page: report.failed() for report in reports}  # wide code included
    assert {page: checks for page, checks in failed.items() if checks} == {}, (
        results_table(reports) + "\n" + findings_text(reports))


BAD_PAGE = """<!DOCTYPE html><html><head><title>bad</title>
<script src="https://cdn.example.com/library.js"></script></head><body>
<p>Raw $$x^2$$ and \\(y\\) left as text, but <code>$$</code> in code is fine.</p>
<pre style="width: 200px; overflow: auto">{wide}</pre>
<img src="missing.png"><img src="ok.png"><img src="../outside.png">
<script>console.error("deliberate error");</script></body></html>"""
GOOD_PAGE = """<!DOCTYPE html><html><head><title>good</title></head><body>
<p>Math as <code>\\(x\\)</code>, only in code.</p><pre>{narrow}</pre><img src="ok.png"></body></html>"""


@needs_chromium
def test_page_checks_find_each_kind_of_problem(tmp_path):
    html = tmp_path / "html"
    html.mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(html / "ok.png")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "outside.png")  # loads, but not from html/
    (html / "bad.html").write_text(BAD_PAGE.format(wide="x" * 200))
    (html / "good.html").write_text(GOOD_PAGE.format(narrow="x" * 20))
    (html / "index.html").write_text('<meta http-equiv="Refresh" content="0; url=good.html" />')
    assert [p.name for p in book_pages(html)] == ["bad.html", "good.html"]  # not the redirect
    bad, good = check_book(html)
    assert good.failed() == [], findings_text([good])
    assert bad.failed() == list(CHECKS), findings_text([bad])
    assert len(bad.raw_tex) == 1 and "$$x^2$$" in bad.raw_tex[0]
    assert bad.broken_images == ["missing.png"]
    assert sorted(bad.outside_requests) == [(tmp_path / "outside.png").as_uri(), "https://cdn.example.com/library.js"]
    assert any("deliberate error" in error for error in bad.console_errors)
    assert bad.failed(ignore=("wide_code",)) == [c for c in CHECKS if c != "wide_code"]
    table = results_table([bad, good], ignore=("wide_code",))
    assert "1 (ignored)" in table and "FAIL" in table.splitlines()[2] and "FAIL" not in table.splitlines()[3]


# ---------------------------------------------------------------------------- offline, launch buttons

LOADS = re.compile(r"""<(?:script|link)\b[^>]*\b(?:src|href)=["']([^"']+)["']""", re.IGNORECASE)
CDN_IN_HTML = [re.compile(p, re.IGNORECASE) for p in (
    r"""<script\b[^>]*\bsrc=["']?(?:https?:)?//""",
    r"""<link\b[^>]*\bhref=["']?(?:https?:)?//""",
    r"""(?:https?:)?//[^"'\s]*mathjax[^"'\s]*\.js""",  # MathJax from a CDN
)]
CDN_IN_CSS = re.compile(r"""@import\s+(?:url\()?["']?(?:https?:)?//|url\(["']?(?:https?:)?//""", re.IGNORECASE)
CDN_IN_JS = CDN_IN_HTML[-1]  # a script that loads MathJax (or a part of it) from a CDN


@pytest.mark.slow
def test_the_built_book_loads_nothing_from_another_host(built_book):
    root, code, _ = built_book
    assert code == 0
    html = root / "_build" / "html"
    pages = sorted(html.rglob("*.html"))
    loaded, problems = set(), []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        problems += [f"{page.relative_to(html)}: {m.group(0)}" for p in CDN_IN_HTML for m in p.finditer(text)]
        for target in LOADS.findall(text):
            if "://" not in target:
                loaded.add((page.parent / target.split("?")[0].split("#")[0]).resolve())
    assets = {path for path in loaded if path.suffix in (".css", ".js")}
    assert any(path.name == "tex-chtml.js" for path in assets), "no page loads the local MathJax"
    for path in assets:
        assert path.is_file(), f"a page loads {path}, which is not in the build"
        pattern = CDN_IN_CSS if path.suffix == ".css" else CDN_IN_JS
        problems += [f"{path.relative_to(html)}: {m.group(0)}" for m in pattern.finditer(path.read_text("utf-8"))]
    assert problems == []
    mathjax = html / "_static" / "mathjax" / "tex-chtml.js"
    assert mathjax.is_file() and mathjax.stat().st_size > 100_000
    assert any((html / "_static" / "mathjax" / "output" / "chtml" / "fonts").rglob("*.woff"))
    method = (html / "book" / "method.html").read_text()
    assert re.search(r'src="\.\./_static/mathjax/tex-chtml\.js(\?[^"]*)?"', method) and 'class="math' in method


def launch_links(html: Path) -> list[str]:
    return sorted({m for page in html.rglob("*.html") for m in re.findall(
        r"https://(?:mybinder\.org|colab\.research\.google\.com)[^\"'<>\s]*", page.read_text("utf-8"))})


@pytest.mark.slow
def test_no_launch_buttons_without_a_repository_url(built_book):
    root, code, _ = built_book
    assert code == 0
    assert "url: \"\"" in (REPO / "_config.yml").read_text()  # this test assumes no URL is set
    html = root / "_build" / "html"
    assert launch_links(html) == []
    assert "launch-buttons" not in (html / "book" / "notebooks" / "07_evaluation.html").read_text()


@pytest.mark.slow
def test_launch_buttons_appear_with_a_repository_url_from_the_environment(built_book, tmp_path, monkeypatch):
    root, code, _ = built_book
    assert code == 0
    copy = tmp_path / "project"  # the executed notebooks, built again: no notebook runs
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("_build", "runs"))
    monkeypatch.setenv(REPOSITORY_ENV, "https://github.com/someone/referseg")
    with contextlib.redirect_stdout(io.StringIO()):
        assert build_html_book(copy) == 0
    links = launch_links(copy / "_build" / "html")
    assert "https://mybinder.org/v2/gh/someone/referseg/main?urlpath=lab/tree/book/notebooks/07_evaluation.ipynb" in links
    assert ("https://colab.research.google.com/github/someone/referseg/blob/main/book/notebooks/07_evaluation.ipynb"
            in links)


def test_launch_providers_are_dropped_without_a_repository_url():
    theme = {"repository_url": "", "launch_buttons": {"binderhub_url": "https://mybinder.org",
                                                      "colab_url": "https://colab.research.google.com",
                                                      "notebook_interface": "jupyterlab", "thebe": False}}
    assert repository_options(theme, environ={})["launch_buttons"] == {"notebook_interface": "jupyterlab"}
    url = "https://github.com/someone/referseg"
    with_url = repository_options(theme, environ={REPOSITORY_ENV: url})
    assert with_url["repository_url"] == url and with_url["launch_buttons"] == theme["launch_buttons"]
    assert repository_options({**theme, "repository_url": url}, environ={})["launch_buttons"]["binderhub_url"]


def test_an_inline_script_added_twice_is_written_once():
    from sphinx.builders.html._assets import _JavaScript

    first, again = _JavaScript(None, body="const X = 1", priority=500), _JavaScript("", body="const X = 1", priority=500)
    other = _JavaScript("_static/a.js", priority=500)
    assert unique_scripts([first, other, again, other]) == [first, other]


# ---------------------------------------------------------------------------- the lock file


def test_lock_pins_everything_but_referseg_and_the_local_torch_build(tmp_path):
    freeze = ("# Editable Git install with no remote (referseg==0.1.0)\n-e /somewhere/referseg\n"
              "numpy==2.1.0\ntorch==2.14.1\nnvidia-cublas==13.1.1.3\nJinja2==3.1.4\n"
              "torchvision==0.29.1+cpu\nreferseg @ file:///somewhere\n")
    text = lock_text(freeze)
    pins = [line for line in text.splitlines() if not line.startswith("#")]
    assert pins == ["Jinja2==3.1.4", "numpy==2.1.0"]
    assert "# torch==2.14.1  (not pinned)" in text and "# nvidia-cublas==13.1.1.3  (not pinned)" in text
    lock = tmp_path / "requirements.lock"
    lock.write_text(text)
    table = lock_summary(lock)
    assert list(table.columns) == ["locked", "installed", "agrees"]
    assert table.loc["torch", "locked"] == "2.14.1 (not pinned)" and table.loc["numpy", "locked"] == "2.1.0"
    assert "referseg" not in table.index
    assert lock_summary(tmp_path / "absent.lock").empty


def test_the_committed_lock_pins_what_the_book_needs():
    table = lock_summary(REPO / "requirements.lock")
    for name in ("jupyter-book", "papermill", "sphinx-mathjax-offline", "ghp-import", "numpy"):
        assert name in table.index.str.lower(), name
    assert "(not pinned)" in table.loc["torch", "locked"]
