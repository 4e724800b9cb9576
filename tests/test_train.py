"""The two-stage trainer and the feature cache on a tiny SynthRef (smoke profile, seconds)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from referseg.config import get_profile
from referseg.data.refer import ReferSegDataset, build_vocab, load_refer
from referseg.features import FeatureCache
from referseg.losses import weighted_sigmoid_ce
from referseg.model.segmenter import build_model
from referseg.runs import SplitData, build_targets, read_checkpoint, read_log
from referseg.text import Vocabulary
from referseg.train import BatchOrder, TrainingDivergedError, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def stage1_run(synth_root, tmp_path_factory) -> Path:
    """A finished stage-1 smoke run; tests copy it rather than train stage 1 again."""
    run_dir = tmp_path_factory.mktemp("stage1") / "run"
    run(get_profile("smoke", data_root=str(synth_root)), 1, run_dir)
    return run_dir


def copy_run(run_dir: Path, to: Path) -> Path:
    shutil.copytree(run_dir, to)
    return to


@pytest.fixture
def smoke(synth_root):
    def make(**overrides):
        return get_profile("smoke", data_root=str(synth_root), **overrides)

    return make


def run(profile, stage, run_dir, **kwargs) -> Path:
    return train(profile, stage, run_dir, device="cpu", progress=False, **kwargs)


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(checkpoint)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


def full_training_loss(checkpoint: Path, stage: int) -> float:
    """The stage's loss over every training pair, from the run's own feature cache."""
    state = read_checkpoint(checkpoint)
    from referseg.config import Profile

    profile = Profile.from_dict(state["profile"])
    vocab = Vocabulary(state["vocab"])
    model = build_model(profile, len(vocab))
    model.load_state_dict(state["model"])
    model.eval()
    dataset = ReferSegDataset(load_refer(profile), profile.train_split, vocab, profile)
    targets = build_targets(dataset, stage, progress=False)
    cache = FeatureCache(model, dataset, profile, checkpoint.parents[1] / "features", progress=False).load()
    config = profile.stage1 if stage == 1 else profile.stage2
    pairs = np.arange(len(dataset))
    with torch.no_grad():
        features = torch.from_numpy(np.asarray(cache[dataset.pair_image[pairs]], dtype=np.float32))
        logits = model(dataset.tokens[pairs], features=features, high_res=stage == 2)
        return float(weighted_sigmoid_ce(logits, targets.batch_labels(pairs), config.pos_weight, config.neg_weight))


# --- run folder, log and checkpoint contents ----------------------------------------


def test_stage1_writes_config_vocab_log_and_a_complete_checkpoint(smoke, stage1_run):
    profile = smoke()
    path = stage1_run / "stage1" / "checkpoint.pt"
    assert json.loads((stage1_run / "config.json").read_text()) == json.loads(json.dumps(profile.to_dict()))
    vocab = Vocabulary.load(stage1_run / "vocab.txt")
    state = read_checkpoint(path)
    assert state["iteration"] == profile.stage1.iterations and state["finished"]
    assert state["vocab"] == vocab.tokens
    assert "upsample.weight" in state["model"]
    assert isinstance(state["rng"]["torch"], torch.Tensor)  # generator states as tensors (weights_only loading)
    assert len(state["shuffle"]["pairs"]) == len(ReferSegDataset(load_refer(profile), "train", vocab, profile))
    assert state["optimizer"]["state"], "the optimizer's momentum buffers are saved"
    log = read_log(stage1_run / "stage1" / "log.jsonl")
    assert [r["iteration"] for r in log] == [1, 5, 10, 15, 20]
    assert {"iteration", "loss", "lr", "pairs_per_s", "elapsed"} <= set(log[0])
    # SPEC 5 step schedule: lr x0.1 every lr_step iterations
    assert log[0]["lr"] == pytest.approx(profile.stage1.lr)
    assert log[-1]["lr"] == pytest.approx(profile.stage1.lr * 0.1)


def test_targets_match_the_dataset_samples(smoke):
    profile = smoke()
    refer = load_refer(profile)
    vocab = build_vocab(profile, refer)
    dataset = ReferSegDataset(refer, "train", vocab, profile)
    low = build_targets(dataset, 1, progress=False)
    high = build_targets(dataset, 2, progress=False)
    picks = np.array([0, len(dataset) // 2, len(dataset) - 1])
    for k, i in enumerate(picks):
        sample = dataset[int(i)]
        assert torch.equal(dataset.tokens[i], sample["tokens"])
        assert dataset.pair_image[i] == sample["image_index"]
        assert torch.equal(low.batch_labels(picks)[k], sample["lowres"])
        assert torch.equal(high.batch_labels(picks)[k], sample["mask"])
    # the split's view computes each stage's labels once and gives the same rows
    data = SplitData(dataset)
    assert data.labels(1, progress=False) is data.labels(1, progress=False)
    assert torch.equal(data.labels(1, progress=False).batch_labels(picks), low.batch_labels(picks))
    assert torch.equal(data.labels(2, progress=False).batch_labels(picks), high.batch_labels(picks))


def test_batch_order_covers_every_pair_each_epoch_in_a_new_order():
    order = BatchOrder(num_pairs=23, batch_size=5, seed=0, stage=1)
    assert order.num_batches == 5
    epoch0 = [tuple(order.batch(i)) for i in range(5)]
    epoch1 = [tuple(order.batch(i)) for i in range(5, 10)]
    assert set(np.concatenate(epoch0)) == set(range(23))  # the last batch wraps around
    assert sorted(epoch0) == sorted(epoch1)  # the same fixed batches (shuffled once) ...
    assert any(order.batch(i).tolist() != order.batch(i + 5).tolist() for i in range(5))  # ... in a new order
    again = BatchOrder(num_pairs=23, batch_size=5, seed=0, stage=1)
    assert [tuple(again.batch(i)) for i in range(10)] == epoch0 + epoch1


# --- the feature cache ------------------------------------------------------------------


def test_feature_cache_is_reused_and_invalidated_by_preprocessing(smoke, tmp_path):
    profile = smoke()
    refer = load_refer(profile)
    vocab = build_vocab(profile, refer)
    dataset = ReferSegDataset(refer, "val", vocab, profile)
    torch.manual_seed(0)
    model = build_model(profile, len(vocab))
    cache = FeatureCache(model, dataset, profile, tmp_path / "features", dtype="float32", progress=False)
    features = cache.load()
    assert features.shape[0] == len(dataset.image_ids)
    direct = model.backbone_features(dataset.image_tensor(1)[None])[0].numpy()
    np.testing.assert_allclose(features[1], direct, rtol=1e-4, atol=1e-5)
    mtime = cache.path.stat().st_mtime_ns
    again = FeatureCache(model, dataset, profile, tmp_path / "features", dtype="float32", progress=False)
    assert again.is_valid() and isinstance(again.load(), np.memmap)
    assert cache.path.stat().st_mtime_ns == mtime, "a matching cache is memory-mapped, not rebuilt"
    other = profile.replace(pixel_mean=(0.0, 0.0, 0.0))
    changed = FeatureCache(model, ReferSegDataset(refer, "val", vocab, other), other, tmp_path / "features",
                           dtype="float32", progress=False)
    assert changed.path != cache.path and not changed.is_valid()
    assert not np.allclose(changed.load(), features)
    half = FeatureCache(model, dataset, profile, tmp_path / "features", progress=False)
    assert half.load().dtype == np.float16 and half.path != cache.path


def test_compute_features_equal_the_cache_and_restore_the_model_mode(smoke, tmp_path):
    from referseg.features import compute_features, feature_batches

    profile = smoke()
    refer = load_refer(profile)
    dataset = ReferSegDataset(refer, "val", build_vocab(profile, refer), profile)
    torch.manual_seed(0)
    model = build_model(profile, len(dataset.vocab)).train()
    direct = compute_features(model, dataset, batch_size=3)
    assert model.training, "the model's mode is restored after the pass"
    count = len(dataset.image_ids)
    assert direct.dtype == np.float32 and direct.shape[0] == count
    spans = [(start, stop) for start, stop, _ in feature_batches(model, dataset, batch_size=1)]
    assert spans == [(i, i + 1) for i in range(count)]
    cached = FeatureCache(model, dataset, profile, tmp_path / "features", dtype="float32", progress=False).load()
    np.testing.assert_allclose(cached, direct, rtol=1e-5, atol=1e-6)


def test_cached_and_uncached_features_give_the_same_loss(smoke, tmp_path):
    cached = run(smoke(), 1, tmp_path / "cached", stop_after=3, feature_dtype="float32")
    direct = run(smoke(cache_features=False), 1, tmp_path / "direct", stop_after=3)
    assert not (tmp_path / "direct" / "features").exists()
    cached_log = read_log(cached.parent / "log.jsonl")
    direct_log = read_log(direct.parent / "log.jsonl")
    assert [r["iteration"] for r in cached_log] == [r["iteration"] for r in direct_log] == [1]
    assert cached_log[0]["loss"] == pytest.approx(direct_log[0]["loss"], rel=1e-5)
    # and the same steps: the weights agree after three of them
    for name, tensor in weights(cached).items():
        torch.testing.assert_close(tensor, weights(direct)[name], rtol=1e-3, atol=1e-5)


# --- determinism: seed and resume -----------------------------------------------------


def test_a_fixed_seed_repeats_a_cpu_run_and_another_seed_does_not(smoke, tmp_path):
    first = run(smoke(), 1, tmp_path / "a", stop_after=6)
    second = run(smoke(), 1, tmp_path / "b", stop_after=6)
    assert_same_weights(weights(first), weights(second))
    other = run(smoke(seed=1), 1, tmp_path / "c", stop_after=6)
    assert not torch.equal(weights(first)["classifier.0.weight"], weights(other)["classifier.0.weight"])


@pytest.mark.parametrize("stage", [1, 2])
def test_resume_ends_with_the_same_weights_as_an_uninterrupted_run(smoke, tmp_path, stage, stage1_run):
    profile = smoke()
    if stage == 2:
        copy_run(stage1_run, tmp_path / "straight")
        copy_run(stage1_run, tmp_path / "resumed")
    total = getattr(profile, f"stage{stage}").iterations
    straight = run(profile, stage, tmp_path / "straight")
    interrupted = run(profile, stage, tmp_path / "resumed", stop_after=total // 2 + 1)
    assert read_checkpoint(interrupted)["iteration"] == total // 2 + 1
    assert not read_checkpoint(interrupted)["finished"]
    resumed = run(profile, stage, tmp_path / "resumed", resume=True)
    assert read_checkpoint(resumed)["iteration"] == total
    assert_same_weights(weights(straight), weights(resumed))
    a, b = read_checkpoint(straight)["optimizer"]["state"], read_checkpoint(resumed)["optimizer"]["state"]
    assert all(torch.equal(a[k]["momentum_buffer"], b[k]["momentum_buffer"]) for k in a)
    straight_log = read_log(straight.parent / "log.jsonl")
    resumed_log = read_log(resumed.parent / "log.jsonl")
    assert [r["iteration"] for r in resumed_log] == [r["iteration"] for r in straight_log]


def test_resume_without_a_checkpoint_is_a_clear_error(smoke, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run(smoke(), 1, tmp_path / "run", resume=True)


# --- failures ------------------------------------------------------------------------------


def test_a_diverging_loss_stops_and_keeps_the_last_good_checkpoint(smoke, tmp_path, monkeypatch):
    # lr 0.01 for 5 iterations, then x1e10 every 5: a good checkpoint at 5, then divergence.
    # (A profile may not raise its learning rate, lr_gamma <= 1, so the schedule itself is replaced.)
    from referseg import train as trainer

    monkeypatch.setattr(trainer, "learning_rate", lambda config, iteration: config.lr * 1e10 ** (iteration // 5))
    profile = smoke(checkpoint_every=5)
    with pytest.raises(TrainingDivergedError, match="NaN or infinite|became (nan|inf)") as error:
        run(profile, 1, tmp_path / "run")
    checkpoint = tmp_path / "run" / "stage1" / "checkpoint.pt"
    assert str(checkpoint) in str(error.value) and "learning rate" in str(error.value)
    state = read_checkpoint(checkpoint)
    assert 5 <= state["iteration"] < error.value.iteration
    assert not state["finished"]
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_stage2_refuses_to_start_without_stage1(smoke, tmp_path):
    with pytest.raises(FileNotFoundError, match="train stage 1 first: referseg train --profile smoke --stage 1"):
        run(smoke(), 2, tmp_path / "run")


def test_stage2_refuses_an_unfinished_stage1(smoke, tmp_path):
    run(smoke(), 1, tmp_path / "run", stop_after=3)
    with pytest.raises(ValueError, match="iteration 3 of 20.*--stage 1 --resume"):
        run(smoke(), 2, tmp_path / "run")


def test_a_run_folder_of_another_profile_or_vocabulary_is_refused(smoke, tmp_path):
    run(smoke(), 1, tmp_path / "run", stop_after=1)
    other = smoke(d_cls=8).replace(name="other")
    with pytest.raises(ValueError, match="profile 'smoke', not to this run's profile 'other'") as error:
        run(other, 1, tmp_path / "run")
    assert "d_cls: 16 vs 8" in str(error.value)
    vocab_file = tmp_path / "run" / "vocab.txt"
    Vocabulary(Vocabulary.load(vocab_file).tokens + ["zebra"]).save(vocab_file)
    with pytest.raises(ValueError, match=r"vocabulary of run folder .* differs"):
        run(smoke(), 1, tmp_path / "run", resume=True)


# --- learning -----------------------------------------------------------------------------


def test_both_stages_lower_their_training_loss(smoke, tmp_path):
    profile = smoke(stage2={"iterations": 30, "lr_step": 20})
    stage1 = run(profile, 1, tmp_path / "run")
    stage2 = run(profile, 2, tmp_path / "run")
    log1 = read_log(stage1.parent / "log.jsonl")
    assert log1[-1]["loss"] < log1[0]["loss"]
    # stage 2 starts from stage 1's weights: its loss over all training pairs must drop
    assert full_training_loss(stage2, 2) < 0.99 * full_training_loss(stage1, 2)


def test_the_train_command_explains_a_missing_stage1(synth_root, tmp_path, capsys):
    from referseg.cli import main as cli_main

    code = cli_main(["train", "--profile", "smoke", "--set", f"data_root={synth_root}", "--stage", "2",
                     "--run-dir", str(tmp_path / "run"), "--device", "cpu"])
    assert code == 2
    assert "train stage 1 first: referseg train --profile smoke --stage 1" in capsys.readouterr().err
