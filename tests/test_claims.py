"""The book's claims: a sentence that states a measured number or relation is checked where it
stands (``referseg.viz.Claims``), and a claim that its outputs no longer support stops the build,
naming the sentence.

The unit tests call ``Claims`` directly; the slow test runs the real data chapter under the smoke
profile, once as it is and once with one of its every-profile claims made false.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_book import REPO, make_project

from referseg.book import build_book, read_notebook
from referseg.viz import PUBLISHED_PROFILE, ClaimError, Claims

DATA_CHAPTER = "01_data"
# An every-profile claim of the data chapter: a fact of SynthRef's splits in every profile.
STATEMENT = "no image is in two splits"
CONDITION = f'claims("{STATEMENT}", not shared_images,'
NEGATED = f'claims("{STATEMENT}", not (not shared_images),'


def test_a_false_claim_names_its_chapter_statement_and_evidence():
    claims = Claims(PUBLISHED_PROFILE, "x")
    with pytest.raises(ClaimError) as caught:
        claims("a", False, "e")
    message = str(caught.value)
    assert message.startswith("x: ")
    assert "'a'" in message and "(e)" in message


def test_a_true_claim_passes_and_is_recorded(capsys):
    claims = Claims(PUBLISHED_PROFILE, "x")
    assert claims("two is more than one", 2 > 1, "2 > 1") is True
    assert claims.checked == [("two is more than one", True, "2 > 1")]
    assert "holds: two is more than one (2 > 1)" in capsys.readouterr().out


def test_results_are_claimed_for_the_published_profile_only_and_facts_for_every_one(capsys):
    assert PUBLISHED_PROFILE != "smoke"
    smoke = Claims("smoke", "x")
    assert smoke("the model beats the baselines", False, "0 < 1") is False  # not checked
    assert smoke.checked == [("the model beats the baselines", False, "0 < 1")]
    assert "not checked for profile 'smoke'" in capsys.readouterr().out
    with pytest.raises(ClaimError, match="no image is in two splits"):
        smoke("no image is in two splits", False, "3 shared", every_profile=True)


def test_the_data_chapter_holds_the_claim_the_slow_test_negates():
    source = (REPO / "notebooks" / f"{DATA_CHAPTER}.py").read_text()
    assert source.count(CONDITION) == 1
    cell = next(c for c in read_notebook(REPO / "notebooks" / f"{DATA_CHAPTER}.py").cells
                if CONDITION in c.source)
    assert "every_profile=True" in cell.source


@pytest.mark.slow
def test_a_claim_made_false_stops_the_book_and_names_the_claim(tmp_path: Path, capsys):
    source = (REPO / "notebooks" / f"{DATA_CHAPTER}.py").read_text()
    root = make_project(tmp_path / "project", {DATA_CHAPTER: source})

    assert build_book(profile="smoke", root=root, build_html=False) == 0
    out = capsys.readouterr().out
    assert DATA_CHAPTER in out

    notebook = root / "notebooks" / f"{DATA_CHAPTER}.py"
    notebook.write_text(source.replace(CONDITION, NEGATED))
    assert build_book(profile="smoke", root=root, build_html=False) == 1
    err = capsys.readouterr().err
    cell = next(i for i, c in enumerate(read_notebook(notebook).cells) if NEGATED in c.source)
    assert f"notebook {DATA_CHAPTER} failed in cell {cell} of its source" in err
    assert "ClaimError" in err
    assert f"{DATA_CHAPTER}: the claim {STATEMENT!r} no longer holds" in err
