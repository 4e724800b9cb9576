"""The data path's benchmark (issue 13): each step in a fresh process, at the smoke size and on the
ReferIt text files in miniature; what it reports is checked against the package's own objects.

Timings are never asserted; sizes, the memory fields' consistency and the files it writes are.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from benchmarks import report, run, suite
from referseg.config import get_profile
from referseg.data.refer import ReferSegDataset, build_vocab, load_refer

pytestmark = pytest.mark.usefixtures("one_thread")

MEASURED = [step for step in suite.DATA_PATH_STEPS if step != "evaluation against boxes"]


@pytest.fixture(scope="module")
def smoke(synth_root, tmp_path_factory) -> dict:
    """One ``data_path_scale`` of the smoke profile on its SynthRef, shared by the tests below."""
    profile = get_profile("smoke", data_root=str(synth_root))
    folder = tmp_path_factory.mktemp("data-path")
    return {"profile": profile, "folder": folder, "result": suite.data_path_scale({"smoke": profile}, folder)}


def check_memory(entry: dict) -> None:
    assert entry["threads"] == 1 and entry["seconds"] >= 0 and entry["cpu_s"] >= 0
    assert entry["imports_mib"] > 0  # torch and the package are imported in the child
    assert entry["imports_mib"] <= entry["prerequisites_mib"] <= entry["peak_mib"]
    if entry["peak_reset"]:  # Linux: the step's own peak, above what the process held at its start
        assert 0 <= entry["step_mib"] <= entry["peak_mib"]


def test_every_step_reports_time_memory_and_sizes(smoke):
    result, profile = smoke["result"], smoke["profile"]
    assert result["steps"] == list(suite.DATA_PATH_STEPS) and result["threads"] == 1
    assert result["failed"] == [] and result["limit_mib"] == 16 * 1024
    data = result["data"]["smoke"]
    assert (data["profile"], data["input_size"], data["grid"]) == ("smoke", profile.input_size, profile.grid)
    steps = data["steps"]
    for step in MEASURED:
        assert steps[step]["step"] == step and "error" not in steps[step], step
        check_memory(steps[step])
    assert steps["evaluation against boxes"]["status"].startswith("not applicable")  # SynthRef gives masks
    largest = max(steps[step]["peak_mib"] for step in MEASURED)
    assert result["largest_peak_mib"] == largest and result["largest_peak"]["data"] == "smoke"
    assert result["fits_16gb"] == (largest <= 16 * 1024)


def test_sizes_are_those_of_the_package_objects(smoke):
    profile = smoke["profile"]
    refer = load_refer(profile)
    vocab = build_vocab(profile, refer)
    train = ReferSegDataset(refer, profile.train_split, vocab, profile)
    test = ReferSegDataset(refer, profile.eval_split, vocab, profile)
    regions = len({p.ann_id for p in train.pairs})
    steps = smoke["result"]["data"]["smoke"]["steps"]
    assert steps["annotations"]["sizes"] == {
        "images": len(refer.images), "train_pairs": len(train), "test_pairs": len(test),
        "train_regions": regions, "test_regions": len({p.ann_id for p in test.pairs})}
    assert steps["vocabulary"]["sizes"] == {"tokens": len(vocab), "source": "built from train"}
    assert steps["tokens"]["sizes"] == {"pairs": len(train), "seq_len": profile.seq_len,
                                        "images": len(train.image_ids), "token_bytes": 8 * len(train) * 20}
    stage1, stage2 = steps["stage-1 targets"]["sizes"], steps["stage-2 targets"]["sizes"]
    assert (stage1["regions"], stage1["label_bytes"]) == (regions, regions * profile.grid ** 2)
    assert not stage1["packed"] and stage2["packed"] and stage2["side"] == profile.input_size
    assert stage2["label_bytes"] == regions * profile.input_size ** 2 // 8  # one bit a pixel
    assert steps["evaluation"]["sizes"]["pairs"] == len(test)
    assert steps["evaluation"]["sizes"]["modes"] == ["logits", "official"]


def test_evaluation_writes_the_per_sample_frame_and_summary(smoke):
    folder = smoke["folder"] / "smoke" / "evaluation" / "run" / "eval"
    frame = pd.read_csv(folder / "whole-image_test.csv")
    summary = json.loads((folder / "whole-image_test.json").read_text())
    sizes = smoke["result"]["data"]["smoke"]["steps"]["evaluation"]["sizes"]
    assert len(frame) == sizes["pairs"] == summary["samples"]
    assert (frame["union"] > 0).all()  # the whole image: every pixel predicted
    assert summary["overall_iou"] == pytest.approx(sizes["overall_iou"])
    assert summary["overall_iou"] == pytest.approx(frame["intersection"].sum() / frame["union"].sum())


def test_referit_text_files_take_every_step_with_boxes(referit_text, tmp_path):
    """The paper profile on the text files in miniature: the boxes' step runs, the labels are at 512."""
    profile = suite.referit_data_profile(referit_text["root"])
    assert (profile.name, profile.dataset, profile.input_size, profile.grid) == ("paper", "referit-text", 512, 16)
    assert profile.vocab_file is None  # the miniature has no vocabulary file: built from trainval
    result = suite.data_path_scale({"ReferIt": profile}, tmp_path)
    steps = result["data"]["ReferIt"]["steps"]
    assert result["failed"] == []
    for step in suite.DATA_PATH_STEPS:
        check_memory(steps[step])
    regions = len(referit_text["queries"]["trainval"])  # each query key is one region
    assert steps["stage-2 targets"]["sizes"]["label_bytes"] == regions * 512 * 512 // 8
    boxes = steps["evaluation against boxes"]["sizes"]
    assert boxes["pairs"] == steps["annotations"]["sizes"]["test_pairs"] == 3
    assert boxes["train_pairs"] == steps["annotations"]["sizes"]["train_pairs"]
    frame = pd.read_csv(tmp_path / "ReferIt" / "evaluation-against-boxes" / "run" / "eval" / "mean-box_test.csv")
    assert len(frame) == 3 and (frame["union"] > 0).all()


def test_report_renders_the_table(smoke):
    results = {"data_path": smoke["result"]}
    lines = report.data_path_lines(results)
    text = "\n".join(lines)
    for step in suite.DATA_PATH_STEPS:
        assert f"| {step} | smoke |" in text, step
    assert "not applicable" in text and "largest peak" in text and "fits a 16 GB machine" in text
    assert "its SynthRef (24 images)" in text
    assert report.data_path_lines({}) == []
    assert report.size(1_622_507_520) == "1.62 GB" and report.mib(3809.03) == "3,809 MiB"


def test_data_path_profiles_in_quick_mode_are_the_smoke_size(tmp_path):
    profiles = run.data_path_profiles(quick=True, out=tmp_path)
    assert list(profiles) == ["smoke"]
    smoke = profiles["smoke"]
    assert smoke.name == "smoke" and Path(smoke.data_root, "synthref", "instances.json").is_file()
