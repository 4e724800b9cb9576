"""Profiles: the paper's numbers, one code path, clear refusals."""

import dataclasses

import pytest

from referseg.config import PROFILES, Profile, get_profile


def test_paper_profile_is_the_spec():
    p = get_profile("paper")
    assert (p.input_size, p.stride, p.grid) == (512, 32, 16)  # SPEC 3, 4
    assert (p.fc6_kernel, p.d_fc, p.d_im, p.d_embed, p.d_text, p.d_cls) == (7, 4096, 1000, 1000, 1000, 500)
    assert (p.spatial_channels, p.seq_len, p.batch_size, p.momentum, p.weight_decay) == (8, 20, 10, 0.9, 5e-4)
    assert (p.stage1.iterations, p.stage1.lr, p.stage1.lr_step, p.stage1.neg_weight) == (30_000, 0.01, 10_000, 1)
    assert (p.stage2.iterations, p.stage2.lr, p.stage2.lr_step) == (18_000, 0.01, 6_000)
    assert p.stage2.neg_weight == pytest.approx(1 / 3)
    assert p.dataset == "referit" and p.backbone == "vgg16" and p.lowres_labels == "or"


def test_profiles_differ_in_sizes_not_code_paths():
    fields = {f.name for f in dataclasses.fields(Profile)}
    for profile in PROFILES.values():
        assert profile.grid * profile.stride == profile.input_size
        assert set(profile.to_dict()) == fields
    assert get_profile("cpu").grid == 16  # the paper's grid, on CPU


def test_overrides_and_round_trip(tmp_path):
    p = get_profile("cpu", spatial_channels=2, stage1={"iterations": 7})
    assert p.spatial_channels == 2 and p.stage1.iterations == 7 and p.stage1.lr == get_profile("cpu").stage1.lr
    p.save(tmp_path / "config.json")
    assert Profile.load(tmp_path / "config.json") == p


def test_unknown_names_are_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match="valid profiles: paper, cpu, smoke"):
        get_profile("gpu")
    with pytest.raises(ValueError, match="valid parameters: .*spatial_channels"):
        get_profile("cpu", spatial_chanels=2)
    with pytest.raises(ValueError, match="spatial_channels=3"):
        get_profile("cpu", spatial_channels=3)
    with pytest.raises(ValueError, match="backbone='resnet'"):
        get_profile("cpu", backbone="resnet")
