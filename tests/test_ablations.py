"""The ablation grid, its runner (train + evaluate + resume) and the bootstrap intervals, on a tiny SynthRef."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from referseg import ablations
from referseg.ablations import (
    REFERENCE,
    ablation_grid,
    reference_profile,
    run_ablations,
    variant_dir,
)
from referseg.config import get_profile, profile_changes
from referseg.metrics import bootstrap_difference, bootstrap_overall_iou, summarize_with_interval
from referseg.model.segmenter import build_model
from referseg.viz import comparison_table

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def reference(synth_root):
    return reference_profile("smoke", {"data_root": str(synth_root)}, stage1_iterations=6, stage2_iterations=4)


def flatten(overrides: dict) -> dict:
    flat = {}
    for key, value in overrides.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


# --- the grid ---------------------------------------------------------------------------------------


def test_every_variant_differs_from_the_reference_only_in_its_overrides(reference):
    grid = ablation_grid(reference)
    names = [v.name for v in grid]
    assert names[0] == REFERENCE and len(set(names)) == len(names)
    groups = {v.group for v in grid}
    assert {"spatial channels", "L2 normalisation", "text encoder", "low-resolution labels",
            "stage-2 negative weight", "backbone"} <= groups
    for variant in grid:
        profile = variant.profile(reference, seed=reference.seed)
        assert profile_changes(reference, profile) == flatten(variant.overrides)
        assert profile.grid == reference.grid  # the slim VGG-16 keeps the 16 x 16 (here 8 x 8) grid
        # a valid profile: the model builds and maps a batch to the grid
        model = build_model(profile, vocab_size=20).eval()
        tokens = torch.randint(0, 20, (2, profile.seq_len))
        images = torch.zeros(2, 3, profile.input_size, profile.input_size)
        with torch.no_grad():
            assert model(tokens, images=images).shape == (2, profile.grid, profile.grid)


def test_grid_changes_what_the_chapter_says():
    changes = {v.name: flatten(v.overrides) for v in ablation_grid(get_profile("cpu"))}
    assert changes["spatial-2"] == {"spatial_channels": 2} and changes["spatial-0"] == {"spatial_channels": 0}
    assert changes["no-l2-norm"] == {"l2_normalize": False}
    assert changes["bag-of-words"] == {"text_encoder": "bow"}
    assert changes["nearest-labels"] == {"lowres_labels": "nearest"}
    assert changes["neg-weight-1"] == {"stage2.neg_weight": 1.0}
    slim = changes["slim-vgg16-scratch"]
    assert slim["backbone"] == "slim_vgg16" and slim["freeze_backbone"] is False and slim["cache_features"] is False


def test_reference_profile_scales_iterations_and_lr_steps_alike():
    cpu = get_profile("cpu")
    ref = reference_profile("cpu", stage1_iterations=cpu.stage1.iterations // 5,
                            stage2_iterations=cpu.stage2.iterations // 2)
    assert ref.stage1.iterations == cpu.stage1.iterations // 5
    assert ref.stage1.lr_step / ref.stage1.iterations == pytest.approx(cpu.stage1.lr_step / cpu.stage1.iterations,
                                                                       rel=0.01)
    assert ref.stage2.lr_step / ref.stage2.iterations == pytest.approx(cpu.stage2.lr_step / cpu.stage2.iterations,
                                                                       rel=0.01)
    assert profile_changes(cpu, ref).keys() == {"stage1.iterations", "stage1.lr_step", "stage2.iterations",
                                                "stage2.lr_step"}
    with pytest.raises(ValueError, match="at least 1"):
        reference_profile("cpu", stage1_iterations=0)


# --- the runner -------------------------------------------------------------------------------------


def test_runner_trains_evaluates_and_reuses_finished_variants(reference, tmp_path):
    grid = {v.name: v for v in ablation_grid(reference)}
    variants = [grid[REFERENCE], grid["spatial-0"], grid["slim-vgg16-scratch"]]
    run_dir = tmp_path / "runs" / "smoke"
    results = run_ablations(reference, variants, run_dir, seeds=(0,), stages=(1,), device="cpu", resamples=200,
                            probe_iterations=3, progress=False)
    assert results["status"].tolist() == ["trained"] * 3
    assert results["variant"].tolist() == [REFERENCE, "slim-vgg16-scratch", "spatial-0"]  # time-matched 2nd
    assert results.set_index("variant").loc[[REFERENCE, "spatial-0"], "iterations"].tolist() == ["6", "6"]
    for column in ("overall_iou", "ci_low", "ci_high"):
        assert results[column].between(0, 1).all()
    assert (results["ci_low"] <= results["overall_iou"] + 1e-12).all()
    assert (results["overall_iou"] <= results["ci_high"] + 1e-12).all()

    # the files: per-run result and samples, the table, shared features, the slim plan
    for name in (REFERENCE, "spatial-0"):
        folder = variant_dir(run_dir, name, 0)
        saved = json.loads((folder / "result-stage1.json").read_text())
        assert saved["profile"]["spatial_channels"] == (0 if name == "spatial-0" else 8)
        assert (folder / saved["samples_csv"]).is_file()
        assert (folder / "features").is_symlink()
    assert list((run_dir / "features").glob("*.npy")), "the variants share the run's feature cache"
    table = json.loads((run_dir / "ablations" / "results.json").read_text())
    assert [row["variant"] for row in table["rows"]] == [REFERENCE, "slim-vgg16-scratch", "spatial-0"]
    plan = json.loads((run_dir / "ablations" / "slim-vgg16-scratch" / "plan-seed0.json").read_text())
    assert plan["iterations"]["1"] >= 3 and plan["seconds_per_iteration"]["1"] > 0
    assert results.set_index("variant").loc["slim-vgg16-scratch", "iterations"] == str(plan["iterations"]["1"])

    # re-running reuses every finished run (same numbers, checkpoints untouched)
    checkpoint = variant_dir(run_dir, "spatial-0", 0) / "stage1" / "checkpoint.pt"
    mtime = checkpoint.stat().st_mtime_ns
    again = run_ablations(reference, variants, run_dir, seeds=(0,), stages=(1,), device="cpu", resamples=200,
                          probe_iterations=3, progress=False)
    assert again["status"].tolist() == ["reused"] * 3
    assert np.allclose(again["overall_iou"], results["overall_iou"])
    assert checkpoint.stat().st_mtime_ns == mtime

    # changed settings retrain that run in place (its folder belongs to the runner)
    shorter = reference.replace(stage1={"iterations": 5})
    changed = run_ablations(shorter, [grid[REFERENCE]], run_dir, seeds=(0,), stages=(1,), device="cpu",
                            resamples=50, progress=False)
    assert changed["status"].tolist() == ["trained"] and changed["iterations"].tolist() == ["5"]
    saved = json.loads((variant_dir(run_dir, REFERENCE, 0) / "result-stage1.json").read_text())
    assert saved["profile"]["stage1"]["iterations"] == 5
    run_ablations(reference, [grid[REFERENCE]], run_dir, seeds=(0,), stages=(1,), device="cpu", resamples=200,
                  progress=False)  # back to the grid's reference for the comparison below

    # the comparison: paired differences to the reference
    compared = comparison_table(run_dir, again, reference, resamples=200)
    assert list(compared.index) == [REFERENCE, "slim-vgg16-scratch", "spatial-0"]
    row = compared.loc["spatial-0"]
    assert row["Δ all low"] <= row["Δ all"] <= row["Δ all high"]
    assert row["Δ all"] == pytest.approx(row["overall IoU"] - compared.loc[REFERENCE, "overall IoU"])


def test_runner_skips_what_the_budget_or_the_stages_do_not_allow(reference, tmp_path):
    grid = {v.name: v for v in ablation_grid(reference)}
    variants = [grid[REFERENCE], grid["neg-weight-1"], grid["bag-of-words"]]
    results = run_ablations(reference, variants, tmp_path / "run", seeds=(0,), stages=(1,), device="cpu",
                            budget_s=0, resamples=50, progress=False)
    status = dict(zip(results["variant"], results["status"], strict=True))
    assert status[REFERENCE] == "trained"  # the first run always runs: nothing to judge the budget by yet
    assert status["neg-weight-1"] == "skipped: needs stage 2"
    assert status["bag-of-words"].startswith("skipped: budget")
    with pytest.raises(ValueError, match="'reference' among them"):
        run_ablations(reference, [grid["bag-of-words"]], tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="give unique names"):
        run_ablations(reference, [grid[REFERENCE], grid["bag-of-words"], grid["bag-of-words"]], tmp_path / "run",
                      progress=False)


# --- bootstrap confidence intervals --------------------------------------------------------------


def synthetic_counts(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    unions = rng.integers(100, 1000, size=n)
    intersections = (unions * rng.beta(2, 2, size=n)).astype(np.int64)
    return intersections, unions


def test_bootstrap_interval_contains_the_estimate_and_shrinks_with_more_samples():
    small = bootstrap_overall_iou(*synthetic_counts(40, 0), resamples=500)
    large = bootstrap_overall_iou(*synthetic_counts(4000, 0), resamples=500)
    for estimate, low, high in (small, large):
        assert low <= estimate <= high
    assert (large[2] - large[1]) < 0.5 * (small[2] - small[1])  # ~ 1/sqrt(n): 10x narrower in theory
    inter, union = synthetic_counts(40, 0)
    assert small[0] == pytest.approx(inter.sum() / union.sum())
    assert bootstrap_overall_iou(inter, union, resamples=500) == small  # seeded: reproducible


def test_bootstrap_of_a_constant_iou_has_no_width_and_identical_methods_no_difference():
    unions = np.arange(10, 60)
    estimate, low, high = bootstrap_overall_iou(unions * 0.25, unions, resamples=200)
    assert estimate == low == high == pytest.approx(0.25)
    inter, union = synthetic_counts(100, 1)
    assert bootstrap_difference(inter, union, inter, union, resamples=200) == (0.0, 0.0, 0.0)


def test_bootstrap_difference_is_paired_and_sees_a_consistent_improvement():
    inter, union = synthetic_counts(300, 2)
    better = np.minimum(inter + union // 20, union)  # every sample a little better
    diff, low, high = bootstrap_difference(better, union, inter, union, resamples=500)
    assert 0 < low <= diff <= high
    assert diff == pytest.approx(better.sum() / union.sum() - inter.sum() / union.sum())
    # unpaired noise would swamp a 5-point gain on 300 samples; the paired interval does not include 0
    _, low_single, high_single = bootstrap_overall_iou(inter, union, resamples=500)
    assert high - low < high_single - low_single


def test_bootstrap_over_seeds_averages_runs_on_the_same_samples():
    inter_a, union = synthetic_counts(200, 3)
    inter_b = (inter_a * 0.5).astype(np.int64)
    estimate, low, high = bootstrap_overall_iou(np.stack([inter_a, inter_b]), np.stack([union, union]),
                                                resamples=300)
    assert estimate == pytest.approx((inter_a.sum() + inter_b.sum()) / 2 / union.sum())
    assert low <= estimate <= high
    with pytest.raises(ValueError, match="same test samples"):
        bootstrap_difference(inter_a, union, inter_a[:10], union[:10])


def test_summaries_split_position_expressions_from_the_others():
    import pandas as pd

    frame = pd.DataFrame({"intersection": [5, 0, 10, 3], "union": [10, 10, 10, 6],
                          "type": ["position", "superlative", "colour", "stuff"]})
    frame["iou"] = frame["intersection"] / frame["union"]
    summary = summarize_with_interval(frame, ablations.position_subsets(), resamples=100)
    assert summary["position_iou"] == pytest.approx(5 / 20)
    assert summary["other_iou"] == pytest.approx(13 / 16)
    assert summary["overall_iou"] == pytest.approx(18 / 36)
    assert summary["mean_iou"] == pytest.approx(np.mean([0.5, 0.0, 1.0, 0.5]))
