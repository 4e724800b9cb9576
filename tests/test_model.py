"""The model of SPEC 4 and the parameter groups of SPEC 5, checked against their definitions.

Every expected value is computed here from the SPEC formula, independently of the code.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from referseg.config import get_profile
from referseg.model.language import LanguageEncoder
from referseg.model.segmenter import (
    Segmenter,
    bilinear_kernel,
    build_model,
    param_groups,
    spatial_channels,
)
from referseg.text import SPECIAL_TOKENS, Vocabulary

torch.set_num_threads(1)

VOCAB = Vocabulary(list(SPECIAL_TOKENS) + "man on the left sky red car big".split())


def tokens_of(*expressions: str, length: int = 20) -> torch.Tensor:
    return torch.tensor([VOCAB.encode(e, length) for e in expressions])


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- spatial channels (SPEC 4) ---------------------------------------------------------------


def official_spatial(h: int, w: int, grid: int) -> list[float]:
    """The official generate_spatial_batch formula for one cell, W = H = grid."""
    xmin, xmax = w / grid * 2 - 1, (w + 1) / grid * 2 - 1
    ymin, ymax = h / grid * 2 - 1, (h + 1) / grid * 2 - 1
    return [xmin, ymin, xmax, ymax, (xmin + xmax) / 2, (ymin + ymax) / 2, 1 / grid, 1 / grid]


def test_spatial_channels_match_the_official_formula_on_a_16_grid():
    spatial = spatial_channels(16, 8)
    assert spatial.shape == (8, 16, 16)
    corner = spatial[:, 0, 0].tolist()
    assert corner == pytest.approx(
        [-1, -1, -1 + 2 / 16, -1 + 2 / 16, -1 + 1 / 16, -1 + 1 / 16, 1 / 16, 1 / 16]
    )
    for h, w in [(0, 0), (0, 15), (15, 0), (3, 10), (15, 15), (7, 8)]:
        assert spatial[:, h, w].tolist() == pytest.approx(official_spatial(h, w, 16)), (h, w)
    # x varies along the width (last) axis only, y along the height axis only.
    assert torch.equal(spatial[0], spatial[0, :1].expand(16, 16))
    assert torch.equal(spatial[1], spatial[1, :, :1].expand(16, 16))
    assert spatial[0, 0, 15].item() == pytest.approx(1 - 2 / 16)


def test_spatial_channels_paper_variant_and_ablation():
    two = spatial_channels(16, 2)
    assert two.shape == (2, 16, 16)
    assert torch.equal(two, spatial_channels(16, 8)[4:6])  # the paper's (x, y) cell centres
    assert spatial_channels(16, 0).shape == (0, 16, 16)
    with pytest.raises(ValueError, match="spatial channels"):
        spatial_channels(16, 3)


# --- bilinear upsampling (SPEC 4) -----------------------------------------------------------


def test_bilinear_kernel_for_stride_32():
    f = [k / 32 for k in range(32)] + [(32 - k) / 32 for k in range(32)]  # [0, 1/32, .., 1, .., 1/32]
    assert len(f) == 64 and f[32] == 1 and f[0] == 0 and f[63] == 1 / 32
    kernel = bilinear_kernel(32)
    assert kernel.shape == (64, 64)
    assert torch.allclose(kernel, torch.outer(torch.tensor(f), torch.tensor(f)), atol=0, rtol=1e-6)
    assert divmod(int(kernel.argmax()), 64) == (32, 32)
    middle = kernel[32]
    for d in range(1, 32):
        assert middle[32 - d] == middle[32 + d]


def upsample_interpolates(upsample: nn.ConvTranspose2d, grid: int, stride: int) -> None:
    """A constant map stays constant and a ramp stays a ramp away from the border."""
    inner = slice(stride // 2, grid * stride - stride // 2)
    with torch.no_grad():
        constant = upsample(torch.full((1, 1, grid, grid), 2.5))[0, 0]
        ramp = upsample(torch.arange(grid, dtype=torch.float32).expand(1, 1, grid, grid))[0, 0]
    assert constant.shape == (grid * stride, grid * stride)
    assert torch.allclose(constant[inner, inner], torch.tensor(2.5), atol=1e-5)
    assert constant[0, 0] < 2.5  # the border only gets one side's share
    # Input cell i lands at output pixel s*i + s/2 and is linearly interpolated in between.
    expected = (torch.arange(grid * stride, dtype=torch.float32) - stride // 2) / stride
    assert torch.allclose(ramp[stride, inner], expected[inner], atol=1e-5)


# --- language encoder (SPEC 4) --------------------------------------------------------------


def small_encoder(**overrides) -> LanguageEncoder:
    torch.manual_seed(0)
    return LanguageEncoder(get_profile("smoke", **overrides), len(VOCAB))


def test_forget_gate_bias_is_one_and_other_biases_zero():
    encoder = small_encoder()
    hidden = encoder.lstm.hidden_size
    gate_bias = encoder.lstm.bias_ih_l0 + encoder.lstm.bias_hh_l0  # PyTorch gates: i, f, g, o
    assert torch.equal(gate_bias[hidden : 2 * hidden], torch.ones(hidden))
    assert torch.equal(gate_bias[:hidden], torch.zeros(hidden))
    assert torch.equal(gate_bias[2 * hidden :], torch.zeros(2 * hidden))


def test_encoder_returns_the_last_step_of_an_lstm_from_a_zero_state():
    encoder = small_encoder()
    tokens = tokens_of("man on the left", "sky", "big red car on the left")
    lstm = encoder.lstm
    w_ih, w_hh, bias = lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0 + lstm.bias_hh_l0
    with torch.no_grad():
        result = encoder(tokens)
        embedded = encoder.embedding(tokens)
        outputs, _ = lstm(embedded)
        # The LSTM equations by hand, zero initial state, reading all 20 steps.
        h = c = torch.zeros(len(tokens), lstm.hidden_size)
        for t in range(tokens.shape[1]):
            i, f, g, o = (embedded[:, t] @ w_ih.T + h @ w_hh.T + bias).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
    assert result.shape == (3, 32)
    assert torch.allclose(result, outputs[:, -1], atol=1e-6)
    assert torch.allclose(result, h, atol=1e-5)


def test_left_padding_acts_only_through_the_pad_embedding():
    """Same words, 19 vs 9 leading pads: the codes differ, and only because <pad> has an embedding.

    From a zero state, a zero input with zero i/g/o biases keeps c = h = 0 exactly (g = tanh(0) = 0),
    so with the <pad> row zeroed the number of pads no longer matters.
    """
    encoder = small_encoder()
    long_pad, short_pad = tokens_of("sky", length=20), tokens_of("sky", length=10)
    with torch.no_grad():
        assert not torch.allclose(encoder(long_pad), encoder(short_pad), atol=1e-4)
        encoder.embedding.weight[0] = 0
        assert torch.allclose(encoder(long_pad), encoder(short_pad), atol=1e-6)
        assert torch.allclose(encoder(long_pad), encoder(tokens_of("sky", length=1)), atol=1e-6)


def test_bag_of_words_is_tanh_of_a_projected_mean_of_the_words():
    encoder = small_encoder(text_encoder="bow")
    tokens = tokens_of("big red car", "sky")
    with torch.no_grad():
        result = encoder(tokens)
        words = encoder.embedding(torch.tensor(VOCAB.ids(["big", "red", "car"]))).mean(0)
        assert torch.allclose(result[0], torch.tanh(encoder.project(words)), atol=1e-6)
        assert torch.allclose(result, encoder(tokens_of("big red car", "sky", length=5)), atol=1e-6)


# --- the full model on the paper profile ----------------------------------------------------

VGG16_CONVS = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
               (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]  # fmt: skip


def test_paper_profile_shapes_and_parameter_counts():
    profile = get_profile("paper", backbone_weights=None)
    vocab_size = len(VOCAB)
    torch.manual_seed(0)
    model = build_model(profile, vocab_size).eval()
    # Parameter counts from the SPEC 4 layer sizes.
    vgg_convs = sum(3 * 3 * c_in * c_out + c_out for c_in, c_out in VGG16_CONVS)
    assert vgg_convs == 14_714_688
    expected_head = [512 * 7 * 7 * 4096 + 4096, 4096 * 4096 + 4096, 4096 * 1000 + 1000]  # fc6, fc7, fc8
    expected = {
        "backbone": vgg_convs,
        "head": sum(expected_head),
        "text.embedding": vocab_size * 1000,
        "text.lstm": 4 * (1000 * 1000 + 1000 * 1000 + 2 * 1000),
        "classifier": (1000 + 1000 + 8) * 500 + 500 + 500 * 1 + 1,
        "upsample": 64 * 64,
    }
    for name, count in expected.items():
        assert n_params(model.get_submodule(name)) == count, name
    head_convs = [m for m in model.head.modules() if isinstance(m, nn.Conv2d)]
    assert [n_params(m) for m in head_convs] == expected_head
    assert [m.kernel_size for m in head_convs] == [(7, 7), (1, 1), (1, 1)]
    assert n_params(model) == sum(expected.values())  # nothing else hidden in the model
    assert torch.equal(model.upsample.weight[0, 0], bilinear_kernel(32))
    assert model.spatial.shape == (8, 16, 16)

    # 512 x 512 -> 16 x 16 x 512 conv5_3 -> 16 x 16 x 1000 fc8 -> 16 x 16 logits -> 512 x 512 logits.
    shapes = {}

    def record(name: str):
        def hook(module, inputs, output) -> None:
            shapes[name] = tuple(output.shape)

        return hook

    model.head.register_forward_hook(record("fc8"))
    model.classifier.register_forward_hook(record("lowres"))
    with torch.no_grad():
        features = model.backbone_features(torch.randn(1, 3, 512, 512))
        logits = model(tokens_of("man on the left"), features=features, high_res=True)
    assert features.shape == (1, 512, 16, 16)
    assert shapes == {"fc8": (1, 1000, 16, 16), "lowres": (1, 1, 16, 16)}
    assert logits.shape == (1, 512, 512)
    assert torch.isfinite(logits).all()


# --- the small profiles ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, 128, 128)


def smoke_model(**overrides) -> Segmenter:
    torch.manual_seed(0)
    return build_model(get_profile("smoke", backbone_weights=None, **overrides), len(VOCAB))


@pytest.mark.parametrize("name", ["cpu", "smoke"])
def test_small_profile_shapes(name):
    profile = get_profile(name, backbone_weights=None)
    model = build_model(profile, len(VOCAB)).eval()
    size, grid = profile.input_size, profile.grid
    assert grid == 16 if name == "cpu" else grid == 8
    tokens = tokens_of("man on the left", "sky")
    with torch.no_grad():
        features = model.backbone_features(torch.randn(2, 3, size, size))
        assert features.shape == (2, model.backbone.out_channels, grid, grid)
        low = model(tokens, features=features)
        high = model(tokens, features=features, high_res=True)
    assert low.shape == (2, grid, grid)
    assert high.shape == (2, size, size)
    assert torch.equal(model.upsample.weight[0, 0], bilinear_kernel(profile.stride))
    upsample_interpolates(model.upsample, grid, profile.stride)


def test_images_and_cached_features_give_the_same_logits(smoke_images):
    model = smoke_model().eval()
    tokens = tokens_of("red car", "sky")
    with torch.no_grad():
        from_images = model(tokens, images=smoke_images, high_res=True)
        from_features = model(tokens, features=model.backbone_features(smoke_images), high_res=True)
    assert torch.allclose(from_images, from_features, atol=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        model(tokens)
    with pytest.raises(ValueError, match="exactly one"):
        model(tokens, images=smoke_images, features=model.backbone_features(smoke_images))


def test_visual_map_once_per_image_gives_the_per_pair_logits(smoke_images):
    model = smoke_model().eval()
    tokens = tokens_of("red car", "sky", "man on the left", "big car", "sky")
    image_index = torch.tensor([0, 0, 1, 1, 1])
    with torch.no_grad():
        features = model.backbone_features(smoke_images)
        visual = model.visual_map(features)  # fc6-fc8 of each image, once
        assert visual.shape == (2, 32, 8, 8)
        per_pair = model(tokens, features=features[image_index], high_res=True)
        shared = model(tokens, visual=visual, image_index=image_index, high_res=True)
        in_order = model(tokens[[0, 2]], visual=visual, high_res=True)  # no image_index: one image each
    # the same computation; only a convolution's algorithm may differ with the batch size
    torch.testing.assert_close(shared, per_pair, rtol=0, atol=1e-6)
    torch.testing.assert_close(in_order, per_pair[[0, 2]], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        model(tokens, features=features, visual=visual)
    with pytest.raises(ValueError, match="grid is 8x8"):
        model.visual_map(features[:, :, :4, :4])


@pytest.mark.parametrize("n", [2, 0])
def test_spatial_channel_options_build_and_run(n, smoke_images):
    model = smoke_model(spatial_channels=n).eval()
    assert model.classifier[0].in_channels == 32 + 32 + n
    assert torch.equal(model.spatial, spatial_channels(8, n))
    with torch.no_grad():
        assert model(tokens_of("sky", "car"), images=smoke_images).shape == (2, 8, 8)


def test_l2_normalisation_makes_the_output_blind_to_feature_scale(smoke_images):
    tokens = tokens_of("big red car", "sky")
    outputs = {}
    for l2 in (True, False):
        model = smoke_model(l2_normalize=l2).eval()  # same seed: same parameters
        fc8 = [m for m in model.head.modules() if isinstance(m, nn.Conv2d)][-1]
        with torch.no_grad():
            features = model.backbone_features(smoke_images)
            before = model(tokens, features=features)
            fc8.weight.mul_(3)
            fc8.bias.mul_(3)  # visual vectors x3
            after = model(tokens, features=features)
        outputs[l2] = before
        assert torch.allclose(before, after, atol=1e-5) == l2
    assert not torch.allclose(outputs[True], outputs[False], atol=1e-3)


def test_frozen_backbone_gets_no_gradient_and_stays_in_eval_mode(smoke_images):
    model = smoke_model().train()
    assert not any(m.training for m in model.backbone.modules())
    assert model.classifier.training and model.text.training
    logits = model(tokens_of("red car", "sky"), images=smoke_images, high_res=True)
    logits.square().mean().backward()
    assert all(p.grad is None and not p.requires_grad for p in model.backbone.parameters())
    for part in (model.head, model.text, model.classifier, model.upsample):
        assert all(p.grad is not None for p in part.parameters())


def test_unfrozen_backbone_is_trained(smoke_images):
    model = smoke_model(freeze_backbone=False).train()
    assert model.backbone.training
    model(tokens_of("red car", "sky"), images=smoke_images).mean().backward()
    assert all(p.grad is not None for p in model.backbone.parameters() if p.requires_grad)
    assert any(p.requires_grad for p in model.backbone.parameters())


def test_param_groups_decay_weights_only():
    model = smoke_model()
    decay, no_decay = param_groups(model, weight_decay=5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | not_decayed == trainable and not decayed & not_decayed
    assert not any(n.startswith("backbone.") for n in trainable)  # frozen: not optimised
    assert "text.embedding.weight" in not_decayed
    assert {"text.lstm.weight_ih_l0", "text.lstm.weight_hh_l0", "upsample.weight"} <= decayed
    assert {"classifier.0.weight", "classifier.2.weight"} <= decayed
    assert all(n.endswith("bias") or "bias_" in n for n in not_decayed - {"text.embedding.weight"})
    assert all(n.endswith("weight") or "weight_" in n for n in decayed)
    torch.optim.SGD([decay, no_decay], lr=0.01, momentum=0.9)  # accepted as is
