"""Backbones (SPEC 4): VGG-16 FCN equals torchvision's classifier, Lite0 weights classify real photos."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from referseg.config import LITE_MEAN, LITE_STD, get_profile
from referseg.data.transforms import normalize
from referseg.model import backbones
from referseg.model.backbones import (
    Backbone,
    FCHead,
    build_backbone,
    build_fc_head,
    conv_bn,
    efficientnet_lite0_file,
    lite0_state_dict,
    load_efficientnet_lite0,
    vgg16_imagenet_file,
)

skimage_data = pytest.importorskip("skimage.data")

# ImageNet class indices (torchvision's VGG16_Weights meta["categories"] order).
CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968}  # espresso, cup


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def centre_crop_224(image: np.ndarray) -> np.ndarray:
    """Square centre crop resized to 224x224 (antialiased bilinear), float32 on the 0-255 scale."""
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    crop = torch.from_numpy(image[top : top + side, left : left + side, :3].astype(np.float32))
    resized = F.interpolate(crop.permute(2, 0, 1)[None], size=(224, 224), mode="bilinear", antialias=True)
    return resized[0].permute(1, 2, 0).numpy()


# --------------------------------------------------------------------------- VGG-16


def test_vgg16_fcn_centre_cell_equals_torchvision_classifier(tmp_path):
    """At 224 pool5 is 7x7, so fc6 (7x7, pad 3) at the centre cell sees exactly the classifier's input."""
    with torch.device("meta"):
        reference = torchvision.models.vgg16().eval()
    generator = torch.Generator().manual_seed(0)
    random_state = {}
    for name, tensor in reference.state_dict().items():  # Kaiming-uniform scale: quicker than vgg16()'s init
        bound = (6 / tensor[0].numel()) ** 0.5 if tensor.dim() > 1 else 0.1
        random_state[name] = torch.empty(tensor.shape).uniform_(-bound, bound, generator=generator)
    reference.load_state_dict(random_state, assign=True)
    weights = tmp_path / "vgg16-random.pth"
    torch.save(random_state, weights)
    profile = get_profile("paper", backbone_weights=str(weights))

    backbone = build_backbone(profile)
    head = build_fc_head(profile, backbone.out_channels).eval()
    assert (backbone.out_channels, backbone.stride) == (512, 32)

    image = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = reference(image)[0]
        features = backbone(image)
        logits = head(features)
    assert features.shape == (1, 512, 7, 7)
    assert logits.shape == (1, 1000, 7, 7)
    scale = expected.abs().max().item()
    torch.testing.assert_close(logits[0, :, 3, 3], expected, rtol=1e-4, atol=1e-4 * scale)
    # fc6 is a genuine convolution, not a copy of one cell: an off-centre cell sees zero padding.
    assert not torch.allclose(logits[0, :, 0, 0], expected, rtol=1e-3, atol=1e-3 * scale)
    assert backbone.weights_id.startswith("vgg16:file:")


def test_vgg16_imagenet_missing_fails_at_once_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected_file = vgg16_imagenet_file()
    assert expected_file.parent == tmp_path / "hub" / "checkpoints"
    profile = get_profile("paper")
    for build in (lambda: build_backbone(profile), lambda: build_fc_head(profile, 512)):
        with pytest.raises(FileNotFoundError) as error:
            build()
        message = str(error.value)
        assert expected_file.name in message and str(expected_file.parent) in message
    assert not any(tmp_path.rglob("*.pth")), "nothing may be downloaded"


def test_vgg16_missing_path_names_it(tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_backbone(get_profile("paper", backbone_weights=str(missing)))


def test_vgg16_stride_16_stops_before_pool5():
    profile = get_profile("paper", backbone_weights=None, stride=16, input_size=64)
    backbone = build_backbone(profile)
    with torch.no_grad():
        assert backbone(torch.randn(1, 3, 64, 64)).shape == (1, 512, 4, 4)


def test_slim_vgg16_widths_random_init_and_seed():
    profile = get_profile("smoke", backbone="slim_vgg16", width_mult=0.25, stride=32)
    backbone = build_backbone(profile)  # the profile's "imagenet" default means from scratch here
    widths = [m.out_channels for m in backbone.modules() if isinstance(m, nn.Conv2d)]
    assert widths == [16] * 2 + [32] * 2 + [64] * 3 + [128] * 6
    assert backbone.weights_id.startswith("slim_vgg16:random:0")
    image = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        features = backbone(image)
        again = build_backbone(profile)(image)
        other_seed = build_backbone(profile.replace(seed=1))(image)
    assert features.shape == (2, 128, 4, 4)
    torch.testing.assert_close(features, again)  # same seed, same weights
    assert not torch.allclose(features, other_seed)
    tiny = build_backbone(profile.replace(width_mult=0.01))
    assert min(m.out_channels for m in tiny.modules() if isinstance(m, nn.Conv2d)) == 8


def test_vgg_convolves_in_channels_last_and_hands_fc6_a_contiguous_map():
    """The VGG body computes in channels_last (the layout its convolutions run fastest in) and
    returns a contiguous map for fc6-fc8; the numbers are those of the contiguous computation."""
    profile = get_profile("smoke", backbone="slim_vgg16", width_mult=1 / 8, stride=32, input_size=64,
                          backbone_weights=None)
    backbone = build_backbone(profile).eval()
    assert backbone.channels_last
    conv = next(m for m in backbone.body if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = backbone(images)
        backbone.channels_last = False
        reference = backbone.body.to(memory_format=torch.contiguous_format)(images)
    assert out.is_contiguous() and out.shape == reference.shape
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)


def test_fc_head_sizes_from_profile():
    profile = get_profile("cpu")
    head = build_fc_head(profile, 112)
    assert isinstance(head, FCHead)
    assert head.fc6.kernel_size == (profile.fc6_kernel,) * 2
    assert head.fc6.padding == (profile.fc6_kernel // 2,) * 2
    features = torch.randn(2, 112, profile.grid, profile.grid)
    out = head(features)
    assert out.shape == (2, profile.d_im, profile.grid, profile.grid)
    assert (out < 0).any(), "fc8 has no ReLU"


# --------------------------------------------------------------------------- EfficientNet-Lite0


@pytest.fixture(scope="module")
def lite0() -> nn.Module:
    return load_efficientnet_lite0()  # strict=True: every key of the shipped state_dict loads


@pytest.mark.parametrize(("photo", "classes"), [("chelsea", CAT_CLASSES), ("coffee", COFFEE_CLASSES)])
def test_lite0_classifies_real_photos(lite0, photo, classes):
    image = centre_crop_224(getattr(skimage_data, photo)())
    with torch.no_grad():
        logits = lite0(normalize(image, LITE_MEAN, LITE_STD)[None])
    assert int(logits.argmax()) in classes


def test_lite0_input_scale_matches_stem_batchnorm_statistics(lite0):
    """(x - 127) / 128 gives stem activations of ImageNet's variance; torchvision's mean/std do not."""
    photos = [
        centre_crop_224(getattr(skimage_data, n)()) for n in ("chelsea", "coffee", "astronaut", "rocket")
    ]
    running_var = lite0._bn0.running_var
    valid = running_var > 1e-3

    def log_variance_ratio(mean, std) -> float:
        batch = torch.stack([normalize(p, mean, std) for p in photos])
        with torch.no_grad():
            stem = lite0._conv_stem(batch)
        return (stem.var(dim=(0, 2, 3))[valid] / running_var[valid]).log().mean().abs().item()

    lite = log_variance_ratio(LITE_MEAN, LITE_STD)
    torchvision_scale = log_variance_ratio((123.675, 116.28, 103.53), (58.395, 57.12, 57.375))
    assert lite < 0.5 < torchvision_scale


def test_folded_batchnorm_equals_convolution_then_batchnorm(lite0):
    block = lite0._blocks[3]  # 5x5 depthwise, stride 2: TF "SAME" pads one more pixel bottom/right
    x = torch.randn(2, block._depthwise_conv.in_channels, 30, 30)
    with torch.no_grad():
        folded = conv_bn(block._depthwise_conv, block._bn1, x)
        reference = block._bn1(
            F.conv2d(F.pad(x, [1, 2, 1, 2]), block._depthwise_conv.weight, stride=2, groups=x.shape[1])
        )
    assert folded.shape == (2, x.shape[1], 15, 15)
    torch.testing.assert_close(folded, reference, rtol=1e-4, atol=1e-4)


def test_lite0_backbone_cut_follows_stride(lite0):
    profile = get_profile("cpu")
    backbone = build_backbone(profile)
    assert (backbone.out_channels, backbone.stride) == (112, 16)
    image = torch.randn(2, 3, profile.input_size, profile.input_size)
    with torch.no_grad():
        features = backbone(image)
        x = F.relu6(lite0._bn0(lite0._conv_stem(image)))
        for block in lite0._blocks[:11]:  # through the 112-channel stage
            x = block(x)
    assert features.shape == (2, 112, 16, 16)
    torch.testing.assert_close(features, x, rtol=1e-3, atol=1e-4)  # BatchNorm folded vs applied

    deep = build_backbone(profile.replace(stride=32))
    assert (deep.out_channels, deep.stride) == (320, 32)
    with torch.no_grad():
        assert deep(image).shape == (2, 320, 8, 8)
    with pytest.raises(ValueError, match="not a multiple"):
        backbone(torch.randn(1, 3, 100, 100))


def test_lite0_weights_id_tracks_the_file(tmp_path):
    profile = get_profile("smoke")
    shipped = build_backbone(profile)
    state = torch.load(efficientnet_lite0_file(), map_location="cpu", weights_only=True)
    state["_blocks.8._project_conv.weight"] = state["_blocks.8._project_conv.weight"] * 1.5
    changed_file = tmp_path / "lite0-changed.pth"
    torch.save(state, changed_file)
    changed = build_backbone(profile.replace(backbone_weights=str(changed_file)))
    random = build_backbone(profile.replace(backbone_weights=None))
    ids = {shipped.weights_id, changed.weights_id, random.weights_id}
    assert len(ids) == 3
    assert shipped.weights_id.startswith("efficientnet_lite0:imagenet:")
    assert random.weights_id == "efficientnet_lite0:random:0:stride16"
    image = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        assert not torch.allclose(shipped(image), changed(image))


def test_lite0_weights_are_read_once_and_every_model_gets_its_own_copy(tmp_path, monkeypatch):
    profile = get_profile("smoke")
    backbones._LITE0_STATES.clear()
    reads = []
    read = backbones._load_state_dict
    monkeypatch.setattr(backbones, "_load_state_dict", lambda path: reads.append(path) or read(path))
    draws = []
    for _ in range(2):  # a cold cache, then a warm one: the same weights and the same random draws
        torch.manual_seed(0)
        built = build_backbone(profile)
        draws.append(torch.rand(4))
        if len(draws) == 1:
            first = built
    assert reads == [efficientnet_lite0_file()]
    assert torch.equal(draws[0], draws[1])
    for a, b in zip(first.state_dict().values(), built.state_dict().values(), strict=True):
        assert torch.equal(a, b) and a.stride() == b.stride()
    pointers = [t.data_ptr() for m in (first, built) for t in m.state_dict().values() if t.numel()]
    assert len(set(pointers)) == len(pointers), "two models share a tensor"
    copies = lite0_state_dict(efficientnet_lite0_file())
    copies["_fc.bias"].add_(1)  # changing a copy changes nothing else
    assert not torch.equal(copies["_fc.bias"], lite0_state_dict(efficientnet_lite0_file())["_fc.bias"])

    state = torch.load(efficientnet_lite0_file(), map_location="cpu", weights_only=True)
    replaced = tmp_path / "lite0.pth"
    torch.save(state, replaced)
    before = lite0_state_dict(replaced)["_fc.bias"]
    state["_fc.bias"] = state["_fc.bias"] + 1
    torch.save(state, replaced)  # the same file, rewritten: read again
    os.utime(replaced, ns=(0, replaced.stat().st_mtime_ns + 1))
    torch.testing.assert_close(lite0_state_dict(replaced)["_fc.bias"], before + 1)
    del state["_fc.bias"]
    torch.save(state, tmp_path / "incomplete.pth")
    with pytest.raises(ValueError, match="missing keys"):
        build_backbone(profile.replace(backbone_weights=str(tmp_path / "incomplete.pth")))


def test_frozen_backbone_stays_in_eval_and_is_deterministic():
    backbone = build_backbone(get_profile("smoke"))
    assert isinstance(backbone, Backbone) and backbone.frozen
    parent = nn.Sequential(backbone, nn.Conv2d(112, 4, 1))
    parent.train()
    assert parent[1].training
    assert not any(m.training for m in backbone.modules())
    assert not any(p.requires_grad for p in backbone.parameters())
    image = torch.randn(2, 3, 128, 128)
    before = [m.running_mean.clone() for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    first = backbone(image)
    second = backbone(image * 3)  # would move BatchNorm statistics if it were in train mode
    after = [m.running_mean for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    torch.testing.assert_close(backbone(image), first)
    assert not first.requires_grad and second.shape == first.shape

    trainable = build_backbone(get_profile("smoke", freeze_backbone=False))
    nn.Sequential(trainable).train()
    assert trainable.training and all(p.requires_grad for p in trainable.parameters())
    for mode in (True, False):  # batch statistics, then BatchNorm folded into the convolutions
        trainable.train(mode).zero_grad()
        trainable(image).square().mean().backward()
        stem = trainable.body._conv_stem.weight.grad
        assert stem is not None and stem.abs().sum() > 0
    trainable.freeze()
    trainable.train()
    assert not trainable.training
