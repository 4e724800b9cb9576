"""The benchmark suite (``make bench``) at a tiny size: every benchmark runs and reports what it measured.

Timings are never asserted; what is checked is what can be wrong: FLOP counts against the
SPEC 4 architecture, the feature cache's file at its per-image shape, consistency of the
reported ratios, papermill metadata parsing, and the GPU code path (run here on the CPU).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import report, run, suite
from benchmarks.machine import matmul_peak
from referseg.data.refer import ReferSegDataset, build_vocab, load_refer
from referseg.model.backbones import VGG16_LAYOUT, slim_widths


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> dict:
    """One ``python -m benchmarks.run --quick`` (one thread), shared by the tests below."""
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    try:
        code = run.main(["--quick", "--threads", "1", "--out", str(out), "--no-book"])
    finally:
        torch.set_num_threads(threads)
    results = json.loads((out / "latest.json").read_text())
    return {"code": code, "out": out, "results": results, "page": (out / "latest.md").read_text()}


def tiny_paper():
    return run.bench_profiles(quick=True)["paper"]


def test_quick_run_succeeds_and_writes_json_and_markdown(quick):
    assert quick["code"] == 0
    results = quick["results"]
    assert results["errors"] == []
    assert results["machine"]["cpu"] and results["machine"]["torch"] == torch.__version__
    assert len(results["load_average"]["start"]) == 3 and len(results["load_average"]["end"]) == 3
    for key in ("peak", "backbone_configurations", "training_step", "stage1_cache", "inference", "evaluation",
                "evaluation_forward", "backbone_build", "synthref", "feature_cache", "gpu", "notebooks"):
        assert key in results and "error" not in results[key], key
    stamped = [p.name for p in quick["out"].glob("bench-*.json")]
    assert len(stamped) == 1 and (quick["out"] / stamped[0].replace(".json", ".md")).is_file()
    assert not (quick["out"] / "scratch").exists()  # run folders and caches are removed


def test_markdown_names_the_machine_and_every_benchmark(quick):
    page = quick["page"]
    assert quick["results"]["machine"]["cpu"] in page and str(quick["results"]["load_average"]["start"]) in page
    for label in ("matmul peak", "training step, `paper`", "training step, `cpu`", "speed-up of the cache",
                  "peak memory of training", "inference latency, `paper`", "inference latency, `cpu`",
                  "evaluation throughput", "evaluation forward", "backbone build", "SynthRef generation",
                  "feature cache at paper scale", "GPU training", "notebooks"):
        assert label in page, label
    if not torch.cuda.is_available():
        assert "not measured (no GPU)" in page
    assert not page.startswith("#")  # included under a heading of the book's page


def test_training_step_figures_are_consistent(quick):
    results = quick["results"]
    for name, step in results["training_step"].items():
        assert step["flops"] == sum(step["flop_parts"].values()), name
        assert step["flops_per_s"] == pytest.approx(step["flops"] / step["step_s"])
        assert step["of_peak"] == pytest.approx(step["flops_per_s"] / results["peak"]["flops_per_s"])
        assert len(step["steps_s"]) == step["steps"]
    best = max(results["backbone_configurations"]["results"], key=run.configuration_speed)
    paper = results["training_step"]["paper"]
    # The step runs in the model's own layouts (the trainer's), with the convolutions' best oneDNN setting;
    # both layouts of each part are measured beside it.
    assert (paper["memory_format"], paper["mkldnn"]) == ("model", best["mkldnn"])
    heads = results["head_configurations"]["results"]
    assert [h["memory_format"] for h in heads] == ["contiguous", "channels_last"]
    assert all(h["flops"] > 0 and h["flops_per_s"] == pytest.approx(h["flops"] / h["seconds"]) for h in heads)


def vgg_conv_flops(widths: tuple[int, ...], size: int, batch: int) -> int:
    """Forward FLOPs of conv1_1..conv5_3 (3x3, pad 1) from the VGG-16 layout (SPEC 4)."""
    total, channels, side, stage = 0, 3, size, 0
    for entry in VGG16_LAYOUT:
        if entry == "M":
            side //= 2
            stage += 1
            continue
        total += 2 * batch * side * side * widths[stage] * channels * 9
        channels = widths[stage]
    return total


def test_step_flops_match_the_architecture():
    profile = tiny_paper()
    flops = suite.step_flops(profile, vocab_size=50)
    parts, b, g = flops["parts"], profile.batch_size, profile.grid
    widths = slim_widths(profile.width_mult)
    assert parts["frozen convolutions"] == vgg_conv_flops(widths, profile.input_size, b)  # forward only
    fc6_forward = 2 * b * g * g * profile.d_fc * widths[-1] * profile.fc6_kernel**2
    assert parts["fc6"] == 2 * fc6_forward  # forward + weight gradient: its input needs no gradient
    assert parts["fc7"] == 3 * 2 * b * g * g * profile.d_fc**2  # forward + both gradients
    assert flops["trainable"] == flops["total"] - parts["frozen convolutions"]
    high = suite.step_flops(profile, vocab_size=50, high_res=True)
    assert high["parts"]["upsampling"] > 0 and "upsampling" not in parts


def test_cache_speedup_comes_from_the_trainers_logs(quick):
    cache = quick["results"]["stage1_cache"]
    sizes = quick["results"]["sizes"]
    for label in ("with cache", "without cache"):
        entry = cache["runs"][label]
        assert len(entry["step_s"]) == sizes["cache_steps"]  # log_every=1: one record per step
        assert entry["timed_steps"] == sizes["cache_steps"] - sizes["cache_skip"]
        assert entry["max_rss_mib"] >= entry["max_rss_after_imports_mib"] > 0
    runs = cache["runs"]
    assert cache["speedup"] == pytest.approx(runs["without cache"]["median_step_s"] / runs["with cache"]["median_step_s"])


def test_feature_cache_file_at_the_profiles_shape(quick):
    features = quick["results"]["feature_cache"]
    profile = tiny_paper()
    channels = slim_widths(profile.width_mult)[-1]
    per_image = channels * profile.grid * profile.grid * 2  # float16
    assert features["shape"] == [features["images"], channels, profile.grid, profile.grid]
    assert features["dtype"] == "float16" and features["memory_mapped"] and features["valid_on_reload"]
    assert features["bytes_per_image"] == per_image
    assert features["file_bytes"] >= features["images"] * per_image
    assert features["max_relative_error"] < 1e-2
    assert features["projected_bytes"] == features["training_images"] * per_image
    assert features["projected_build_s"] == pytest.approx(features["training_images"] / features["images_per_s"])


def test_inference_and_evaluation_report_their_sizes(quick):
    results = quick["results"]
    for name, latency in results["inference"].items():
        side = run.bench_profiles(quick=True)[name].input_size
        assert latency["image"] == f"{side}x{side}" and latency["mask_shape"] == [side, side]
        assert latency["best_s"] <= latency["median_s"]
    evaluation = results["evaluation"]
    assert evaluation["samples"] == results["sizes"]["eval_samples"]
    assert evaluation["referit_test_s"] == pytest.approx(evaluation["referit_test_pairs"] / evaluation["samples_per_s"])


def test_forward_build_and_generation_report_what_they_measured(quick):
    results = quick["results"]
    forward = results["evaluation_forward"]
    assert forward["pairs"] == forward["images"] * forward["pairs_per_image"] == 2 * 8
    assert forward["speedup"] == pytest.approx(forward["per_pair_s"] / forward["per_image_s"])
    assert forward["max_difference"] < 1e-5 and (forward["max_difference"] == 0) == forward["identical"]
    build = results["backbone_build"]
    assert build["backbone"] == "efficientnet_lite0" and build["first_s"] > 0 and build["later_s"] > 0
    synthref = results["synthref"]
    assert synthref["images"] == results["sizes"]["synth_generated"]
    assert synthref["cpu_profile_s"] == pytest.approx(600 / synthref["images_per_s"])


def test_referit_facts_come_from_the_official_files(official_referit):
    count, source = suite.referit_training_images()
    listed = (official_referit / "referit_trainval_imlist.txt").read_text().split()
    assert count == len(listed) and "official" in source
    sizes = json.loads((official_referit / "referit_imsize.json").read_text())
    first = (official_referit / "referit_test_imlist.txt").read_text().split()[0]
    width, height = sizes[f"{first}.jpg"]
    assert suite.referit_sizes(3)[0] == (height, width)
    assert len(suite.official_vocabulary()) == len(
        (official_referit / "vocabulary_referit.txt").read_text().splitlines())


def write_executed(path: Path, seconds: float | None, profile: str) -> None:
    papermill = {"duration": seconds, "parameters": {"profile": profile}, "exception": None,
                 "end_time": "2026-01-01T00:00:00+00:00"}
    path.write_text(json.dumps({"cells": [], "metadata": {"papermill": papermill}, "nbformat": 4,
                                "nbformat_minor": 5}))


def test_notebook_times_read_papermill_metadata(tmp_path):
    assert suite.notebook_times(tmp_path)["status"].startswith("not measured")
    write_executed(tmp_path / "01_data.ipynb", 12.5, "cpu")
    write_executed(tmp_path / "02_visual.ipynb", 30.0, "cpu")
    write_executed(tmp_path / "03_unexecuted.ipynb", None, "cpu")  # no duration: skipped
    times = suite.notebook_times(tmp_path)
    assert [row["notebook"] for row in times["notebooks"]] == ["01_data", "02_visual"]
    assert times["total_s"] == pytest.approx(42.5)
    assert times["cpu_book"] and times["within_budget"]
    write_executed(tmp_path / "04_long.ipynb", suite.CPU_BOOK_BUDGET_S, "cpu")
    assert not suite.notebook_times(tmp_path)["within_budget"]
    write_executed(tmp_path / "05_smoke.ipynb", 1.0, "smoke")
    mixed = suite.notebook_times(tmp_path)
    assert mixed["profiles"] == ["cpu", "smoke"] and not mixed["cpu_book"]


def test_the_book_s_time_is_its_build_s_wall_clock_when_one_build_ran_every_notebook(tmp_path):
    from referseg.book import BUILD_RECORD

    write_executed(tmp_path / "01_data.ipynb", 40.0, "cpu")
    write_executed(tmp_path / "02_text.ipynb", 30.0, "cpu")  # ran beside 01
    record = {"jobs": 2, "wall_s": 41.5, "executed": ["01_data", "02_text"], "skipped": []}
    (tmp_path / BUILD_RECORD).write_text(json.dumps(record))
    times = suite.notebook_times(tmp_path)
    assert times["total_s"] == pytest.approx(41.5) and times["notebook_s"] == pytest.approx(70.0)
    assert times["jobs"] == 2 and times["measured"].startswith("wall clock of one build")
    (tmp_path / BUILD_RECORD).write_text(json.dumps({**record, "executed": ["02_text"], "skipped": ["01_data"]}))
    partial = suite.notebook_times(tmp_path)  # 01's time comes from an earlier build: no wall clock
    assert partial["total_s"] == pytest.approx(70.0) and partial["jobs"] is None


def test_gpu_code_path_runs_on_the_cpu(quick):
    """channels_last, bf16 autocast, a loader with a worker over pre-resized uint8 images (on the CPU here)."""
    profile = tiny_paper()
    images = quick["results"]["sizes"]["synth_images"]
    synth = profile.replace(dataset="synthref", data_root=str(quick["out"] / "data" / f"synthref-{images}"),
                            synth_images=images, train_split="train")
    refer = load_refer(synth)
    vocab = build_vocab(synth, refer)
    dataset = ReferSegDataset(refer, "train", vocab, synth)
    data = suite.pre_resized(dataset, 12)
    sample = data[0]
    assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (3, synth.input_size, synth.input_size)
    assert set(np.unique(data.masks)) <= {0, 1}
    result = suite.gpu_training(synth, data, len(vocab), steps=1, warmup=1, device="cpu", num_workers=1,
                                training_images=100)
    assert set(result["timings"]) == {"stage1 images", "stage1 cached", "stage2 images", "stage2 cached"}
    assert not result["pinned_memory"] and result["autocast"] == "bfloat16"
    timings = result["timings"]
    expected = (synth.stage1.iterations * timings["stage1 cached"]["step_s"]
                + synth.stage2.iterations * timings["stage2 cached"]["step_s"]
                + 100 / result["cache_build_images_per_s"])
    assert result["projected_schedule_s"]["cached"] == pytest.approx(expected)


def test_matmul_peak_reports_each_size():
    peak = matmul_peak("cpu", sizes=(64, 128), repeats=1)
    assert set(peak["per_size"]) == {"64", "128"} and peak["dtype"] == "float32"
    assert peak["flops_per_s"] == max(peak["per_size"].values())


def test_report_formats_units():
    assert report.seconds(0.0123) == "12.3 ms" and report.seconds(4.56) == "4.56 s"
    assert report.seconds(754) == "12.6 min" and report.seconds(9000) == "2.5 h"
    assert report.flops(3.0e12) == "3 TFLOP" and report.flops(8.5e10, per_second=True) == "85 GFLOP/s"


def test_render_rewrites_the_tables_of_a_results_file(quick, tmp_path):
    book = tmp_path / "book.md"
    assert run.main(["--render", str(quick["out"] / "latest.json"), "--out", str(tmp_path), "--book", str(book)]) == 0
    assert (tmp_path / "latest.md").read_text() == quick["page"]
    assert not book.exists()  # a quick run never becomes the book's table
