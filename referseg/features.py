"""The feature cache: the frozen convolutions' output, computed once per image.

With the pretrained convolutions frozen (SPEC 5), their output is a fixed function
of the image, so training and evaluation read it from a memory-mapped ``.npy`` file
instead of running the backbone again. The file is keyed by a hash of the backbone
weights and of the preprocessing; any change to either builds a new file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from referseg.config import Profile
from referseg.data.refer import data_identity
from referseg.io import atomic_write_text

CACHE_VERSION = 2  # bump when the file layout or the way it is computed changes (2: one CPU thread)


def weights_id(backbone: torch.nn.Module) -> str:
    """A stable id of the backbone's weights: ``backbone.weights_id`` or a hash of its state_dict."""
    declared = getattr(backbone, "weights_id", None)
    if declared:
        return str(declared)
    digest = hashlib.sha256()
    for name, tensor in sorted(backbone.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def cache_key(profile: Profile, backbone: torch.nn.Module, image_ids: list[int], dtype: str) -> dict[str, Any]:
    """Everything the cached features depend on: weights, preprocessing and the images."""
    return {
        "version": CACHE_VERSION,
        "backbone": profile.backbone,
        "weights": weights_id(backbone),
        "width_mult": profile.width_mult,
        "input_size": profile.input_size,  # SPEC 3: letterbox size
        "pixel_mean": list(profile.pixel_mean),
        "pixel_std": list(profile.pixel_std),
        "stride": profile.stride,
        "dataset": profile.dataset,
        "data_root": str(Path(profile.data_root).resolve()),
        "data": data_identity(profile),  # SynthRef's seed, size and version, or ReferIt's files
        "image_ids": hashlib.sha256(json.dumps(list(map(int, image_ids))).encode()).hexdigest(),
        "num_images": len(image_ids),
        "dtype": dtype,
    }


def _hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


@torch.no_grad()
def feature_batches(model: torch.nn.Module, dataset: Any, batch_size: int = 16, device: str | torch.device = "cpu"
                    ) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(start, stop, float32 features)`` of the dataset's images in order, ``batch_size`` at a time.

    ``model.backbone_features`` of the preprocessed images (``dataset.image_tensor``); the
    model is put in eval mode for the pass and restored after.
    """
    was_training = model.training
    model.eval()
    try:
        count = len(dataset.image_ids)
        for start in range(0, count, batch_size):
            stop = min(start + batch_size, count)
            images = torch.stack([dataset.image_tensor(i) for i in range(start, stop)])
            yield start, stop, model.backbone_features(images.to(device)).float().cpu().numpy()
    finally:
        model.train(was_training)


def compute_features(model: torch.nn.Module, dataset: Any, batch_size: int = 16,
                     device: str | torch.device = "cpu") -> np.ndarray:
    """Backbone features of every image, in memory (for a trained backbone, which no cache can key)."""
    return np.concatenate([features for _, _, features in feature_batches(model, dataset, batch_size, device)])


class FeatureCache:
    """Backbone features of every image of a dataset, as an (images, C, h, w) memory map.

    ``FeatureCache(model, dataset, profile, run_dir / "features").load()`` returns the array,
    building it first (with a progress bar) when no file matches the current key.
    Rows are indexed by the dataset's ``image_index``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        dataset: Any,
        profile: Profile,
        folder: str | Path,
        dtype: str = "float16",
        batch_size: int = 16,
        device: str | torch.device = "cpu",
        progress: bool = True,
        extra_key: dict[str, Any] | None = None,
    ):
        if dtype not in ("float16", "float32"):
            raise ValueError(f"feature cache dtype {dtype!r}: use 'float16' or 'float32'")
        self.model = model
        self.dataset = dataset
        self.folder = Path(folder)
        self.dtype = dtype
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.progress = progress
        # extra_key: what else the features depend on (stage 0's box crops: head weights, crop size, boxes)
        self.key = {**cache_key(profile, model.backbone, list(dataset.image_ids), dtype), **(extra_key or {})}
        self.name = f"{getattr(dataset, 'split', 'split')}-{_hash(self.key)}"
        self.path = self.folder / f"{self.name}.npy"
        self.sidecar = self.folder / f"{self.name}.json"

    def is_valid(self) -> bool:
        """True when a complete file for the current key exists."""
        if not (self.path.is_file() and self.sidecar.is_file()):
            return False
        try:
            meta = json.loads(self.sidecar.read_text())
        except (OSError, json.JSONDecodeError):
            return False
        return meta.get("key") == self.key

    def load(self) -> np.ndarray:
        """The features as a read-only memory map, built first if needed."""
        if not self.is_valid():
            self.build()
        return np.load(self.path, mmap_mode="r")

    def build(self) -> Path:
        """Run the frozen backbone over every image and write the file atomically.

        On CPU the backbone runs on one thread: a convolution's sums are split by thread, so a
        pool of another size gives other low bits (measured: 145 of 35,840 float16 values), and
        the cache must be a pure function of weights, preprocessing and images.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        threads = torch.get_num_threads()
        if self.device.type == "cpu":
            torch.set_num_threads(1)
        try:
            return self._build()
        finally:
            torch.set_num_threads(threads)

    def _build(self) -> Path:
        for stale in self.folder.glob(f".{self.name}.*.npy.tmp"):  # left by a build that was killed
            stale.unlink(missing_ok=True)
        count = len(self.dataset.image_ids)
        fd, tmp_name = tempfile.mkstemp(dir=self.folder, prefix=f".{self.name}.", suffix=".npy.tmp")
        os.close(fd)
        os.chmod(tmp_name, 0o644)  # mkstemp makes it private; the cache is an ordinary file
        array = None
        try:
            bar = tqdm(total=count, desc="features", unit="img", disable=not self.progress)
            for start, stop, features in feature_batches(self.model, self.dataset, self.batch_size, self.device):
                if array is None:
                    array = np.lib.format.open_memmap(
                        tmp_name, mode="w+", dtype=self.dtype, shape=(count, *features.shape[1:])
                    )
                array[start:stop] = features
                bar.update(stop - start)
            bar.close()
            if array is None:
                raise ValueError(f"no images to cache features for (split {getattr(self.dataset, 'split', '?')})")
            array.flush()
            shape = list(array.shape)
            del array
            os.replace(tmp_name, self.path)
        except BaseException:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
            raise
        atomic_write_text(self.sidecar, json.dumps({"key": self.key, "shape": shape}, indent=2) + "\n")
        return self.path
