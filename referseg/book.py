"""Run the chapter notebooks with papermill for one profile, then build the Jupyter Book.

Conventions the notebooks follow (``notebooks/NN_name.py``, jupytext py:percent):
- one cell tagged ``parameters`` assigns ``profile``, ``run_dir``, ``device``, ``seed``
  and ``overrides`` (a dict of profile overrides), one ``name: type = value  # meaning``
  a line; papermill injects the real values in a cell of its own, which the book hides;
- notebooks hand results to later ones through files in ``run_dir``. A notebook names the
  ones whose files it reads in its header, ``referseg: {needs: [01_data]}`` (jupytext
  metadata; without it, it needs every earlier one). When one re-runs, every notebook that
  needs it re-runs too, and notebooks that do not need each other run side by side
  (``jobs`` at once, two by default: the book's two cores), except beside one marked
  ``referseg: {alone: true}`` (it trains on every core);
- exercise solutions are cells tagged ``solution`` (code cells also ``hide-cell`` so the
  book folds them; markdown ones are a ``{admonition}`` with ``:class: dropdown``). The
  student edition replaces them with a placeholder and clears every output.
"""

from __future__ import annotations

import ast
import hashlib
import json
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from referseg.config import Profile, get_profile
from referseg.io import atomic_write_text, package_hash, sha256_file

ROOT = Path(__file__).resolve().parents[1]
PARAMETERS = ("profile", "run_dir", "device", "seed", "overrides")
NOTEBOOK_GLOB = "[0-9][0-9]_*.py"
EXECUTED_DIR = Path("book") / "notebooks"  # executed notebooks, relative to the root (git-ignored)
PLACEHOLDERS = {"code": "# Your solution here.\n", "markdown": "*Your answer here.*"}
INJECTED_TAG, HIDE_TAG = "injected-parameters", "remove-cell"  # papermill's tag; myst-nb's
JOBS = 2  # notebooks executed at once: the two cores the book is built on (README)
BUILD_RECORD = "build.json"  # in EXECUTED_DIR: the last build's wall time, what ran and what was skipped
LOCK_FILE = "requirements.lock"  # pip constraints: the versions the book was built with (make lock)
# Left unpinned in the lock (written as comments): the local torch build and what it brings with it.
UNPINNED = ("torch", "torchvision", "triton")
UNPINNED_PREFIXES = ("nvidia-", "cuda-")
LOCK_HEADER = f"""\
# {LOCK_FILE}: the versions of every package the book was last built and tested with,
# written by `make lock` (pip freeze of .venv). make installs with it as pip constraints
# (pip install -c {LOCK_FILE} -e ".[book]"); delete it to take the newest versions.
# torch, torchvision and the CUDA libraries they bring stay unpinned (commented out), so
# that the torch build on the machine at hand resolves.
"""


def notebook_sources(root: Path) -> list[Path]:
    """The chapter notebooks in execution order (their ``NN_`` prefix)."""
    return sorted((root / "notebooks").glob(NOTEBOOK_GLOB))


def read_notebook(path: Path) -> Any:
    """A jupytext source as an in-memory notebook, without the jupytext pairing metadata."""
    import jupytext

    nb = jupytext.read(path)
    nb.metadata.pop("jupytext", None)
    return nb


def parameter_names(nb: Any) -> set[str] | None:
    """Names assigned in the cell tagged ``parameters`` (``name = value`` or, annotated,
    ``name: type = value``); None when there is no such cell."""
    for cell in nb.cells:
        if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", []):
            names = set()
            for node in ast.parse(cell.source).body:
                if isinstance(node, ast.Assign):
                    targets = node.targets
                elif isinstance(node, ast.AnnAssign) and node.value is not None:
                    targets = [node.target]
                else:
                    continue  # imports (typing), bare annotations: no parameter
                names |= {t.id for t in targets if isinstance(t, ast.Name)}
            return names
    return None


def toc_notebooks(root: Path) -> list[str]:
    """Names of the executed notebooks that ``_toc.yml`` lists, e.g. ``01_data``."""
    import yaml

    def files(node: Any) -> list[str]:
        if isinstance(node, list):
            return [f for item in node for f in files(item)]
        if isinstance(node, dict):
            own = [node["file"]] if "file" in node else []
            return own + [f for value in node.values() for f in files(value)]
        return []

    toc = yaml.safe_load((root / "_toc.yml").read_text())
    prefix = EXECUTED_DIR.as_posix() + "/"
    return [f.removeprefix(prefix).removesuffix(".ipynb") for f in files(toc) if f.startswith(prefix)]


def lock_text(freeze: str) -> str:
    """The lock file for ``pip freeze`` output: exact pins, without the editable referseg, with
    torch, torchvision and their CUDA libraries as comments (their exact local build would not
    resolve elsewhere)."""
    lines = [LOCK_HEADER.rstrip("\n")]
    for line in sorted(freeze.splitlines(), key=lambda line: line.split("==", 1)[0].strip().lower()):
        line = line.strip()
        if not line or line.startswith(("#", "-e", "--")) or "==" not in line:
            continue  # comments, editable installs, options, direct URLs (referseg itself)
        name = line.split("==", 1)[0].strip()
        if name.lower().replace("_", "-") == "referseg":
            continue
        unpinned = name.lower() in UNPINNED or name.lower().startswith(UNPINNED_PREFIXES)
        lines.append(f"# {line}  (not pinned)" if unpinned else line)
    return "\n".join(lines) + "\n"


def lock_summary(path: str | Path | None = None) -> Any:
    """The lock file as a table (one row per package: the locked version, the installed one and
    whether they agree), for the appendix. ``path`` defaults to ``requirements.lock`` in the
    working directory, else in the repository of this package."""
    from importlib import metadata

    import pandas as pd

    candidates = [Path(path)] if path else [Path.cwd() / LOCK_FILE, ROOT / LOCK_FILE]
    lock = next((p for p in candidates if p.is_file()), None)
    columns = ["package", "locked", "installed", "agrees"]
    if lock is None:
        return pd.DataFrame([], columns=columns).set_index("package")
    rows = []
    for line in lock.read_text().splitlines():
        text = line.strip()
        unpinned = text.startswith("#") and text.endswith("(not pinned)")
        text = text.lstrip("# ").removesuffix("(not pinned)").strip() if unpinned else text
        if not text or text.startswith("#") or "==" not in text:
            continue
        name, version = (part.strip() for part in text.split("==", 1))
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = "not installed"
        locked = f"{version} (not pinned)" if unpinned else version
        rows.append((name, locked, installed, "yes" if installed == version else "no"))
    return pd.DataFrame(rows, columns=columns).set_index("package")


def check_sources(root: Path, sources: dict[Path, Any], with_toc: bool) -> None:
    """Refuse notebooks without a complete parameters cell, and a TOC that disagrees with notebooks/."""
    if not sources:
        raise FileNotFoundError(f"no notebooks matching {root / 'notebooks' / NOTEBOOK_GLOB}")
    for path, nb in sources.items():
        names = parameter_names(nb)
        missing = sorted(set(PARAMETERS) - (names or set()))
        if missing:
            raise ValueError(f"{path}: the cell tagged 'parameters' must assign {', '.join(PARAMETERS)}; "
                             f"missing: {', '.join(missing) if names is not None else 'the whole cell'}")
    if with_toc:
        listed, present = toc_notebooks(root), [p.stem for p in sources]
        if sorted(listed) != present:
            raise ValueError(f"_toc.yml lists the notebooks {listed} but notebooks/ holds {present}; "
                             f"make _toc.yml list every {EXECUTED_DIR.as_posix()}/<name> of notebooks/<name>.py")


def notebook_needs(sources: dict[Path, Any]) -> dict[str, tuple[str, ...]]:
    """What each notebook reads the files of: ``referseg: {needs: [...]}`` in its header, else
    every earlier notebook. Only earlier notebooks may be named, so the order stays a valid one."""
    names = [path.stem for path in sources]
    needs = {}
    for index, (path, nb) in enumerate(sources.items()):
        declared = nb.metadata.get("referseg", {}).get("needs")
        if declared is None:
            needs[path.stem] = tuple(names[:index])
            continue
        if isinstance(declared, str) or not all(isinstance(name, str) for name in declared):
            raise ValueError(f"{path}: referseg.needs must be a list of notebook names, such as [01_data]")
        unknown = [name for name in declared if name not in names[:index]]
        if unknown:
            raise ValueError(f"{path}: referseg.needs names {', '.join(unknown)}, which is not an earlier "
                             f"notebook; name some of {', '.join(names[:index]) or 'none (it is the first)'}")
        needs[path.stem] = tuple(declared)
    return needs


def runs_alone(nb: Any, path: Path) -> bool:
    """``referseg: {alone: true}`` in a notebook's header: it keeps every core busy (it trains), so
    no other notebook starts beside it."""
    alone = nb.metadata.get("referseg", {}).get("alone", False)
    if not isinstance(alone, bool):
        raise ValueError(f"{path}: referseg.alone must be true or false, not {alone!r}")
    return alone


def check_data(profile: Profile, root: Path) -> None:
    """Stop before the first notebook when the profile needs ReferIt and it is not there (cheap file checks)."""
    if profile.dataset != "referit":
        return  # SynthRef: the data notebook generates it
    from referseg.data.refer import IMAGE_DIRS, OBTAIN_HINT, DatasetNotFoundError

    data = root / profile.data_root
    if any(data.glob("referit_query_*.json")) and (data / "mask").is_dir():
        return  # the official implementation's format (SPEC 2)
    needed = ["refclef/instances.json", "refclef/refs(berkeley).p", IMAGE_DIRS["refclef"]]
    missing = [name for name in needed if not (data / name).exists()]
    if missing:
        raise DatasetNotFoundError(
            f"profile {profile.name!r} needs the ReferIt dataset (refclef, split 'berkeley') under {data}, "
            f"but it lacks {', '.join(missing)}; no notebook was run.\n{OBTAIN_HINT}")


def fingerprint(source: str, parameters: dict[str, Any], package: str) -> str:
    """Hash of what a notebook's outputs depend on: its source, its parameters and the package."""
    blob = json.dumps([source, parameters, package], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def execute(nb: Any, output: Path, parameters: dict[str, Any], cwd: Path, progress_bar: bool = True) -> float:
    """Execute one notebook with papermill (python3 kernel, working directory ``cwd``); seconds taken.

    The cell papermill injects with the run's parameters is kept in the executed notebook
    but tagged ``remove-cell``: the book shows the chapter's own parameters cell only.
    """
    import nbformat
    import papermill

    start = time.perf_counter()
    output.parent.mkdir(parents=True, exist_ok=True)
    executed = papermill.execute_notebook(nb, output, parameters=parameters, kernel_name="python3",
                                          language="python", cwd=cwd, progress_bar=progress_bar)
    if hide_injected_parameters(executed):
        atomic_write_text(output, nbformat.writes(executed))
    return time.perf_counter() - start


def hide_injected_parameters(nb: Any) -> bool:
    """Tag papermill's ``injected-parameters`` cell ``remove-cell`` (plumbing, not an idea of
    the chapter); whether a cell was tagged."""
    changed = False
    for cell in nb.cells:
        tags = cell.setdefault("metadata", {}).setdefault("tags", [])
        if INJECTED_TAG in tags and HIDE_TAG not in tags:
            tags.append(HIDE_TAG)
            changed = True
    return changed


def source_cell(nb: Any, executed_index: int) -> int:
    """The index, in the source notebook ``nb``, of cell ``executed_index`` of its executed copy:
    papermill inserts its injected-parameters cell right after the ``parameters`` cell."""
    tagged = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.get("metadata", {}).get("tags", [])]
    return executed_index - 1 if tagged and executed_index > tagged[0] else executed_index


def describe_failure(name: str, output: Path, err: Any, consequence: str = "the book was not built",
                     nb: Any = None) -> str:
    """Which notebook and which cell of its source failed, and where the partly executed notebook is."""
    first_line = next((line.strip() for line in err.source.splitlines() if line.strip()), "")
    cell = source_cell(nb, err.cell_index) if nb is not None else err.cell_index
    return (f"error: notebook {name} failed in cell {cell} of its source (In [{err.exec_count}]: {first_line!r})"
            f"\n  {err.ename}: {err.evalue}\n  the partly executed notebook is {output}; {consequence}")


def mark_stale(root: Path, reason: str) -> Path | None:
    """After a failed run, the previous HTML book no longer matches the code: remove it, and leave
    ``_build/STALE.txt`` saying why, so nobody reads old outputs as current ones."""
    html = root / "_build" / "html"
    if not html.exists():
        return None
    shutil.rmtree(html)
    note = root / "_build" / "STALE.txt"
    atomic_write_text(note, f"The HTML book was removed because a later build failed: {reason}\n"
                            "Fix the failure and run make book again.\n")
    return note


def build_book(profile: str = "cpu", overrides: dict[str, Any] | None = None, student: bool = False,
               force: bool = False, build_html: bool = True, root: str | Path | None = None,
               jobs: int = JOBS) -> int:
    """Execute every notebook for ``profile`` (skipping unchanged ones), then build ``_build/html``.

    ``student=True`` writes the student edition to ``student/`` instead and checks that it runs
    under the smoke profile. ``root`` is the project folder (default: this repository). ``jobs``:
    notebooks executed at once (1: one after the other, in their order).
    Returns 0 on success, 1 when a notebook fails (the book is then not built).
    """
    root = Path(root or (ROOT if (ROOT / "notebooks").is_dir() else Path.cwd())).resolve()
    overrides = dict(overrides or {})
    resolved = get_profile(profile, **overrides)  # ValueError naming the valid profiles / parameters
    if not resolved.visual_features:
        raise ValueError(f"profile {profile!r} has no visual features: it is the model of one chapter (what the "
                         "words alone know), which trains it itself; build the book with paper, cpu or smoke")
    sources = {path: read_notebook(path) for path in notebook_sources(root)}
    check_sources(root, sources, with_toc=build_html and not student)
    if student:
        return write_student_edition(root, sources)
    check_data(resolved, root)

    run_dir = f"runs/{profile}"
    parameters = {"profile": profile, "run_dir": run_dir, "device": "auto", "seed": resolved.seed,
                  "overrides": overrides}
    rerun = force or not (root / run_dir).exists()  # outputs are worthless without their run folder
    (root / run_dir).mkdir(parents=True, exist_ok=True)
    if not execute_notebooks(root, sources, parameters, rerun, jobs):
        return 1
    return build_html_book(root) if build_html else 0


def execute_notebooks(root: Path, sources: dict[Path, Any], parameters: dict[str, Any], rerun: bool,
                      jobs: int = JOBS) -> bool:
    """Execute the notebooks that changed (all of them with ``rerun``) and those that need them,
    ``jobs`` at once, each as soon as the ones it needs are done; whether all succeeded.

    Among the notebooks ready to start, the one that most others wait on goes first, so the
    long chain (data, stage 1, stage 2, baselines) never waits behind a side chapter; nothing
    starts beside a notebook marked ``alone`` (training, which keeps both cores busy); with
    ``jobs=1`` they run in their order. After a failure no new notebook starts; those running
    finish, then the failure is reported. Ctrl-C stops the build at once (the kernels end with
    it). A successful run that executed anything records its wall time, what it executed and
    what it skipped in ``book/notebooks/build.json`` (the benchmarks read it); one that only
    skipped leaves the record of the build that made the notebooks.
    """
    from papermill.exceptions import PapermillExecutionError

    if jobs < 1:
        raise ValueError(f"jobs must be 1 or more, not {jobs}")
    needs, package = notebook_needs(sources), package_hash()
    alone = {path.stem for path, nb in sources.items() if runs_alone(nb, path)}  # checks every header
    by_name = {path.stem: (path, nb) for path, nb in sources.items()}
    outputs = {name: root / EXECUTED_DIR / f"{name}.ipynb" for name in by_name}
    stamp_files = {name: output.with_suffix(".stamp") for name, output in outputs.items()}
    stamps = {name: fingerprint(path.read_text(), parameters, package) for name, (path, _) in by_name.items()}
    order = list(by_name)  # jobs=1 keeps it; with more, what most notebooks wait on goes first
    todo: list[str] = []
    for name in order:  # in order, so that what a notebook needs is decided before it
        unchanged = (outputs[name].exists() and stamp_files[name].exists()
                     and stamp_files[name].read_text().strip() == stamps[name])
        if rerun or not unchanged or any(need in todo for need in needs[name]):
            todo.append(name)
        else:
            print(f"{name:<24} unchanged, skipped")
    executed = list(todo)
    if not executed:  # the record still describes the build that made these notebooks
        print(f"{'notebooks':<24} all unchanged ({parameters['profile']} profile)")
        return True
    (root / EXECUTED_DIR / BUILD_RECORD).unlink(missing_ok=True)  # written again once this run succeeds
    waiters: dict[str, set[str]] = {name: set() for name in order}
    for name in reversed(order):  # the notebooks that need it, directly or through others
        for need in needs[name]:
            waiters[need] |= {name} | waiters[name]
    waiting_on = {name: len(waiters[name] & set(todo)) if jobs > 1 else 0 for name in todo}
    failures: list[tuple[str, BaseException]] = []
    finished: queue.Queue = queue.Queue()
    running: set[str] = set()
    start = time.perf_counter()

    def run(name: str) -> None:
        """In a daemon thread: Ctrl-C ends the build at once, and the kernels end with it."""
        try:
            stamp_files[name].unlink(missing_ok=True)
            seconds = execute(by_name[name][1], outputs[name], parameters, cwd=root, progress_bar=jobs == 1)
            atomic_write_text(stamp_files[name], stamps[name] + "\n")
            finished.put((name, seconds, None))
        except BaseException as err:  # reported by the main thread
            finished.put((name, None, err))

    try:
        while todo or running:
            pending = {*todo, *running}
            ready = sorted((name for name in todo if not pending.intersection(needs[name])),
                           key=lambda n: (-waiting_on[n], order.index(n)))
            # the first ready notebooks, while a lane is free; nothing starts beside one that runs
            # alone (it may itself start beside one that is finishing)
            while not failures and ready and len(running) < jobs and not running & alone:
                name = ready.pop(0)
                todo.remove(name)
                running.add(name)
                if jobs > 1:
                    print(f"{name:<24} started", flush=True)
                threading.Thread(target=run, args=(name,), name=f"notebook {name}", daemon=True).start()
            if not running:
                break  # a failure: nothing more starts
            name, seconds, err = finished.get()
            running.discard(name)
            if err is None:
                print(f"{name:<24} {seconds:7.1f} s", flush=True)
            else:
                failures.append((name, err))
    except KeyboardInterrupt:
        if running:
            print(f"\nstopped unfinished: {', '.join(sorted(running))} (re-run by the next build; finished "
                  "notebooks are skipped, and training resumes from its checkpoints)", file=sys.stderr)
        raise
    for name, err in failures:
        if isinstance(err, PapermillExecutionError):
            print(describe_failure(name, outputs[name], err, nb=by_name[name][1]), file=sys.stderr)
        else:
            print(f"error: notebook {name} could not run: {type(err).__name__}: {err}", file=sys.stderr)
    if failures:
        note = mark_stale(root, f"notebook {failures[0][0]} failed")
        if note:
            print(f"  the previous HTML book was removed as out of date ({note})", file=sys.stderr)
        return False
    wall = time.perf_counter() - start
    print(f"{'notebooks':<24} {wall:7.1f} s in all ({parameters['profile']} profile, {jobs} at once)")
    record = {"profile": parameters["profile"], "jobs": jobs, "wall_s": round(wall, 2), "executed": executed,
              "skipped": [name for name in order if name not in executed],
              "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write_text(root / EXECUTED_DIR / BUILD_RECORD, json.dumps(record, indent=1) + "\n")
    return True


def build_html_book(root: Path) -> int:
    """``jupyter-book build``: warnings are errors, every page re-read, outputs rendered as stored."""
    exe = Path(sys.executable).with_name("jupyter-book")
    command = [str(exe) if exe.exists() else (shutil.which("jupyter-book") or "jupyter-book"), "build",
               str(root), "--warningiserror", "--keep-going", "--all"]
    start = time.perf_counter()
    (root / "_build" / "STALE.txt").unlink(missing_ok=True)
    code = subprocess.run(command, cwd=root).returncode
    print(f"{'jupyter-book build':<24} {time.perf_counter() - start:7.1f} s -> {root / '_build' / 'html'}")
    if code:
        print(f"error: jupyter-book build failed (exit {code}); see its warnings above", file=sys.stderr)
    return code


def student_notebook(nb: Any) -> Any:
    """A copy without solutions (cells tagged ``solution`` become placeholders) and without outputs."""
    import nbformat

    nb = nbformat.from_dict(json.loads(json.dumps(nb)))
    for index, cell in enumerate(nb.cells):
        if "solution" in cell.metadata.get("tags", []):
            make = nbformat.v4.new_code_cell if cell.cell_type == "code" else nbformat.v4.new_markdown_cell
            cell = nb.cells[index] = make(PLACEHOLDERS.get(cell.cell_type, ""), metadata={"tags": ["answer"]})
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return nb


def write_student_edition(root: Path, sources: dict[Path, Any]) -> int:
    """Write ``student/NN_name.ipynb`` and check that the edition still runs under the smoke profile."""
    import nbformat
    from papermill.exceptions import PapermillExecutionError

    out_dir = root / "student"
    out_dir.mkdir(exist_ok=True)
    editions = {path.stem: student_notebook(nb) for path, nb in sources.items()}
    for name, nb in editions.items():
        atomic_write_text(out_dir / f"{name}.ipynb", nbformat.writes(nb))
    print(f"student edition: {len(editions)} notebooks in {out_dir}; checking they run (smoke profile)")
    check_dir = root / "_build" / "student-check"  # executed copies, kept for inspection
    with tempfile.TemporaryDirectory(prefix="referseg-student-") as run_dir:
        parameters = {"profile": "smoke", "run_dir": run_dir, "device": "auto",
                      "seed": get_profile("smoke").seed, "overrides": {}}
        for name, nb in editions.items():
            output = check_dir / f"{name}.ipynb"
            try:
                seconds = execute(nb, output, parameters, cwd=root)
            except PapermillExecutionError as err:
                print(describe_failure(f"student/{name}", output, err, "the edition does not run"),
                      file=sys.stderr)
                return 1
            print(f"{name:<24} {seconds:7.1f} s")
    return 0


# --- the appendix's record of the machine ------------------------------------------------


def data_hash(root: str | Path) -> str:
    """SHA-256 over the relative path and SHA-256 of every file under ``root`` (sorted), the first 16
    hex digits: which data an edition of the book was built from; "absent" without the folder."""
    root = Path(root)
    if not root.is_dir():
        return "absent"
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + sha256_file(path).encode())
    return digest.hexdigest()[:16]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    import platform

    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def package_version(package: str) -> str:
    """The installed version of a distribution, or ``not installed``."""
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


# --- the recipe page ------------------------------------------------------------------------

SPEC_PAGE = Path("book") / "spec.md"
SPEC_HEADER = """# The recipe (SPEC)

The paper's recipe with the official code's exact numbers, as this study reproduces it. Code \
comments and chapters cite its sections as "SPEC n"; every hyperparameter of \
`referseg/config.py` names the section it comes from. This page is generated from the \
study's `SPEC.md` (`referseg.book.spec_page`); a test keeps the two equal.

"""


def spec_page(spec_text: str) -> str:
    """``book/spec.md`` from ``SPEC.md``: the book's own title, and "SPEC n." section titles."""
    body = spec_text.split("\n", 1)[1] if spec_text.startswith("# ") else spec_text
    body = re.sub(r"^## (\d+)\. ", r"## SPEC \1. ", body.lstrip("\n"), flags=re.MULTILINE)
    return SPEC_HEADER + body
