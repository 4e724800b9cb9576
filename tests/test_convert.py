"""The official release converted: our Segmenter computes the official graph, to 1e-5.

The proof does not trust the mapping: ``official_forward`` re-implements the official
TensorFlow graph (models/text_objseg_model.py, vgg_net.py, lstm_net.py, util/cnn.py,
util/rnn.py, processing_tools.py) in NumPy, in float64, on a dict of official-named
variables, with TensorFlow's own layouts and conventions (NHWC, "SAME" padding, HWIO
filters, conv2d_transpose's [h, w, out, in] filter, gates i, j, f, o and a constant
forget_bias). Random official-named, official-shaped variables (small widths) go through
the interchange .npz (and real TensorFlow checkpoints, V1 as released and V2, where
TensorFlow is installed), then ``convert_official``; the converted Segmenter must agree with
the NumPy graph on the same image and tokens. Where TensorFlow is installed, the NumPy graph
is itself checked against TensorFlow's ops.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from referseg.config import CAFFE_MEAN, get_profile
from referseg.convert import (
    LSTM_SCOPE,
    UPSAMPLE,
    convert_official,
    official_profile,
    official_state_dict,
    read_tf_variables,
)
from referseg.data.transforms import normalize
from referseg.model.backbones import (
    OFFICIAL_VGG_CONV,
    UnsafeWeightsError,
    build_backbone,
    build_fc_head,
    read_official_vgg_params,
)
from referseg.text import SPECIAL_TOKENS

pytestmark = pytest.mark.usefixtures("one_thread")

# Small widths above the (full-width) VGG-16 convolutions; a 64 x 64 input gives a 2 x 2 grid.
SMALL = {"d_fc": 64, "d_im": 64, "d_embed": 32, "d_text": 32, "d_cls": 16, "input_size": 64}
LSTM_MATRIX = f"{LSTM_SCOPE}/RNN/MultiRNNCell/Cell0/BasicLSTMCell/Linear/Matrix"  # util/rnn.py, TF 0.x
LSTM_BIAS = f"{LSTM_SCOPE}/RNN/MultiRNNCell/Cell0/BasicLSTMCell/Linear/Bias"
VGG_CHANNELS = ((3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
                (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512))
POOL_AFTER = {"conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3"}
TOLERANCE = 1e-5
VOCAB = list(SPECIAL_TOKENS) + ["man", "left", "sky", "red", "car", "the", "on", "tree", "water", "big"]


# --------------------------------------------------------------------------- the official graph in NumPy


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME": output ceil(size / stride), the odd pixel of padding at the end."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def tf_conv2d(x: np.ndarray, filters: np.ndarray, biases: np.ndarray | None = None) -> np.ndarray:
    """tf.nn.conv2d(stride 1, "SAME") + bias_add: x [H, W, C], filters [kh, kw, C, O] -> [H, W, O]."""
    kh, kw = filters.shape[:2]
    pad_h, pad_w = _same_padding(x.shape[0], kh, 1), _same_padding(x.shape[1], kw, 1)
    padded = np.pad(x, (pad_h, pad_w, (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (kh, kw), axis=(0, 1))  # [H, W, C, kh, kw]
    out = np.tensordot(windows, filters.transpose(2, 0, 1, 3), axes=([2, 3, 4], [0, 1, 2]))
    return out if biases is None else out + biases


def tf_max_pool(x: np.ndarray) -> np.ndarray:
    """tf.nn.max_pool(2 x 2, stride 2, "SAME")."""
    pad_h, pad_w = _same_padding(x.shape[0], 2, 2), _same_padding(x.shape[1], 2, 2)
    padded = np.pad(x, (pad_h, pad_w, (0, 0)), constant_values=-np.inf)
    h, w, c = padded.shape
    return padded.reshape(h // 2, 2, w // 2, 2, c).max(axis=(1, 3))


def tf_conv2d_transpose(x: np.ndarray, filters: np.ndarray, stride: int) -> np.ndarray:
    """tf.nn.conv2d_transpose("SAME", output = input * stride): filters [k, k, out, in].

    Each input cell adds ``value * filter`` at ``cell * stride`` of a full canvas; "SAME" crops
    the padding the forward convolution of the output size would have had.
    """
    height, width, _ = x.shape
    k = filters.shape[0]
    full = np.zeros(((height - 1) * stride + k, (width - 1) * stride + k, filters.shape[2]))
    for i in range(height):
        for j in range(width):
            full[i * stride : i * stride + k, j * stride : j * stride + k] += filters @ x[i, j]
    top, _ = _same_padding(height * stride, k, stride)
    left, _ = _same_padding(width * stride, k, stride)
    return full[top : top + height * stride, left : left + width * stride]


def tf_l2_normalize(x: np.ndarray, axis: int) -> np.ndarray:
    """tf.nn.l2_normalize: x / sqrt(max(sum(x ** 2), 1e-12))."""
    return x / np.sqrt(np.maximum((x * x).sum(axis=axis, keepdims=True), 1e-12))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def official_spatial(height: int, width: int) -> np.ndarray:
    """models/processing_tools.py generate_spatial_batch, one image: [H, W, 8]."""
    spatial = np.zeros((height, width, 8))
    for h in range(height):
        for w in range(width):
            xmin, xmax = w / width * 2 - 1, (w + 1) / width * 2 - 1
            ymin, ymax = h / height * 2 - 1, (h + 1) / height * 2 - 1
            spatial[h, w] = [xmin, ymin, xmax, ymax, (xmin + xmax) / 2, (ymin + ymax) / 2, 1 / width, 1 / height]
    return spatial


def official_lstm(variables: dict[str, np.ndarray], tokens: np.ndarray) -> np.ndarray:
    """lstm_net + BasicLSTMCell: h_T of [x_t, h] @ Matrix + Bias, gates i, j, f, o, forget_bias 1.0."""
    embedded = variables["word_embedding/embedding"].astype(np.float64)[tokens]
    matrix, bias = variables[LSTM_MATRIX].astype(np.float64), variables[LSTM_BIAS].astype(np.float64)
    hidden = bias.shape[0] // 4
    h, c = np.zeros(hidden), np.zeros(hidden)
    for x in embedded:
        i, j, f, o = np.split(np.concatenate([x, h]) @ matrix + bias, 4)
        c = c * sigmoid(f + 1.0) + sigmoid(i) * np.tanh(j)
        h = np.tanh(c) * sigmoid(o)
    return h


def official_vgg(variables: dict[str, np.ndarray], image: np.ndarray, scope: str = "vgg_local/") -> np.ndarray:
    """vgg_fc8_full_conv on one [H, W, 3] image already minus channel_mean: fc8 map [H/32, W/32, D_im]."""
    x = image.astype(np.float64)
    for layer in OFFICIAL_VGG_CONV:
        x = np.maximum(tf_conv2d(x, variables[f"{scope}{layer}/weights"], variables[f"{scope}{layer}/biases"]), 0)
        if layer in POOL_AFTER:
            x = tf_max_pool(x)
    x = np.maximum(tf_conv2d(x, variables[f"{scope}fc6/weights"], variables[f"{scope}fc6/biases"]), 0)
    x = np.maximum(tf_conv2d(x, variables[f"{scope}fc7/weights"], variables[f"{scope}fc7/biases"]), 0)
    return tf_conv2d(x, variables[f"{scope}fc8/weights"], variables[f"{scope}fc8/biases"])


def official_forward(variables: dict[str, np.ndarray], image: np.ndarray,
                     tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """text_objseg_full_conv (low-res logits [g, g]) and upsample32s ([S, S], stage 2 variables only)."""
    visual = official_vgg(variables, image)
    height, width, _ = visual.shape
    text = np.broadcast_to(official_lstm(variables, tokens), (height, width, variables[LSTM_BIAS].shape[0] // 4))
    fused = np.concatenate([tf_l2_normalize(text, 2), tf_l2_normalize(visual, 2), official_spatial(height, width)], 2)
    hidden = np.maximum(tf_conv2d(fused, variables["classifier/mlp_l1/weights"],
                                  variables["classifier/mlp_l1/biases"]), 0)
    lowres = tf_conv2d(hidden, variables["classifier/mlp_l2/weights"], variables["classifier/mlp_l2/biases"])
    if UPSAMPLE not in variables:
        return lowres[:, :, 0], None
    highres = tf_conv2d_transpose(lowres, variables[UPSAMPLE].astype(np.float64), 32)
    return lowres[:, :, 0], highres[:, :, 0]


# --------------------------------------------------------------------------- official-named random variables


def official_variables(vocab_size: int, stage: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Random variables with the official names and shapes (SMALL widths above the convolutions),
    plus what a real .tfmodel also holds (the global step, Momentum slots), which conversion skips."""
    rng = np.random.default_rng(seed)

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    d_fc, d_im, d_embed, d_text, d_cls = (SMALL[k] for k in ("d_fc", "d_im", "d_embed", "d_text", "d_cls"))
    variables: dict[str, np.ndarray] = {}
    for layer, (cin, cout) in zip(OFFICIAL_VGG_CONV, VGG_CHANNELS, strict=True):
        variables[f"vgg_local/{layer}/weights"] = normal((3, 3, cin, cout), (2 / (9 * cin)) ** 0.5)
        variables[f"vgg_local/{layer}/biases"] = normal((cout,), 0.1)
    for layer, shape in (("fc6", (7, 7, 512, d_fc)), ("fc7", (1, 1, d_fc, d_fc)), ("fc8", (1, 1, d_fc, d_im))):
        variables[f"vgg_local/{layer}/weights"] = normal(shape, (2 / np.prod(shape[:3])) ** 0.5)
        variables[f"vgg_local/{layer}/biases"] = normal((shape[3],), 0.1)
    variables["word_embedding/embedding"] = normal((vocab_size, d_embed), 0.5)
    variables[LSTM_MATRIX] = normal((d_embed + d_text, 4 * d_text), 0.3)
    variables[LSTM_BIAS] = normal((4 * d_text,), 0.3)
    variables["classifier/mlp_l1/weights"] = normal((1, 1, d_text + d_im + 8, d_cls), 0.3)
    variables["classifier/mlp_l1/biases"] = normal((d_cls,), 0.1)
    variables["classifier/mlp_l2/weights"] = normal((1, 1, d_cls, 1), 0.3)
    variables["classifier/mlp_l2/biases"] = normal((1,), 0.1)
    if stage == 2:  # a bilinear kernel, trained away from symmetry so that a flip would show
        f = np.concatenate([np.arange(32), np.arange(32, 0, -1)]) / 32
        variables[UPSAMPLE] = (np.outer(f, f)[:, :, None, None] + normal((64, 64, 1, 1), 0.05)).astype(np.float32)
    variables["Variable"] = np.array(18000, dtype=np.int32)  # the global step
    variables["classifier/mlp_l1/weights/Momentum"] = np.zeros_like(variables["classifier/mlp_l1/weights"])
    return variables


def write_official_vgg(path: Path, variables: dict[str, np.ndarray], seed: int = 1) -> Path:
    """vgg_params.npz in the official layout: processed_W / processed_B, dicts of arrays pickled into
    object arrays, fc layers as [in, out] matrices (fc6's rows in (h, w, c) order); the convolutions
    are the variables' (the released models froze them), fc6-fc8 the "ImageNet" ones (others)."""
    rng = np.random.default_rng(seed)
    weights, biases = {}, {}
    for layer in OFFICIAL_VGG_CONV:
        weights[layer] = variables[f"vgg_local/{layer}/weights"]
        biases[layer] = variables[f"vgg_local/{layer}/biases"]
    for layer in ("fc6", "fc7", "fc8"):
        shape = variables[f"vgg_local/{layer}/weights"].shape
        matrix = rng.standard_normal((int(np.prod(shape[:3])), shape[3])) * (2 / np.prod(shape[:3])) ** 0.5
        weights[layer] = matrix.astype(np.float32)
        biases[layer] = (rng.standard_normal(shape[3]) * 0.1).astype(np.float32)
    np.savez(path, processed_W=np.array(weights, dtype=object), processed_B=np.array(biases, dtype=object))
    return path


def write_variables(path: Path, variables: dict[str, np.ndarray], kind: str) -> Path:
    """The variables as our interchange .npz, or as a TensorFlow checkpoint (V1 as released, or V2)."""
    if kind == "npz":
        np.savez(path, **variables)
        return path
    tf = pytest.importorskip("tensorflow", reason="TensorFlow (the 'convert' extra) is not installed")
    names = sorted(variables)
    tensors = [tf.constant(variables[name]) for name in names]
    if kind == "tf-v1":  # TF 0.x's Saver format: one file, what the released .tfmodel files are
        tf.raw_ops.Save(filename=str(path), tensor_names=names, data=tensors)
    else:
        tf.raw_ops.SaveV2(prefix=str(path), tensor_names=names, shape_and_slices=[""] * len(names), tensors=tensors)
    return path


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> dict:
    """One random "release": stage-2 and stage-1 variables, vgg_params.npz, a vocabulary file."""
    root = tmp_path_factory.mktemp("release")
    vocab = root / "vocabulary_referit.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    highres = official_variables(len(VOCAB), stage=2, seed=0)
    lowres = {k: v for k, v in highres.items() if k != UPSAMPLE}
    vgg = write_official_vgg(root / "vgg_params.npz", highres)
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, size=(SMALL["input_size"], SMALL["input_size"], 3), dtype=np.uint8)
    tokens = np.array([0] * 15 + list(rng.integers(4, len(VOCAB), size=5)), dtype=np.int64)  # left-padded
    fed = image.astype(np.float32) - np.array(CAFFE_MEAN, dtype=np.float32)  # the official feed (RGB - mean)
    return {"root": root, "vocab": vocab, "vgg": vgg, "highres": highres, "lowres": lowres,
            "image": image, "tokens": tokens, "fed": fed}


def our_logits(checkpoint: Path, image: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Low- and high-resolution logits of the converted checkpoint, in float64, on our preprocessing."""
    from referseg.runs import load_checkpoint

    model, profile, _ = load_checkpoint(checkpoint)
    model.double()
    images = normalize(image.astype(np.float32), profile.pixel_mean, profile.pixel_std)[None].double()
    ids = torch.from_numpy(tokens)[None]
    with torch.no_grad():
        lowres = model(ids, images=images)[0].numpy()
        highres = model(ids, images=images, high_res=True)[0].numpy()
    return lowres, highres


# --------------------------------------------------------------------------- the proof


@pytest.mark.parametrize("kind", ["npz", "tf-v1", "tf-v2"])
def test_converted_segmenter_computes_the_official_graph(release, tmp_path, kind):
    tfmodel = write_variables(tmp_path / ("variables.npz" if kind == "npz" else "model.tfmodel"),
                              release["highres"], kind)
    out = tmp_path / "run" / "stage2" / "checkpoint.pt"
    if kind == "npz":  # through the command line once
        from referseg.cli import main

        sets = [arg for key, value in SMALL.items() for arg in ("--set", f"{key}={value}")]
        assert main(["convert-official", "--vgg", str(release["vgg"]), "--tfmodel", str(tfmodel),
                     "--out", str(out), "--vocab", str(release["vocab"]), *sets]) == 0
    else:
        convert_official(release["vgg"], tfmodel, out, stage=2, vocab=release["vocab"], overrides=SMALL)

    expected_low, expected_high = official_forward(release["highres"], release["fed"], release["tokens"])
    lowres, highres = our_logits(out, release["image"], release["tokens"])
    difference = max(np.abs(lowres - expected_low).max(), np.abs(highres - expected_high).max())
    print(f"{kind}: max |ours - official graph| = {difference:.3g} (logits up to {np.abs(expected_high).max():.3g})")
    assert highres.shape == (SMALL["input_size"],) * 2
    assert difference < TOLERANCE
    # a meaningful comparison: the logits vary over the image and are not all one sign
    assert expected_high.std() > 0.1 and (expected_high > 0).any() and (expected_high < 0).any()

    # the run folder evaluate reads, and a checkpoint that loads without running code
    assert (out.parent.parent / "config.json").is_file() and (out.parent.parent / "vocab.txt").is_file()
    state = torch.load(out, map_location="cpu", weights_only=True)
    assert state["stage"] == 2 and state["finished"] is True and state["vocab"] == VOCAB
    assert state["profile"]["backbone_weights"] == str(release["vgg"])
    assert tuple(state["profile"]["pixel_mean"]) == CAFFE_MEAN and tuple(state["profile"]["pixel_std"]) == (1, 1, 1)
    for what in ("vgg", "vocab"):
        assert len(state["source"][what]["sha256"]) == 64
    assert state["source"]["reader"] == ("npz" if kind == "npz" else state["source"]["reader"])
    assert all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 for v in state["model"].values())


def test_stage1_model_keeps_the_bilinear_deconvolution(release, tmp_path):
    tfmodel = write_variables(tmp_path / "lowres_variables.npz", release["lowres"], "npz")
    out = tmp_path / "run" / "stage1" / "checkpoint.pt"
    convert_official(release["vgg"], tfmodel, out, stage=1, vocab=release["vocab"], overrides=SMALL)
    expected_low, _ = official_forward(release["lowres"], release["fed"], release["tokens"])
    lowres, highres = our_logits(out, release["image"], release["tokens"])
    assert np.abs(lowres - expected_low).max() < TOLERANCE
    # SPEC 4: the stage-1 model's high-resolution output is its bilinear deconvolution of those logits
    f = np.concatenate([np.arange(32), np.arange(32, 0, -1)]) / 32
    bilinear = tf_conv2d_transpose(expected_low[:, :, None], np.outer(f, f)[:, :, None, None], 32)[:, :, 0]
    assert np.abs(highres - bilinear).max() < TOLERANCE
    from referseg.predict import predict
    from referseg.runs import load_checkpoint

    model, _, vocab = load_checkpoint(out)
    mask = predict(model, release["image"][:48], "the man on the left")  # predict accepts it, any size
    assert mask.shape == (48, 64) and mask.dtype == bool


def test_official_vgg_file_gives_the_official_visual_features(release):
    """build_backbone + build_fc_head from vgg_params.npz (fc6 as [25088-style, out] rows in (h, w, c)
    order) compute the official vgg_fc8_full_conv with fc6 reshaped as the official init script does."""
    profile = official_profile(release["vgg"], release["vocab"], **SMALL)
    layers = read_official_vgg_params(release["vgg"])
    reshaped = {f"vgg_local/{layer}/{kind}": value for layer, parts in layers.items() for kind, value in parts.items()}
    for layer in ("fc6", "fc7", "fc8"):  # init_referit_seg_lowres_from_det.py: var.reshape(var.get_shape())
        reshaped[f"vgg_local/{layer}/weights"] = reshaped[f"vgg_local/{layer}/weights"].reshape(
            release["highres"][f"vgg_local/{layer}/weights"].shape)
    expected = official_vgg(reshaped, release["fed"])
    backbone = build_backbone(profile).double()
    head = build_fc_head(profile, backbone.out_channels).double()
    assert backbone.weights_id.startswith("vgg16:official:")
    images = normalize(release["image"].astype(np.float32), profile.pixel_mean, profile.pixel_std)[None].double()
    with torch.no_grad():
        ours = head(backbone(images))[0].permute(1, 2, 0).numpy()
    assert np.abs(ours - expected).max() < TOLERANCE * max(1.0, np.abs(expected).max())


def tensorflow_forward(tf, variables: dict[str, np.ndarray], fed: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """The official graph with TensorFlow's own ops (float32): conv2d/max_pool/conv2d_transpose "SAME",
    l2_normalize, and LSTMBlockCell, TF's fused drop-in for BasicLSTMCell (gates i, j, f, o, forget_bias)."""
    x = tf.constant(fed[None])
    for layer in OFFICIAL_VGG_CONV + ("fc6", "fc7", "fc8"):
        x = tf.nn.bias_add(tf.nn.conv2d(x, variables[f"vgg_local/{layer}/weights"], 1, "SAME"),
                           variables[f"vgg_local/{layer}/biases"])
        x = x if layer == "fc8" else tf.nn.relu(x)
        if layer in POOL_AFTER:
            x = tf.nn.max_pool2d(x, 2, 2, "SAME")
    _, height, width, _ = x.shape
    embedded = tf.nn.embedding_lookup(variables["word_embedding/embedding"], tokens[:, None])  # [T, N=1, D]
    hidden = variables[LSTM_BIAS].shape[0] // 4
    h = c = tf.zeros((1, hidden))
    zeros = tf.zeros(hidden)
    for step in range(len(tokens)):
        _, c, _, _, _, _, h = tf.raw_ops.LSTMBlockCell(
            x=embedded[step], cs_prev=c, h_prev=h, w=variables[LSTM_MATRIX], wci=zeros, wcf=zeros, wco=zeros,
            b=variables[LSTM_BIAS], forget_bias=1.0, cell_clip=-1.0, use_peephole=False)
    text = tf.tile(tf.reshape(h, (1, 1, 1, hidden)), (1, height, width, 1))
    spatial = tf.constant(official_spatial(height, width)[None].astype(np.float32))
    fused = tf.concat([tf.nn.l2_normalize(text, 3), tf.nn.l2_normalize(x, 3), spatial], 3)
    mlp = tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(fused, variables["classifier/mlp_l1/weights"], 1, "SAME"),
                                    variables["classifier/mlp_l1/biases"]))
    logits = tf.nn.bias_add(tf.nn.conv2d(mlp, variables["classifier/mlp_l2/weights"], 1, "SAME"),
                            variables["classifier/mlp_l2/biases"])
    size = (1, height * 32, width * 32, 1)
    return tf.nn.conv2d_transpose(logits, variables[UPSAMPLE], size, 32, "SAME").numpy()[0, :, :, 0]


def test_numpy_graph_is_tensorflows(release):
    """The reference itself, checked against TensorFlow's ops where TensorFlow is installed."""
    tf = pytest.importorskip("tensorflow", reason="TensorFlow (the 'convert' extra) is not installed")
    _, expected = official_forward(release["highres"], release["fed"], release["tokens"])
    actual = tensorflow_forward(tf, release["highres"], release["fed"], release["tokens"])
    assert np.abs(actual - expected).max() < 1e-4 * max(1.0, np.abs(expected).max())


def test_evaluate_accepts_the_converted_run(release, tmp_path, refclef_data):
    """`referseg evaluate --run` on the converted folder, both protocols, on a tiny REFER ReferIt."""
    from referseg.evaluate import evaluate_run

    tfmodel = write_variables(tmp_path / "variables.npz", release["highres"], "npz")
    run = tmp_path / "paper-official"
    data_root = str(tmp_path / "refclef-berkeley")
    convert_official(release["vgg"], tfmodel, run / "stage2" / "checkpoint.pt", vocab=release["vocab"],
                     overrides={**SMALL, "data_root": data_root})
    table = evaluate_run(run, split="test", mode="official", device="cpu", progress=False)
    assert "overall IoU" in table.columns and len(table) == 1
    summary = json.loads((run / "eval" / "ours-highres_test.json").read_text())
    assert summary["mode"] == "official" and set(summary["by_mode"]) == {"official", "logits"}
    assert summary["samples"] == refclef_data["pairs"]["test"]


# --------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def small_model(release):
    from referseg.model.segmenter import build_model

    return build_model(official_profile(release["vgg"], release["vocab"], **SMALL), len(VOCAB))


@pytest.mark.parametrize(
    "change, named",
    [
        ({"vgg_local/fc7/weights": np.zeros((1, 1, 64, 32), np.float32)}, "vgg_local/fc7/weights"),
        ({"classifier/mlp_l1/weights": np.zeros((1, 1, 106, 16), np.float32)}, "classifier/mlp_l1/weights"),
        ({LSTM_MATRIX: np.zeros((64, 100), np.float32)}, LSTM_MATRIX),
        ({UPSAMPLE: np.zeros((32, 32, 1, 1), np.float32)}, UPSAMPLE),
        ({"word_embedding/embedding": np.zeros((len(VOCAB) + 1, 32), np.float32)}, "word_embedding/embedding"),
    ],
)
def test_a_wrong_shaped_variable_is_refused_by_name(release, small_model, change, named):
    variables = {**release["highres"], **change}
    with pytest.raises(ValueError, match=re.escape(named)) as error:
        official_state_dict(variables, small_model, 2, "model.tfmodel")
    assert "shape" in str(error.value)


@pytest.mark.parametrize("missing", ["classifier/mlp_l2/biases", "vgg_local/conv3_2/weights",
                                     "word_embedding/embedding", LSTM_BIAS])
def test_a_missing_variable_is_named(release, small_model, missing):
    variables = {k: v for k, v in release["highres"].items() if k != missing}
    with pytest.raises(ValueError) as error:
        official_state_dict(variables, small_model, 2, "model.tfmodel")
    message = str(error.value)
    assert missing in message or (missing == LSTM_BIAS and "bias under lstm_lang/" in message), message


def test_stage_mismatch_is_refused(release, small_model):
    with pytest.raises(ValueError, match="--stage 1"):
        official_state_dict(release["lowres"], small_model, 2, "lowres.tfmodel")
    with pytest.raises(ValueError, match="--stage 2"):
        official_state_dict(release["highres"], small_model, 1, "highres.tfmodel")


def test_convolutions_other_than_the_vgg_file_are_refused(release, tmp_path):
    variables = dict(release["highres"])
    variables["vgg_local/conv3_2/weights"] = variables["vgg_local/conv3_2/weights"] * 1.01
    tfmodel = write_variables(tmp_path / "variables.npz", variables, "npz")
    with pytest.raises(ValueError, match="vgg_local/conv3_2/weights differs"):
        convert_official(release["vgg"], tfmodel, tmp_path / "out.pt", vocab=release["vocab"], overrides=SMALL)
    assert not (tmp_path / "out.pt").exists()


def test_a_tfmodel_without_tensorflow_says_what_to_do(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorflow(name, *args, **kwargs):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ImportError("No module named 'tensorflow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorflow)
    (tmp_path / "model.tfmodel").write_bytes(b"not read")
    with pytest.raises(ImportError, match=r"(?s)referseg\[convert\].*np.savez"):
        read_tf_variables(tmp_path / "model.tfmodel")
    with pytest.raises(FileNotFoundError, match="fetch-referit"):
        read_tf_variables(tmp_path / "missing.tfmodel")


# --------------------------------------------------------------------------- the official VGG-16 file


class _Runs:
    """An object whose unpickling would call os.mkdir: what a hostile .npz could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_vgg_file_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "vgg_params.npz"
    np.savez(path, processed_W=np.array({"conv1_1": _Runs(marker)}, dtype=object),
             processed_B=np.array({}, dtype=object))
    with pytest.raises(UnsafeWeightsError, match="mkdir"):
        read_official_vgg_params(path)
    assert not marker.exists()


def test_vgg_file_flat_layout_reads_without_pickle(release, tmp_path):
    layers = read_official_vgg_params(release["vgg"])
    flat = tmp_path / "vgg_flat.npz"
    np.savez(flat, **{f"vgg_local/{layer}/{kind}": v for layer, parts in layers.items() for kind, v in parts.items()})
    again = read_official_vgg_params(flat)
    assert set(again) == set(layers) == set(OFFICIAL_VGG_CONV) | {"fc6", "fc7", "fc8"}
    assert all(np.array_equal(again[layer][k], layers[layer][k]) for layer in layers for k in ("weights", "biases"))
    with pytest.raises(ValueError, match="holds no VGG-16 layers"):
        np.savez(tmp_path / "other.npz", something=np.zeros(3))
        read_official_vgg_params(tmp_path / "other.npz")


class _Python2Pickler(pickle._Pickler):
    """Protocol 2 as Python 2 wrote it: ``bytes`` become Python 2 ``str`` (SHORT_BINSTRING/BINSTRING),
    where Python 3's pickler would call ``_codecs.encode`` (which a weights reader must refuse)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_python2_str(self, value: bytes) -> None:
        if len(value) < 256:
            self.write(b"U" + bytes([len(value)]) + value)
        else:
            self.write(b"T" + len(value).to_bytes(4, "little") + value)
        self.memoize(value)

    dispatch[bytes] = save_python2_str


def test_vgg_file_written_by_python2_reads(tmp_path):
    """vgg_params.npz dates from 2016 (Python 2): array bytes and dict keys are Python 2 str."""
    import io
    import zipfile

    array = (np.arange(24, dtype=np.float32).reshape(2, 2, 2, 3) - 2.5) * 1e3  # bytes >= 0x80 in the data
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(np.array({b"conv1_1": array}, dtype=object))
    biases = io.BytesIO()
    _Python2Pickler(biases, protocol=2).dump(np.array({b"conv1_1": np.ones(3, np.float32)}, dtype=object))
    assert b"_codecs" not in buffer.getvalue()
    path = tmp_path / "vgg_params.npz"
    with zipfile.ZipFile(path, "w") as archive:
        for member, payload in (("processed_W.npy", buffer), ("processed_B.npy", biases)):
            npy = io.BytesIO()  # the header (with its magic) of a 0-d object array, then the pickle
            np.lib.format.write_array_header_1_0(npy, {"descr": "|O", "fortran_order": False, "shape": ()})
            archive.writestr(member, npy.getvalue() + payload.getvalue())
    layers = read_official_vgg_params(path)
    assert layers["conv1_1"]["weights"].tolist() == array.tolist()
    assert layers["conv1_1"]["biases"].tolist() == [1.0, 1.0, 1.0]


def test_profile_with_the_official_vgg_file_uses_caffe_preprocessing():
    profile = get_profile("paper", backbone_weights="data/referit-models/vgg_params.npz")
    assert (profile.pixel_mean, profile.pixel_std) == (CAFFE_MEAN, (1.0, 1.0, 1.0))
    back = profile.replace(backbone_weights="imagenet")
    assert back.pixel_mean == get_profile("paper").pixel_mean
    with pytest.raises(ValueError, match="pixel_mean=\\[123.68,116.779,103.939\\] pixel_std=\\[1,1,1\\]"):
        get_profile("paper", backbone_weights="vgg_params.npz", pixel_mean=(0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="backbone=vgg16"):
        get_profile("cpu", backbone_weights="vgg_params.npz")
