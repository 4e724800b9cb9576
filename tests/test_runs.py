"""The run folder (referseg.runs): paths, agreement checks, checkpoints and logs, and the split view."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from referseg.config import get_profile
from referseg.runs import (
    CHECKPOINT,
    LOG,
    Run,
    SplitData,
    append_log,
    check_profile,
    check_vocab,
    checkpoint_path,
    guess_profile_name,
    prepare_run_dir,
    read_checkpoint,
    read_log,
    resolve_device,
    save_checkpoint,
    stage_checkpoints,
    stage_dir,
    truncate_log,
)
from referseg.text import Vocabulary

pytestmark = pytest.mark.usefixtures("one_thread")


def test_paths_of_a_run_folder(tmp_path):
    assert stage_dir(tmp_path, 2) == tmp_path / "stage2"
    assert checkpoint_path(tmp_path, 1) == tmp_path / "stage1" / CHECKPOINT
    assert CHECKPOINT == "checkpoint.pt" and LOG == "log.jsonl"


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is available; use --device cpu or auto"):
            resolve_device("cuda")


def test_profile_and_vocabulary_checks_name_both_sides():
    smoke = get_profile("smoke")
    check_profile(json.loads(json.dumps(smoke.to_dict())), smoke, "here")  # the same: no error
    other = smoke.replace(d_cls=8)
    with pytest.raises(ValueError, match="here was made with other settings of profile 'smoke'.*d_cls: 16 vs 8"):
        check_profile(smoke.to_dict(), other, "here")
    with pytest.raises(ValueError, match="belongs to profile 'smoke', not to this run's profile 'x'"):
        check_profile(smoke.to_dict(), other.replace(name="x"), "here")
    vocab = Vocabulary.build(["red car", "blue sky"])
    check_vocab(vocab, Vocabulary(vocab.tokens), "there")
    with pytest.raises(ValueError, match=r"vocabulary of there \(\d+ tokens\) differs .* from token \d+ on"):
        check_vocab(vocab, Vocabulary(vocab.tokens + ["zebra"]), "there")


def test_prepare_run_dir_writes_then_checks(tmp_path):
    smoke = get_profile("smoke")
    vocab = Vocabulary.build(["red car"])
    prepare_run_dir(tmp_path / "run", smoke, vocab)
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == json.loads(json.dumps(smoke.to_dict()))
    assert Vocabulary.load(tmp_path / "run" / "vocab.txt") == vocab
    prepare_run_dir(tmp_path / "run", smoke, vocab)  # the same again: fine
    with pytest.raises(ValueError, match="run folder .*config.json"):
        prepare_run_dir(tmp_path / "run", smoke.replace(d_cls=8), vocab)
    with pytest.raises(ValueError, match="vocabulary of run folder"):
        prepare_run_dir(tmp_path / "run", smoke, Vocabulary.build(["red car", "zebra"]))


def test_a_run_folder_refuses_models_trained_on_other_data(tmp_path):
    """data.json records what the models were trained on; other data (a SynthRef of another
    generator version) or a checkpoint with no record is refused with what to do."""
    smoke = get_profile("smoke")
    vocab = Vocabulary.build(["red car"])
    v2 = {"dataset": "synthref", "seed": 0, "images": 24, "version": 2}
    prepare_run_dir(tmp_path / "run", smoke, vocab, data=v2)
    assert json.loads((tmp_path / "run" / "data.json").read_text()) == v2
    prepare_run_dir(tmp_path / "run", smoke, vocab, data=v2)
    with pytest.raises(ValueError, match=r"trained on other data .*delete .*run or give another --run-dir"):
        prepare_run_dir(tmp_path / "run", smoke, vocab, data={**v2, "version": 1})
    old = tmp_path / "old"
    prepare_run_dir(old, smoke, vocab)
    save_checkpoint(old / "stage1" / CHECKPOINT, iteration=1)
    with pytest.raises(ValueError, match="made before run folders kept data.json"):
        prepare_run_dir(old, smoke, vocab, data=v2)
    assert not (old / "data.json").exists()


def test_checkpoints_are_written_whole_and_read_back(tmp_path):
    path = tmp_path / "stage1" / CHECKPOINT
    save_checkpoint(path, iteration=3, weights=torch.arange(4.0), order=torch.arange(5), name="x")
    state = read_checkpoint(path)
    assert state["iteration"] == 3 and torch.equal(state["weights"], torch.arange(4.0))
    assert torch.equal(state["order"], torch.arange(5)) and state["name"] == "x"
    assert [p.name for p in path.parent.iterdir()] == [CHECKPOINT]  # no temporary file left
    with pytest.raises(FileNotFoundError, match="missing.pt does not exist"):
        read_checkpoint(tmp_path / "missing.pt")


def test_log_lines_are_appended_truncated_and_read(tmp_path):
    log = tmp_path / LOG
    truncate_log(log, 5)  # no log yet: nothing to do
    assert not log.exists()
    for iteration in (1, 5, 10):
        append_log(log, {"iteration": iteration, "loss": 1.0 / iteration})
    assert [r["iteration"] for r in read_log(log)] == [1, 5, 10]
    truncate_log(log, 5)
    assert read_log(log) == [{"iteration": 1, "loss": 1.0}, {"iteration": 5, "loss": 0.2}]


def test_stage_checkpoints_and_the_hint_to_train(tmp_path):
    run_dir = tmp_path / "runs" / "smoke"
    run_dir.mkdir(parents=True)
    assert guess_profile_name(run_dir) == "smoke"  # from the folder's name
    get_profile("cpu").save(run_dir / "config.json")
    assert guess_profile_name(run_dir) == "cpu"  # the config wins
    assert guess_profile_name(tmp_path / "elsewhere") == "cpu"
    with pytest.raises(FileNotFoundError, match=r"Train stage 1 first: referseg train --profile cpu --stage 1 "
                                                r"--run-dir .*smoke"):
        stage_checkpoints(run_dir)
    save_checkpoint(checkpoint_path(run_dir, 2), iteration=1)
    assert stage_checkpoints(run_dir) == {2: checkpoint_path(run_dir, 2)}
    save_checkpoint(checkpoint_path(run_dir, 1), iteration=1)
    assert stage_checkpoints(run_dir) == {1: checkpoint_path(run_dir, 1), 2: checkpoint_path(run_dir, 2)}


def test_a_folder_without_config_or_vocabulary_is_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a run folder: config.json and vocab.txt missing"):
        Run(tmp_path)


def test_run_prepare_and_its_split_view(synth_root, tmp_path):
    profile = get_profile("smoke", data_root=str(synth_root))
    run = Run.prepare(tmp_path / "run", profile, device="cpu", progress=False)
    assert (tmp_path / "run" / "config.json").is_file() and (tmp_path / "run" / "vocab.txt").is_file()
    assert run.profile == profile and run.device == torch.device("cpu")
    assert run.eval_dir == tmp_path / "run" / "eval" and run.features_dir == tmp_path / "run" / "features"
    again = Run(tmp_path / "run", device="cpu", progress=False)
    assert again.vocab == run.vocab
    data = run.split("val")
    assert run.split("val") is data  # one view per split
    assert len(data) == len(data.pairs) == len(data.tokens) == len(data.pair_image)
    # by_image lists each image's pairs, every pair once
    assert sorted(np.concatenate(data.by_image).tolist()) == list(range(len(data)))
    for image, pairs in enumerate(data.by_image):
        assert (data.pair_image[pairs] == image).all()
    # features come from the run's cache, built once from the frozen backbone
    features = data.features
    assert features.shape[0] == data.num_images and list(run.features_dir.glob("val-*.npy"))
    assert data.features is features
    np.testing.assert_array_equal(data.image_features([1, 0]).numpy(),
                                  np.asarray(features[[1, 0]], dtype=np.float32))
    direct = run.feature_model().backbone_features(data.dataset.image_tensor(0)[None])[0].numpy()
    np.testing.assert_allclose(np.asarray(features[0], dtype=np.float32), direct, rtol=1e-2, atol=1e-2)
    # a view without a run needs its features passed in
    alone = SplitData(data.dataset)
    with pytest.raises(ValueError, match="needs its features passed in"):
        alone.features  # noqa: B018
    given = SplitData(data.dataset, features=np.zeros((data.num_images, 2, 1, 1), np.float32))
    assert given.image_features([0]).shape == (1, 2, 1, 1)
    assert data.size(0) == data.original_mask(0).shape
