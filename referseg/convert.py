"""The official release (ronghanghu/text_objseg, TensorFlow) as a ``paper``-profile checkpoint.

Inputs: the official VGG-16 (``vgg_params.npz``), a released ``.tfmodel`` (a TensorFlow Saver
checkpoint: ``referit_fc8_seg_highres_iter_18000.tfmodel`` for stage 2, the
``lowres_iter_30000`` one for stage 1) and the official vocabulary. Output: the checkpoint
that ``evaluate`` and ``predict`` read (the dict ``runs.save_checkpoint`` writes), plus the
run folder's ``config.json`` and ``vocab.txt``. It holds only tensors and plain Python values,
so it loads with ``torch.load(weights_only=True)``.

Variables are read by :func:`read_tf_variables`: with TensorFlow installed (the optional
extra ``convert``), from the checkpoint itself; without it, from an ``.npz`` of the same
variables under their TensorFlow names, written with TensorFlow elsewhere (:data:`EXPORT_SNIPPET`).

The mapping, from the official ``models/*.py`` and ``util/*.py`` (``TF_TO_TORCH`` lists it):
TensorFlow filters are ``[h, w, in, out]`` and become PyTorch's ``[out, in, h, w]``; the
deconvolution's ``[h, w, out, in]`` becomes ``[in, out, h, w]`` (both are the adjoint of a
cross-correlation, so no flip); the LSTM's ``[x, h] @ Matrix + Bias`` with gates in TF's
order (i, j, f, o) becomes ``nn.LSTM``'s ``W_ih``, ``W_hh`` in PyTorch's order (i, f, g, o);
TF's ``forget_bias`` (1.0, added to the forget gate at every step) goes into ``bias_ih``,
and ``bias_hh`` is zero.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from referseg.config import Profile, get_profile
from referseg.io import sha256_file
from referseg.model.backbones import (
    OFFICIAL_VGG_CONV,
    OFFICIAL_VGG_FC,
    official_vgg_features,
    official_vgg_layer,
)
from referseg.text import Vocabulary

OFFICIAL_FORGET_BIAS = 1.0  # models/lstm_net.py: forget_bias=1.0, which BasicLSTMCell adds at every step
VGG_SCOPE = "vgg_local"  # models/text_objseg_model.py: vgg_fc8_full_conv(..., 'vgg_local')
CLASSIFIER_SCOPE = "classifier"
EMBEDDING = "word_embedding/embedding"  # models/lstm_net.py
LSTM_SCOPE = "lstm_lang"  # models/lstm_net.py; util/rnn.py names the cell's two variables:
LSTM_KERNEL_NAMES = ("Matrix", "kernel", "weights")  # TF 0.x (the release) ".../Linear/Matrix"; TF 1.x
LSTM_BIAS_NAMES = ("Bias", "bias", "biases")  # TF 0.x ".../Linear/Bias"; TF 1.x
UPSAMPLE = "classifier/upsample32s/weights"  # models/text_objseg_model.py, stage 2 only (no bias)
VOCAB_FILE = "vocabulary_referit.txt"

# official variable -> our parameter (the table of the book's paper-profile chapter)
TF_TO_TORCH = (
    ("vgg_local/conv1_1 .. conv5_3/weights [3,3,in,out]", "backbone.body.<i>.weight [out,in,3,3]",
     "permute(3,2,0,1)"),
    ("vgg_local/conv*/biases [out]", "backbone.body.<i>.bias", "as is"),
    ("vgg_local/fc6/weights [7,7,512,4096]", "head.fc6.weight [4096,512,7,7]", "permute(3,2,0,1)"),
    ("vgg_local/fc7, fc8/weights [1,1,in,out]", "head.fc7, head.fc8 .weight [out,in,1,1]", "permute(3,2,0,1)"),
    ("vgg_local/fc6..fc8/biases", "head.fc6..fc8 .bias", "as is"),
    ("word_embedding/embedding [V,1000]", "text.embedding.weight [V,1000]", "as is"),
    ("lstm_lang/RNN/MultiRNNCell/Cell0/BasicLSTMCell/Linear/Matrix [1000+1000, 4000]",
     "text.lstm.weight_ih_l0, weight_hh_l0 [4000,1000]",
     "rows :1000 (input) and 1000: (state), transposed; gate blocks i,j,f,o -> i,f,j,o"),
    ("lstm_lang/.../Linear/Bias [4000]", "text.lstm.bias_ih_l0 (+1.0 on f), bias_hh_l0 = 0",
     "gate blocks i,j,f,o -> i,f,j,o; forget_bias added"),
    ("classifier/mlp_l1/weights [1,1,2008,500], biases", "classifier.0.weight [500,2008,1,1], .bias",
     "permute(3,2,0,1)"),
    ("classifier/mlp_l2/weights [1,1,500,1], biases", "classifier.2.weight [1,500,1,1], .bias", "permute(3,2,0,1)"),
    ("classifier/upsample32s/weights [64,64,1,1] (stage 2)", "upsample.weight [1,1,64,64]",
     "permute(3,2,0,1): [h,w,out,in] -> [in,out,h,w]"),
)

EXPORT_SNIPPET = """\
import numpy as np, tensorflow as tf
path = "referit_fc8_seg_highres_iter_18000.tfmodel"
reader = tf.train.load_checkpoint(path)
names = [n for n in reader.get_variable_to_shape_map() if not n.endswith("Momentum")]
np.savez(path.replace(".tfmodel", "_variables.npz"), **{n: reader.get_tensor(n) for n in names})
"""


# --------------------------------------------------------------------------- reading variables


class TensorFlowMissingError(ImportError):
    """A TensorFlow checkpoint was given but TensorFlow is not installed; the message says what to do."""


def _checkpoint_files(path: Path) -> list[Path]:
    """The files of a TF checkpoint: one file (TF 0.x Saver V1, an .npz) or a V2 prefix's index and shards."""
    if path.is_file():
        return [path]
    index = path.with_name(path.name + ".index")
    if index.is_file():
        return [index] + sorted(path.parent.glob(f"{path.name}.data-*"))
    raise FileNotFoundError(
        f"TensorFlow checkpoint {path} does not exist (nor {index.name}). The released models are "
        "referit_fc8_seg_highres_iter_18000.tfmodel (stage 2) and referit_fc8_seg_lowres_iter_30000.tfmodel "
        "(stage 1); `referseg data fetch-referit` puts them in data/referit-models/"
    )


def read_tf_variables(path: str | Path, keep: Callable[[str], bool] | None = None) -> dict[str, np.ndarray]:
    """``{TF variable name: array}`` of a TensorFlow checkpoint, or of an ``.npz`` of them by name.

    A checkpoint (``.tfmodel``, V1 or V2) needs TensorFlow (``pip install "referseg[convert]"``);
    an ``.npz`` (our interchange format, :data:`EXPORT_SNIPPET`) is read with NumPy, ``allow_pickle=False``.
    ``keep(name)`` selects variables before they are read (the optimizer's Momentum slots are as
    big as the model).
    """
    path = Path(path)
    _checkpoint_files(path)  # a missing file fails here, with or without TensorFlow
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            return {n: archive[n] for n in archive.files if keep is None or keep(n)}
    try:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf
    except ImportError as error:
        raise TensorFlowMissingError(
            f"reading the TensorFlow checkpoint {path} needs TensorFlow: `pip install \"referseg[convert]\"` "
            "(tensorflow-cpu). Or, on a machine with TensorFlow, export its variables to an .npz and "
            "convert that instead:\n" + EXPORT_SNIPPET
        ) from error
    try:
        reader = tf.train.load_checkpoint(str(path))
        available = reader.get_variable_to_shape_map()
    except Exception as error:  # TF raises its own DataLossError, NotFoundError, ...
        raise ValueError(f"{path} is not a TensorFlow checkpoint TensorFlow can read ({error})") from error
    return {n: np.asarray(reader.get_tensor(n)) for n in available if keep is None or keep(n)}


def _find_one(variables: Mapping[str, Any], scope: str, endings: tuple[str, ...], what: str, where: str) -> str:
    """The one variable under ``scope`` whose last name part is one of ``endings`` (TF 0.x or 1.x naming)."""
    found = [n for n in variables if n.startswith(scope + "/") and n.rsplit("/", 1)[-1] in endings]
    if len(found) != 1:
        raise ValueError(
            f"{where}: expected one LSTM {what} under {scope}/ (e.g. "
            f"{scope}/RNN/MultiRNNCell/Cell0/BasicLSTMCell/Linear/{endings[0]}), found "
            f"{found or 'none'}; variables there: {sorted(n for n in variables if n.startswith(scope))[:8]}"
        )
    return found[0]


def is_model_variable(name: str) -> bool:
    """A variable of the official graph (not an optimizer slot such as ``.../Momentum``, not the global step)."""
    if name.rsplit("/", 1)[-1].startswith("Momentum"):
        return False
    return name.startswith((VGG_SCOPE + "/", CLASSIFIER_SCOPE + "/", LSTM_SCOPE + "/")) or name == EMBEDDING


def _layers(variables: Mapping[str, np.ndarray], scope: str) -> dict[str, dict[str, np.ndarray]]:
    """``{layer: {"weights": ..., "biases": ...}}`` of the variables ``scope/<layer>/<kind>``."""
    layers: dict[str, dict[str, np.ndarray]] = {}
    for name, value in variables.items():
        parts = name.split("/")
        if len(parts) == 3 and parts[0] == scope and parts[2] in ("weights", "biases"):
            layers.setdefault(parts[1], {})[parts[2]] = value
    return layers


# --------------------------------------------------------------------------- the mapping


def _tf_gates_to_torch(array: np.ndarray, hidden: int) -> np.ndarray:
    """Gate blocks along axis 0 from TF's (i, j, f, o) to PyTorch's (i, f, g=j, o)."""
    i, j, f, o = (array[k * hidden : (k + 1) * hidden] for k in range(4))
    return np.concatenate([i, f, j, o], axis=0)


def official_state_dict(
    variables: Mapping[str, np.ndarray], model: torch.nn.Module, stage: int, where: str
) -> dict[str, torch.Tensor]:
    """Our ``model.state_dict()`` from the official graph's variables (shapes checked, names in errors).

    Stage 1 (the low-resolution model) has no deconvolution; it keeps the model's bilinear one (SPEC 4).
    """
    profile: Profile = model.profile
    target = model.state_dict()
    state: dict[str, torch.Tensor] = {}

    # visual: conv1_1..conv5_3 (frozen in training, so equal to vgg_params.npz) and fc6-fc8
    vgg = _layers(variables, VGG_SCOPE)
    for key, value in official_vgg_features(vgg, model.backbone.body, where, prefix=f"{VGG_SCOPE}/").items():
        state[f"backbone.body.{key}"] = value
    for layer in OFFICIAL_VGG_FC:
        conv = getattr(model.head, layer)
        shape = (conv.kernel_size[0], conv.kernel_size[1], conv.in_channels, conv.out_channels)
        weight, bias = official_vgg_layer(vgg, layer, shape, where, prefix=f"{VGG_SCOPE}/")
        state[f"head.{layer}.weight"], state[f"head.{layer}.bias"] = weight, bias

    # language: embedding and the one LSTM cell
    embedding = target["text.embedding.weight"]
    state["text.embedding.weight"] = _tensor(variables, EMBEDDING, tuple(embedding.shape), where,
                                             hint="rows are the vocabulary's tokens, columns d_embed")
    d_embed, d_text = profile.d_embed, profile.d_text
    kernel_name = _find_one(variables, LSTM_SCOPE, LSTM_KERNEL_NAMES, "kernel", where)
    bias_name = _find_one(variables, LSTM_SCOPE, LSTM_BIAS_NAMES, "bias", where)
    kernel = _array(variables, kernel_name, (d_embed + d_text, 4 * d_text), where, hint="[d_embed + d_text, 4 d_text]")
    bias = _array(variables, bias_name, (4 * d_text,), where, hint="[4 d_text]")
    # util/rnn.py: inputs before states in the Matrix's rows; columns are the gates i, j, f, o.
    state["text.lstm.weight_ih_l0"] = _as_tensor(_tf_gates_to_torch(kernel[:d_embed].T, d_text))
    state["text.lstm.weight_hh_l0"] = _as_tensor(_tf_gates_to_torch(kernel[d_embed:].T, d_text))
    gate_bias = _tf_gates_to_torch(bias.astype(np.float64), d_text)
    gate_bias[d_text : 2 * d_text] += OFFICIAL_FORGET_BIAS  # PyTorch's f block; TF adds it at run time
    state["text.lstm.bias_ih_l0"] = _as_tensor(gate_bias)
    state["text.lstm.bias_hh_l0"] = torch.zeros(4 * d_text)

    # classifier: two 1x1 convolutions over [text, visual, spatial]
    classifier = _layers(variables, CLASSIFIER_SCOPE)
    for index, layer in ((0, "mlp_l1"), (2, "mlp_l2")):
        conv = model.classifier[index]
        shape = (1, 1, conv.in_channels, conv.out_channels)
        weight, bias_ = official_vgg_layer(classifier, layer, shape, where, prefix=f"{CLASSIFIER_SCOPE}/")
        state[f"classifier.{index}.weight"], state[f"classifier.{index}.bias"] = weight, bias_

    # upsampling: stage 2's trained deconvolution, [h, w, out, in] -> [in, out, h, w]
    if stage == 2:
        if UPSAMPLE not in variables:
            raise ValueError(
                f"{where} has no {UPSAMPLE}: it is a low-resolution (stage 1) model; convert it with --stage 1"
            )
        size = 2 * profile.stride
        deconv = _array(variables, UPSAMPLE, (size, size, 1, 1), where, hint="[2s, 2s, out=1, in=1]")
        state["upsample.weight"] = _as_tensor(deconv.transpose(3, 2, 0, 1))
    else:
        if UPSAMPLE in variables:
            raise ValueError(
                f"{where} has a trained deconvolution ({UPSAMPLE}): it is a high-resolution (stage 2) model; "
                "convert it with --stage 2"
            )
        state["upsample.weight"] = target["upsample.weight"].clone()  # bilinear (SPEC 4)

    missing = sorted(set(target) - set(state))
    if missing:  # the model grew a parameter this mapping does not know
        raise ValueError(f"no official variable maps to {missing}; the conversion needs updating")
    for key, value in state.items():
        if tuple(value.shape) != tuple(target[key].shape):
            raise ValueError(f"{where}: converted {key} has shape {tuple(value.shape)}, model needs "
                             f"{tuple(target[key].shape)}")
    return state


def _array(variables: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...], where: str,
           hint: str = "") -> np.ndarray:
    if name not in variables:
        raise ValueError(f"{where} has no variable {name}; it is not the official segmentation model")
    value = np.asarray(variables[name])
    if value.shape != shape:
        raise ValueError(
            f"{where}: {name} has shape {value.shape}, but the profile's model needs {shape}"
            + (f" ({hint})" if hint else "") + "; change the profile's sizes (--set) or use the matching file"
        )
    return value


def _tensor(variables: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...], where: str,
            hint: str = "") -> torch.Tensor:
    return _as_tensor(_array(variables, name, shape, where, hint))


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


# --------------------------------------------------------------------------- the command


def official_profile(vgg: str | Path, vocab: str | Path, **overrides: Any) -> Profile:
    """The paper profile with the official VGG-16 (Caffe preprocessing follows, SPEC 3) and vocabulary."""
    return get_profile("paper", backbone_weights=str(vgg), vocab_file=str(vocab), **overrides)


def _check_architecture(profile: Profile) -> None:
    """The official graph is one architecture: refuse profile overrides that change it."""
    wrong = {
        name: value
        for name, value, official in (
            ("backbone", profile.backbone, "vgg16"),
            ("text_encoder", profile.text_encoder, "lstm"),
            ("spatial_channels", profile.spatial_channels, 8),
            ("l2_normalize", profile.l2_normalize, True),
            ("stride", profile.stride, 32),
            ("fc6_kernel", profile.fc6_kernel, 7),
        )
        if value != official
    }
    if wrong:
        raise ValueError(f"the official model is VGG-16 + LSTM + 8 spatial channels + L2 norm; the profile has {wrong}")


def find_vocab(vgg: Path, tfmodel: Path, profile: Profile) -> Path:
    """The official vocabulary beside the data (``<data_root>/vocabulary_referit.txt``) or the models."""
    places = [Path(profile.data_root) / VOCAB_FILE, tfmodel.parent / VOCAB_FILE, vgg.parent / VOCAB_FILE]
    for place in places:
        if place.is_file():
            return place
    raise FileNotFoundError(
        f"the official vocabulary ({VOCAB_FILE}) is in none of {', '.join(map(str, places))}; give it with --vocab"
    )


def _sources(files: Mapping[str, list[Path]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for what, paths in files.items():
        entries = [{"path": str(p), "sha256": sha256_file(p), "bytes": p.stat().st_size} for p in paths]
        out[what] = entries[0] if len(entries) == 1 else entries
    return out


def convert_official(
    vgg: str | Path,
    tfmodel: str | Path,
    out: str | Path,
    stage: int = 2,
    vocab: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``out`` (a stage checkpoint) from the official release; returns its path.

    When ``out`` is ``<run>/stage<N>/checkpoint.pt``, ``<run>/config.json`` and ``vocab.txt`` are
    written too (or checked against), so ``referseg evaluate --run <run>`` works at once.
    """
    from referseg.model.segmenter import build_model
    from referseg.runs import prepare_run_dir, save_checkpoint
    from referseg.train import stage_config

    if stage not in (1, 2):
        raise ValueError(f"--stage {stage}: use 1 (low resolution) or 2 (high resolution)")
    vgg, tfmodel, out = Path(vgg), Path(tfmodel), Path(out)
    if not vgg.is_file():
        raise FileNotFoundError(
            f"official VGG-16 {vgg} does not exist: `referseg data fetch-referit` puts vgg_params.npz "
            "in data/referit-models/"
        )
    tf_files = _checkpoint_files(tfmodel)
    overrides = dict(overrides or {})
    profile = get_profile("paper", **overrides)
    vocab_path = Path(vocab) if vocab is not None else find_vocab(vgg, tfmodel, profile)
    profile = official_profile(vgg, vocab_path, **overrides)
    _check_architecture(profile)
    vocabulary = Vocabulary.load(vocab_path)

    model = build_model(profile, len(vocabulary))  # reads the official VGG-16 (a wrong file fails here)
    variables = read_tf_variables(tfmodel, keep=is_model_variable)
    state = official_state_dict(variables, model, stage, str(tfmodel))
    # the released models froze the convolutions at vgg_params.npz, and evaluation rebuilds them from it
    backbone = model.backbone.body.state_dict()
    conv_modules = [i for i, m in enumerate(model.backbone.body) if isinstance(m, torch.nn.Conv2d)]
    for index, layer in zip(conv_modules, OFFICIAL_VGG_CONV, strict=False):
        ours, theirs = backbone[f"{index}.weight"], state[f"backbone.body.{index}.weight"]
        if not torch.equal(ours, theirs):
            difference = float((ours - theirs).abs().max())
            raise ValueError(
                f"{tfmodel}: {VGG_SCOPE}/{layer}/weights differs from {vgg}'s {layer} (max difference "
                f"{difference:.3g}); the released models froze the convolutions at vgg_params.npz, so this "
                "is another VGG-16 file or another model. Evaluation would rebuild the convolutions from "
                f"{vgg.name} and not run the released model."
            )
    model.load_state_dict(state, strict=True)
    del model

    source = {
        "converted_from": "ronghanghu/text_objseg (the official TensorFlow release)",
        "stage": stage,
        "reader": "npz" if tfmodel.suffix.lower() == ".npz" else f"tensorflow {_tf_version()}",
        "lstm_forget_bias_added": OFFICIAL_FORGET_BIAS,
        "iteration_in_name": _iteration_in_name(tfmodel),
        **_sources({"tfmodel": tf_files, "vgg": [vgg], "vocab": [vocab_path]}),
    }
    if out.parent.name == f"stage{stage}":
        prepare_run_dir(out.parent.parent, profile, vocabulary)
    save_checkpoint(
        out, model=state, profile=profile.to_dict(), vocab=list(vocabulary.tokens),
        iteration=stage_config(profile, stage).iterations, stage=stage, finished=True, source=source,
    )
    print(f"converted {tfmodel} (stage {stage}) -> {out}")
    if out.parent.name == f"stage{stage}":
        print(f"evaluate it: referseg evaluate --run {out.parent.parent} (add --mode official for the official test)")
    return out


def _iteration_in_name(path: Path) -> int | None:
    match = re.search(r"iter_(\d+)", path.name)
    return int(match.group(1)) if match else None


def _tf_version() -> str:
    import tensorflow as tf

    return str(tf.__version__)
