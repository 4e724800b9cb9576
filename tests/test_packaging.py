"""The project's set-up: dependencies in one list, the layout DESIGN.md fixes, the CLI."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


OPT_IN_EXTRAS = {"fetch", "convert"}  # for users who download ReferIt or convert TF weights; not the book's


def test_environment_yml_lists_exactly_pyprojects_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"])
    assert OPT_IN_EXTRAS <= set(project["optional-dependencies"])
    for name, extra in project["optional-dependencies"].items():
        if name not in OPT_IN_EXTRAS:
            wanted |= set(extra)
    text = (ROOT / "environment.yml").read_text()
    listed = {
        line.strip()[2:].strip()
        for line in text.splitlines()
        if line.startswith("      - ") and not line.strip().startswith("- -e")
    }
    assert {_name(r) for r in listed} == {_name(r) for r in wanted}
    # versions constraints agree too (e.g. jupyter-book>=1,<2)
    assert {r.replace(" ", "") for r in listed} == {r.replace(" ", "") for r in wanted}


def test_top_level_layout():
    for name in ["book", "notebooks", "referseg", "data", "tests", "benchmarks",
                 "_config.yml", "_toc.yml", "environment.yml", "pyproject.toml", "Makefile", "README.md",
                 ".ci/run"]:
        assert (ROOT / name).exists(), f"{name} is missing from the top level"


def test_readme_opens_with_the_two_commands():
    head = "\n".join((ROOT / "README.md").read_text().splitlines()[:20])
    assert "make book" in head and "make test" in head


def test_ci_runs_make_test():
    assert "make test" in (ROOT / ".ci/run").read_text()


@pytest.mark.parametrize(
    "argv",
    [[], ["data"], ["data", "synth"], ["data", "stats"], ["train"], ["evaluate"], ["predict"],
     ["baseline"], ["convert-official"], ["ablations"], ["book"], ["data", "fetch-referit"],
     ["data", "fetch-referit-text"], ["data", "check"]],
)
def test_every_subcommand_has_help(argv):
    out = subprocess.run([sys.executable, "-m", "referseg", *argv, "--help"], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "usage: referseg" in out.stdout


def test_the_recipe_page_is_generated_from_the_spec():
    """book/spec.md is SPEC.md with the book's title: never a stale copy."""
    from referseg.book import spec_page

    spec = ROOT.parent / "shared" / "SPEC.md"
    if not spec.is_file():
        pytest.skip(f"{spec} is not beside the checkout")
    assert (ROOT / "book" / "spec.md").read_text() == spec_page(spec.read_text()), (
        "book/spec.md differs from SPEC.md: regenerate it with "
        "python -c \"from pathlib import Path; from referseg.book import spec_page; "
        "Path('book/spec.md').write_text(spec_page(Path('../shared/SPEC.md').read_text()))\"")
