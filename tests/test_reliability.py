"""Safe to load, repeatable to the digit, and clear whatever the user gets wrong (smoke profile).

Each bad input is given to the real command line (``referseg.cli.main``): the test checks
the message, the exit code, that no traceback reaches the user, and that nothing was written
or lost.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import python2_pickle
from PIL import Image

from referseg.baselines import BASELINES, evaluate_all, fit_baseline, run_baseline
from referseg.baselines.common import BaselineSettings
from referseg.cli import main as cli_main
from referseg.config import get_profile
from referseg.data.images import ImageReadError, read_image
from referseg.data.refer import Refer, ReferSegDataset, load_refs_pickle
from referseg.features import FeatureCache
from referseg.runs import LOG, Run, read_checkpoint, read_log, stage_dir
from referseg.text import Vocabulary
from referseg.train import train

pytestmark = pytest.mark.usefixtures("one_thread")
QUICK = BaselineSettings(iterations=30, max_segments=30)


@pytest.fixture(scope="module")
def smoke_run(synth_root, tmp_path_factory) -> Path:
    """A smoke run with both stages trained (a few seconds)."""
    run_dir = tmp_path_factory.mktemp("reliable") / "run"
    profile = get_profile("smoke", data_root=str(synth_root))
    train(profile, 1, run_dir, device="cpu", progress=False)
    train(profile, 2, run_dir, device="cpu", progress=False)
    return run_dir


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = cli_main(args)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def assert_clean_error(code: int, output: str, *fragments: str) -> None:
    assert code == 2, output
    assert "Traceback" not in output
    assert output.strip().splitlines()[-1].startswith("error: ")
    for fragment in fragments:
        assert fragment in output, f"{fragment!r} not in {output!r}"


class Exploit:
    """A pickle payload that would create ``sentinel`` if it ever ran."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


# --- checkpoints are data, never programs ----------------------------------------------------


def malicious_checkpoint(path: Path, sentinel: Path, like: Path) -> Path:
    """A checkpoint that looks like ``like`` but carries an ``os.system`` call in its pickle."""
    state = read_checkpoint(like)
    state["profile"] = dict(state["profile"], note=Exploit(sentinel))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def test_malicious_checkpoint_is_refused_by_predict_evaluate_and_resume(smoke_run, tmp_path, capsys):
    sentinel = tmp_path / "pwned"
    evil_run = tmp_path / "evil-run"
    shutil.copytree(smoke_run, evil_run)
    for stage in (1, 2):
        malicious_checkpoint(stage_dir(evil_run, stage) / "checkpoint.pt", sentinel,
                             stage_dir(smoke_run, stage) / "checkpoint.pt")
    before = {p: p.read_bytes() for p in evil_run.rglob("*.pt")}
    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((40, 50, 3), dtype=np.uint8)).save(image)

    code, out = run_cli(["predict", "--checkpoint", str(evil_run / "stage2" / "checkpoint.pt"), "--image", str(image),
                         "--expression", "sky", "--out", str(tmp_path / "mask.png"), "--device", "cpu"], capsys)
    assert_clean_error(code, out, "was refused", "could run code", "posix.system")
    assert not (tmp_path / "mask.png").exists()
    code, out = run_cli(["evaluate", "--run", str(evil_run), "--device", "cpu"], capsys)
    assert_clean_error(code, out, "was refused")
    config = json.loads((evil_run / "config.json").read_text())
    code, out = run_cli(["train", "--profile", "smoke", "--set", f"data_root={config['data_root']}", "--stage", "1",
                         "--run-dir", str(evil_run), "--resume", "--device", "cpu"], capsys)
    assert_clean_error(code, out, "was refused")
    assert not sentinel.exists()  # nothing ran
    assert before == {p: p.read_bytes() for p in evil_run.rglob("*.pt")}  # nothing was overwritten
    assert not list(evil_run.rglob("*.tmp"))
    # The payload is real: a plain unpickler would run it.
    torch.load(evil_run / "stage1" / "checkpoint.pt", weights_only=False)
    assert sentinel.exists()


def test_checkpoints_load_with_weights_only(smoke_run):
    state = torch.load(smoke_run / "stage1" / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "rng", "shuffle", "profile", "vocab"} <= set(state)
    assert isinstance(state["shuffle"]["pairs"], torch.Tensor)


@pytest.mark.parametrize("content", [b"", b"this is a text file\n", "truncated"])
def test_unreadable_checkpoint_is_a_message(smoke_run, tmp_path, capsys, content):
    bad = tmp_path / "bad.pt"
    data = (smoke_run / "stage1" / "checkpoint.pt").read_bytes()
    bad.write_bytes(data[: len(data) // 2] if content == "truncated" else content)
    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((40, 50, 3), dtype=np.uint8)).save(image)
    code, out = run_cli(["predict", "--checkpoint", str(bad), "--image", str(image), "--expression", "sky",
                         "--out", str(tmp_path / "mask.png"), "--device", "cpu"], capsys)
    assert_clean_error(code, out, str(bad), "cannot be read")
    assert not (tmp_path / "mask.png").exists()


# --- the same numbers whatever ran before ----------------------------------------------------


def test_baseline_alone_equals_inside_the_full_evaluation(smoke_run, tmp_path):
    alone_dir, full_dir = tmp_path / "alone", tmp_path / "full"
    shutil.copytree(smoke_run, alone_dir)
    shutil.copytree(smoke_run, full_dir)
    torch.manual_seed(123)
    torch.rand(1000)  # whatever the global generator holds must not matter
    alone = {}
    for name in BASELINES:
        alone.update(run_baseline(name, alone_dir, device="cpu", run=Run(alone_dir, device="cpu", progress=False),
                                  settings=QUICK))
    evaluate_all(full_dir, device="cpu", progress=False, settings=QUICK)
    for variant, summary in alone.items():
        full = json.loads((full_dir / "eval" / f"{variant}_test.json").read_text())
        for key in ("overall_iou", "mean_iou", "precision@0.5", "by_mode"):
            assert summary[key] == full[key], f"{variant} {key}"
        assert (alone_dir / "eval" / f"{variant}_test.csv").read_text() == \
            (full_dir / "eval" / f"{variant}_test.csv").read_text()


def test_baseline_seeds_change_the_numbers(smoke_run):
    run = Run(smoke_run, device="cpu", progress=False)
    test = run.split("test")

    def logits(seed: int) -> np.ndarray:
        baseline = fit_baseline(run, "per-word", BaselineSettings(iterations=30, seed=seed))
        return np.stack([out["per-word-mean"] for _, out in baseline.predict_logits(test, [0, 1, 2])])

    first, again, other = logits(0), logits(0), logits(1)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_feature_cache_bytes_do_not_depend_on_the_thread_count(synth_root, tmp_path):
    profile = get_profile("smoke", data_root=str(synth_root))
    refer = Refer(synth_root, "synthref", "synth")
    vocab = Vocabulary.build([p.expression for p in refer.pairs("train")])
    dataset = ReferSegDataset(refer, "test", vocab, profile)
    from referseg.runs import FrozenBackbone

    model = FrozenBackbone(profile)
    files = {}
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            cache = FeatureCache(model, dataset, profile, tmp_path / f"threads{count}", progress=False)
            cache.build()
            files[count] = cache.path.read_bytes()
            assert torch.get_num_threads() == count  # restored after the build
    finally:
        torch.set_num_threads(threads)
    assert files[1] == files[2]


# --- profile values are checked before anything is written ----------------------------------


@pytest.mark.parametrize("setting, field", [
    ("stage1.iterations=abc", "stage1.iterations"),
    ("stage1.lr=fast", "stage1.lr"),
    ("stage1.iterations=-5", "stage1.iterations"),
    ("batch_size=0", "batch_size"),
    ("checkpoint_every=0", "checkpoint_every"),
    ("momentum=1.5", "momentum"),
    ("l2_normalize=1", "l2_normalize"),
    ("spatial_channels=3", "spatial_channels"),
])
def test_bad_set_value_is_refused_before_the_run_folder_is_written(tmp_path, capsys, setting, field):
    run_dir = tmp_path / "run"
    code, out = run_cli(["train", "--profile", "smoke", "--set", setting, "--stage", "1", "--run-dir", str(run_dir)],
                        capsys)
    assert_clean_error(code, out, field)
    assert not run_dir.exists()


# --- no traceback for a user's mistake -------------------------------------------------------


def test_unknown_device_is_a_message(smoke_run, capsys):
    code, out = run_cli(["evaluate", "--run", str(smoke_run), "--device", "tpu"], capsys)
    assert_clean_error(code, out, "'tpu'", "auto, cpu or cuda")


def test_run_dir_that_is_a_file_is_a_message(synth_root, tmp_path, capsys):
    not_a_folder = tmp_path / "run"
    not_a_folder.write_text("x")
    code, out = run_cli(["train", "--profile", "smoke", "--set", f"data_root={synth_root}", "--stage", "1",
                         "--run-dir", str(not_a_folder), "--device", "cpu"], capsys)
    assert_clean_error(code, out, str(not_a_folder), "is a file")
    assert not_a_folder.read_text() == "x"


def test_out_that_is_a_folder_is_a_message(smoke_run, tmp_path, capsys):
    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((40, 50, 3), dtype=np.uint8)).save(image)
    folder = tmp_path / "masks.png"
    folder.mkdir()
    code, out = run_cli(["predict", "--checkpoint", str(smoke_run / "stage2" / "checkpoint.pt"), "--image",
                         str(image), "--expression", "sky", "--out", str(folder), "--device", "cpu"], capsys)
    assert_clean_error(code, out, "is a folder")
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("missing", ["height", "segmentation"])
def test_instances_without_a_field_is_a_message(refclef_data, capsys, missing):
    instances = refclef_data["root"] / "refclef" / "instances.json"
    data = json.loads(instances.read_text())
    del (data["images"] if missing == "height" else data["annotations"])[0][missing]
    instances.write_text(json.dumps(data))
    code, out = run_cli(["data", "stats", str(refclef_data["root"]), "--dataset", "refclef"], capsys)
    assert_clean_error(code, out, str(instances), missing)


def test_unsafe_refer_pickle_is_a_message(refclef_data, tmp_path, capsys):
    sentinel = tmp_path / "pwned"
    refs = refclef_data["root"] / "refclef" / "refs(berkeley).p"
    refs.write_bytes(pickle.dumps([{"ref_id": 1, "x": Exploit(sentinel)}], protocol=2))
    code, out = run_cli(["data", "stats", str(refclef_data["root"]), "--dataset", "refclef"], capsys)
    assert_clean_error(code, out, "refs(berkeley).p", "Nothing from it was executed")
    assert not sentinel.exists()


def test_debug_shows_the_traceback(smoke_run, capsys):
    with pytest.raises(ValueError, match="tpu"):
        cli_main(["--debug", "evaluate", "--run", str(smoke_run), "--device", "tpu"])


def test_a_full_disk_is_a_message_and_keeps_the_last_checkpoint(smoke_run, tmp_path):
    """A file-size limit (``ulimit -f``) makes the next checkpoint write fail, as a full disk does."""
    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run, run_dir)
    checkpoint = run_dir / "stage1" / "checkpoint.pt"
    before = checkpoint.read_bytes()
    config = json.loads((run_dir / "config.json").read_text())
    limit = len(before) // 2

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run(
        [sys.executable, "-m", "referseg", "train", "--profile", "smoke", "--set", f"data_root={config['data_root']}",
         "--stage", "1", "--run-dir", str(run_dir), "--device", "cpu"],
        capture_output=True, text=True, preexec_fn=small_files, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "File too large" in result.stderr and "ulimit" in result.stderr
    assert not list(run_dir.rglob("*.tmp"))  # no half-written file left


# --- images: one decoder, one behaviour ----------------------------------------------------------


def test_truncated_jpeg_is_refused_everywhere(smoke_run, tmp_path, capsys):
    good = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(good)
    bad = tmp_path / "cut.jpg"
    bad.write_bytes(good.read_bytes()[:-400])
    with pytest.raises(ImageReadError, match=r"cut\.jpg"):
        read_image(bad)
    code, out = run_cli(["predict", "--checkpoint", str(smoke_run / "stage2" / "checkpoint.pt"), "--image", str(bad),
                         "--expression", "sky", "--out", str(tmp_path / "mask.png"), "--device", "cpu"], capsys)
    assert_clean_error(code, out, "cut.jpg", "truncated")
    assert not (tmp_path / "mask.png").exists()


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    image = read_image(path)
    assert image.dtype == np.uint8 and image.shape == (48, 64, 3)
    np.testing.assert_array_equal(image[..., 0], np.round(values / 257).astype(np.uint8))
    assert abs(float(image.mean()) - 127.5) < 1


def test_huge_image_is_decoded_small(tmp_path):
    path = tmp_path / "huge.jpg"
    Image.new("RGB", (6000, 4000), (10, 200, 30)).save(path, quality=80)
    image = read_image(path, max_side=512)
    assert max(image.shape[:2]) <= 512 and image.shape[1] > image.shape[0]
    assert np.abs(image.astype(int) - (10, 200, 30)).max() < 8


# --- resume and rebuild -------------------------------------------------------------------------


def test_resume_tolerates_a_half_written_log_line_and_removes_stale_temporaries(smoke_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run, run_dir)
    profile = get_profile("smoke", **{k: v for k, v in json.loads((run_dir / "config.json").read_text()).items()
                                      if k == "data_root"})
    log = stage_dir(run_dir, 1) / LOG
    records = read_log(log)
    log.write_text(log.read_text() + '{"iteration": 99, "lo')  # killed in the middle of a write
    stale = stage_dir(run_dir, 1) / ".checkpoint.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert read_log(log) == records
    train(profile, 1, run_dir, resume=True, device="cpu", progress=False)
    assert not stale.exists()
    assert read_log(log) == records


def test_split_test_follows_the_refer_api(make_refer, tmp_path):
    data = make_refer("refcoco", "unc")
    refs_file = data["root"] / "refcoco" / "refs(unc).p"
    refs = load_refs_pickle(refs_file)
    for k, ref in enumerate(r for r in refs if r["split"] == "test"):
        ref["split"] = "testA" if k % 2 == 0 else "testB"
    refs_file.write_bytes(python2_pickle(refs))
    refer = Refer(data["root"], "refcoco", "unc")
    together = refer.pairs("test")
    assert len(together) == data["pairs"]["test"]
    assert len(refer.pairs("testA")) + len(refer.pairs("testB")) == len(together)


def test_baselines_are_reported_over_seeds(smoke_run, tmp_path):
    from referseg.baselines import seed_spread

    run_dir = tmp_path / "run"
    shutil.copytree(smoke_run, run_dir)
    table = seed_spread(Run(run_dir, device="cpu", progress=False), seeds=(0, 1, 2), settings=QUICK)
    assert list(table.columns) == ["seed 0", "seed 1", "seed 2", "mean", "sd"]
    assert len(table) == 5  # the learned baselines' variants: per-word x2, box retrieval x2, proposals
    np.testing.assert_allclose(table["mean"], table[["seed 0", "seed 1", "seed 2"]].mean(axis=1))
    np.testing.assert_allclose(table["sd"], table[["seed 0", "seed 1", "seed 2"]].std(axis=1, ddof=1))
    assert (run_dir / "eval" / "baseline_seeds_test.csv").is_file()


def test_ablation_summary_records_its_provenance_and_knows_when_it_is_stale(synth_root, tmp_path, capsys,
                                                                           monkeypatch):
    from referseg.provenance import read_summary

    monkeypatch.chdir(tmp_path)
    summary = tmp_path / "ablations.json"
    settings = ["--set", f"data_root={synth_root}", "--set", "stage1.iterations=6", "--set", "stage2.iterations=4"]
    code, out = run_cli(["ablations", "--profile", "smoke", *settings, "--seeds", "0", "1", "--variants", "spatial-0",
                         "--run-dir", str(tmp_path / "run"), "--summary", str(summary), "--device", "cpu"], capsys)
    assert code == 0, out
    profile = get_profile("smoke", data_root=str(synth_root), stage1={"iterations": 6}, stage2={"iterations": 4})
    saved, stale = read_summary(summary, profile)
    assert stale == []
    assert saved["seeds"] == [0, 1] and {row["variant"] for row in saved["table"]} == {"reference", "spatial-0"}
    origin = saved["provenance"]
    assert origin["command"] and origin["machine"] and origin["finished_utc"] and origin["seconds"] >= 0
    assert len(origin["code_hash"]) == 64
    _, stale = read_summary(summary, profile.replace(spatial_channels=2))
    assert len(stale) == 1 and "spatial_channels" in stale[0]
    data = json.loads(summary.read_text())
    data["provenance"]["code_hash"] = "0" * 64
    summary.write_text(json.dumps(data))
    _, stale = read_summary(summary, profile)
    assert len(stale) == 1 and "other code" in stale[0]
    assert read_summary(tmp_path / "absent.json", profile) == (None, [])
    # --collect trains nothing: seed 2 has not run, so its rows say so and the table keeps two seeds.
    checkpoints = sorted((tmp_path / "run").rglob("checkpoint.pt"))
    stamps = [p.stat().st_mtime_ns for p in checkpoints]
    code, out = run_cli(["ablations", "--profile", "smoke", *settings, "--seeds", "0", "1", "2", "--variants",
                         "spatial-0", "--run-dir", str(tmp_path / "run"), "--summary", str(summary), "--collect",
                         "--device", "cpu"], capsys)
    assert code == 0, out
    assert sorted((tmp_path / "run").rglob("checkpoint.pt")) == checkpoints
    assert [p.stat().st_mtime_ns for p in checkpoints] == stamps
    collected = json.loads(summary.read_text())
    assert {r["status"] for r in collected["results"] if r["seed"] == 2} == {"skipped: not run"}
    assert {row["seeds"] for row in collected["table"]} == {2}
    from referseg.viz import kept_grid

    table, note = kept_grid(summary, profile)
    assert set(table.index) == {"reference", "spatial-0"} and note.startswith("Full grid") and "STALE" not in note
    table, note = kept_grid(summary, profile.replace(spatial_channels=2))
    assert note.startswith("**STALE:**") and "spatial_channels" in note
    # the summary keeps what the chapters show without the run folders: breakdowns, plans, baseline seeds
    assert set(collected["by_type"]) == {"reference", "spatial-0"} and collected["type_pairs"]
    assert collected["plans"] == {}  # no time-matched variant in this grid
    from referseg.viz import seed_table, verdicts, versus

    seeds, _ = seed_table(summary, profile)
    assert list(seeds.index)[0] == "ours, high resolution" and len(seeds) == 6  # ours and five learned baselines
    assert [c for c in seeds.columns if c.startswith("seed ")] == ["seed 0", "seed 1", "seed 2"]  # --collect's seeds
    assert np.isnan(seeds.loc["ours, high resolution", "seed 2"])  # seed 2 never trained: no number for it
    assert versus((50.0, 0.5), (60.0, 0.5)) == "is below" and versus((50.0, 0.5), (50.5, 0.5)).startswith(
        "is within")
    claims = verdicts(tmp_path / "no-run", profile, summary)
    status = dict(zip(claims["claim"], claims["status"], strict=True))
    assert status["the high-resolution model beats the low-resolution one (Table 1)"] == "not measured in this build"
    assert status["the spatial channels matter (SPEC 4)"] != "not measured in this build"  # spatial-0 ran
    assert status["L2 normalisation matters (SPEC 4)"] == "not measured in this build"  # no-l2-norm did not
    assert "not testable" in status["48.03% overall IoU on ReferIt's test split (Table 1, SPEC 6)"]
