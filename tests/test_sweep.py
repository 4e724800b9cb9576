"""The learning-rate sweep (referseg.sweep): its rule, its runs on validation, and its kept summary."""

from __future__ import annotations

import json

import pytest

from referseg import viz
from referseg.cli import main as cli_main
from referseg.config import get_profile
from referseg.provenance import read_summary
from referseg.sweep import CHOSEN, choose, spec_likeness, stage1_variant, stage2_variants

pytestmark = pytest.mark.usefixtures("one_thread")


def row(lr, iou, init="pytorch", pretrain=False):
    return {"variant": f"{init}-{lr}-{pretrain}", "lr": lr, "init": init, "pretrain": pretrain, "overall_iou": iou}


def test_choose_keeps_the_most_spec_like_setting_within_one_point_of_the_best():
    rows = [row(0.01, 0.00), row(0.1, 0.495), row(0.3, 0.512)]
    assert choose(rows)["lr"] == 0.3  # SPEC's 0.01 is far below: the data overrules it
    rows.append(row(0.01, 0.505, init="official", pretrain=True))
    assert choose(rows)["variant"] == "official-0.01-True"  # within 1 point and the official recipe
    assert spec_likeness(rows[-1]) == 3 and spec_likeness(rows[0]) == 1
    assert choose([row(0.1, float("nan")), row(0.3, 0.2)])["lr"] == 0.3  # a diverged run has no score


def test_sweep_variants_score_on_validation_and_stage_2_keeps_the_chosen_stage_1():
    first = stage1_variant(0.3, True, "official")
    assert first.overrides == {"stage1": {"lr": 0.3}, "pretrain": True, "init": "official", "eval_split": "val"}
    second = stage2_variants(first, (0.01, 0.1))
    assert [v.overrides["stage2"] for v in second] == [{"lr": 0.01}, {"lr": 0.1}]
    assert all(v.overrides["eval_split"] == "val" and v.overrides["stage1"] == {"lr": 0.3} for v in second)
    reference = get_profile("smoke")
    assert second[0].profile(reference).stage1.lr == 0.3 and second[0].profile(reference).eval_split == "val"


def test_the_sweep_runs_on_smoke_and_its_kept_summary_knows_when_the_profile_ignores_it(synth_root, tmp_path,
                                                                                      capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    summary = tmp_path / "sweep.json"
    settings = ["--set", f"data_root={synth_root}", "--set", "stage1.iterations=4", "--set", "stage2.iterations=3",
                "--set", "stage0.iterations=3"]
    code = cli_main(["sweep", "--profile", "smoke", *settings, "--run-dir", str(tmp_path / "run"), "--summary",
                     str(summary), "--device", "cpu", "--threads", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    saved = json.loads(summary.read_text())
    stages = [r["stage"] for r in saved["rows"]]
    assert stages.count(1) == 2 * 4 + 2 and stages.count(2) == 3  # 4 lrs x stage 0 off/on, the other init, stage 2
    assert {r["pretrain"] for r in saved["rows"] if r["stage"] == 1} == {False, True}
    assert {r["init"] for r in saved["rows"]} == {"pytorch", "official"}
    choice = saved["choice"]
    assert set(choice) >= {"init", "pretrain", "stage1_lr", "stage2_lr", "rule"}
    validation = sorted((tmp_path / "run" / "sweep" / "ablations").glob("*/seed0/eval/*_val.csv"))
    assert len(validation) == len(saved["rows"]) and not list((tmp_path / "run").rglob("*_test.csv"))
    profile = get_profile("smoke", data_root=str(synth_root), stage1={"iterations": 4}, stage2={"iterations": 3},
                          stage0={"iterations": 3})
    # the fields the sweep chooses may differ from the profile it ran on; every other field may not
    chosen = profile.replace(init=choice["init"], pretrain=choice["pretrain"],
                             stage1={"lr": choice["stage1_lr"]}, stage2={"lr": choice["stage2_lr"]})
    assert read_summary(summary, chosen, chosen=CHOSEN)[1] == []
    assert "spatial_channels" in " ".join(read_summary(summary, chosen.replace(spatial_channels=2), CHOSEN)[1])
    table, kept_choice, note = viz.kept_sweep(summary, chosen)
    assert "STALE" not in note and len(table) == len(saved["rows"]) and kept_choice == choice
    ignored = chosen.replace(stage1={"lr": choice["stage1_lr"] * 2})
    _, _, note = viz.kept_sweep(summary, ignored)
    assert note.startswith("**STALE:**") and "the profile does not use its choice" in note
    assert any("Chosen:" in s for s in viz.sweep_sentences(table, choice))
