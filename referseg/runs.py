"""The run folder, and one view of a split that every stage reads it through.

A run folder (``runs/<profile>``) holds ``config.json`` (the profile), ``vocab.txt``,
``features/`` (the frozen-feature cache), ``stage<k>/{checkpoint.pt,log.jsonl}`` and
``eval/``. This module owns its paths, the checks that a folder, a checkpoint and a run
agree (profile and vocabulary), checkpoint reading and writing, device resolution, and
:class:`SplitData`: a split's pairs, token ids, image rows, labels and cached features,
computed once and shared by the trainer, the evaluation, the baselines and the figures.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from referseg.config import PROFILES, Profile
from referseg.data.transforms import letterbox_image, lowres_labels
from referseg.io import atomic_open, atomic_save, atomic_write_text
from referseg.text import Vocabulary

if TYPE_CHECKING:
    from referseg.data.refer import OfficialReferIt, Refer, ReferItText, ReferSegDataset

CONFIG = "config.json"
VOCAB = "vocab.txt"
DATA = "data.json"  # data_identity() of what the run's models were trained on
CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"
FEATURES = "features"
EVAL = "eval"


def stage_dir(run_dir: str | Path, stage: int) -> Path:
    return Path(run_dir) / f"stage{stage}"


def checkpoint_path(run_dir: str | Path, stage: int) -> Path:
    return stage_dir(run_dir, stage) / CHECKPOINT


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not one this study runs on: use auto, cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(device)!r} is not one this study runs on: use auto, cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu or auto")
    return device


# --- a folder, a checkpoint and a run must agree -----------------------------------


def profile_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_profile(saved: dict[str, Any], profile: Profile, where: str) -> None:
    """Refuse to continue a run that belongs to another profile (names both, lists differences)."""
    current = json.loads(json.dumps(profile.to_dict()))  # tuples -> lists, as in the JSON file
    saved = json.loads(json.dumps(saved))
    if saved != current:
        diffs = profile_differences(saved, current)
        if saved.get("name") == profile.name:
            owner = f"was made with other settings of profile {profile.name!r}"
        else:
            owner = f"belongs to profile {saved.get('name')!r}, not to this run's profile {profile.name!r}"
        raise ValueError(
            f"{where} {owner} (differences, saved vs this run: {'; '.join(diffs[:6])}). "
            "Use another --run-dir, or delete the folder to start over."
        )


def check_vocab(saved: Vocabulary, vocab: Vocabulary, where: str) -> None:
    """Refuse a run folder or checkpoint whose vocabulary differs from this run's."""
    if saved != vocab:
        first = next(
            (i for i, (a, b) in enumerate(zip(saved.tokens, vocab.tokens, strict=False)) if a != b),
            min(len(saved), len(vocab)),
        )
        raise ValueError(
            f"the vocabulary of {where} ({len(saved)} tokens) differs from this run's "
            f"({len(vocab)} tokens) from token {first} on; the ids would not match. "
            "Use another --run-dir, or the data and vocab_file the run was made with."
        )


def prepare_run_dir(run_dir: Path, profile: Profile, vocab: Vocabulary, data: dict[str, Any] | None = None) -> None:
    """Write config.json and vocab.txt (and ``data``'s identity to data.json), or check that the
    existing ones match this run."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run folder {run_dir} is a file, not a folder: give another --run-dir")
    config_file, vocab_file, data_file = run_dir / CONFIG, run_dir / VOCAB, run_dir / DATA
    if data is not None:
        check_data_identity(run_dir, data)
    run_dir.mkdir(parents=True, exist_ok=True)
    if data is not None and not data_file.is_file():
        atomic_write_text(data_file, json.dumps(data, sort_keys=True, indent=1) + "\n")
    if config_file.is_file():
        check_profile(json.loads(config_file.read_text()), profile, f"run folder {run_dir} ({config_file})")
    else:
        profile.save(config_file)
    if vocab_file.is_file():
        check_vocab(Vocabulary.load(vocab_file), vocab, f"run folder {run_dir} ({vocab_file})")
    else:
        vocab.save(vocab_file)


def check_data_identity(run_dir: Path, data: dict[str, Any]) -> None:
    """Refuse a run folder whose models were trained on other data than ``data``: resuming or
    evaluating them would mix two datasets. A folder from before data.json existed is refused
    too once it holds a checkpoint (nothing says what it was trained on)."""
    data_file = run_dir / DATA
    if data_file.is_file():
        try:
            recorded = json.loads(data_file.read_text())
        except ValueError:
            recorded = None
        if recorded == data:
            return
        what = f"other data ({json.dumps(recorded, sort_keys=True)[:200]})"
    elif any(run_dir.glob(f"stage*/{CHECKPOINT}")):
        what = "data it did not record (it was made before run folders kept data.json)"
    else:
        return
    raise ValueError(f"run folder {run_dir} holds models trained on {what}, not on this profile's "
                     f"{json.dumps(data, sort_keys=True)[:200]}; delete {run_dir} or give another --run-dir")


def guess_profile_name(run_dir: Path) -> str:
    """The profile a run folder was probably made with: its config, else its name, else ``cpu``."""
    config_file = run_dir / CONFIG
    if config_file.is_file():
        try:
            return str(json.loads(config_file.read_text())["name"])
        except (OSError, ValueError, KeyError):
            pass
    return run_dir.name if run_dir.name in PROFILES else "cpu"


def train_hint(run_dir: Path, stage: int = 1, resume: bool = False) -> str:
    """The command that trains (or, with ``resume``, continues) ``stage`` in ``run_dir``."""
    return (f"referseg train --profile {guess_profile_name(run_dir)} --stage {stage}" + (" --resume" if resume else "")
            + ("" if run_dir.parent == Path("runs") else f" --run-dir {run_dir}"))


def stage_checkpoints(run_dir: Path) -> dict[int, Path]:
    """``{stage: checkpoint}`` of the stages trained in ``run_dir``; none is an error saying what to train."""
    found = {stage: checkpoint_path(run_dir, stage) for stage in (1, 2)}
    found = {stage: path for stage, path in found.items() if path.is_file()}
    if not found:
        raise FileNotFoundError(
            f"no trained model in {run_dir}: {checkpoint_path(run_dir, 1)} does not exist. "
            f"Train stage 1 first: {train_hint(run_dir)}, then stage 2 (--stage 2) for the high-resolution model"
        )
    return found


# --- checkpoints and logs -----------------------------------------------------------


class _WriteRecorder:
    """A file wrapper that keeps the first OSError of a write: torch.save reports a failed write
    (a full disk) as a RuntimeError about zip positions, and the user should see the real cause."""

    def __init__(self, handle: Any):
        self.handle, self.error = handle, None

    def write(self, data: bytes) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def flush(self) -> None:
        self.handle.flush()


def save_checkpoint(path: Path, **state: Any) -> None:
    """Write a checkpoint atomically: a crash or a full disk leaves the previous one intact."""

    def write(handle: Any) -> None:
        recorder = _WriteRecorder(handle)
        try:
            torch.save(state, recorder)
        except RuntimeError:
            if recorder.error is not None:
                raise recorder.error from None
            raise

    atomic_save(path, write)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded safely or at all; the message names the file and why."""


def read_checkpoint(path: Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint's contents, loaded with ``weights_only=True``: tensors and plain data, nothing that runs.

    A file whose pickle asks for anything else (a class, a function such as ``os.system``) is
    refused before any of it executes; so is a truncated or foreign file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"[Uu]nsupported (?:global|GLOBAL):? (?:GLOBAL )?[\w.]+", str(error))
        raise CheckpointError(
            f"checkpoint {path} was refused: it holds objects other than tensors and plain data, and loading "
            f"them could run code ({found.group(0) if found else 'not a plain-data pickle'}). Load only "
            "checkpoints written by referseg (those of referseg 0.1 held NumPy state: train them again), "
            "or convert official weights with referseg convert-official") from None
    except Exception as error:  # noqa: BLE001 - any failure to parse a user's file is that file's fault
        reason = str(error).strip().splitlines()[0].split(". ")[0][:160] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"checkpoint {path} cannot be read: it is truncated or not a referseg checkpoint "
                              f"({reason}). Use the file the trainer wrote, or train again") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a referseg checkpoint (a dict)")
    return state


def finished_checkpoint(run_dir: Path, profile: Profile, stage: int, needed_by: int) -> dict[str, Any]:
    """The final checkpoint of ``stage`` in ``run_dir``, which stage ``needed_by`` starts from (SPEC 5).

    Missing, unfinished or made with another profile, it is an error that names the command to run.
    """
    path = checkpoint_path(run_dir, stage)
    why = " (pretrain=true)" if stage == 0 else ""
    if not path.is_file():
        raise FileNotFoundError(
            f"stage {needed_by} starts from stage {stage}'s final checkpoint{why}, but {path} does not exist: "
            f"train stage {stage} first: {train_hint(run_dir, stage)}"
            + (", or set pretrain=false" if stage == 0 else "")
        )
    state = read_checkpoint(path)
    check_profile(state["profile"], profile, f"stage {stage} checkpoint {path}")
    if not state.get("finished"):
        raise ValueError(
            f"stage {stage} checkpoint {path} is at iteration {state['iteration']} of "
            f"{getattr(profile, f'stage{stage}').iterations}: finish it first: {train_hint(run_dir, stage, resume=True)}"
        )
    return state


def load_checkpoint(
    path: str | Path,
    device: str | torch.device = "cpu",
    profile: Profile | None = None,
    vocab: Vocabulary | None = None,
) -> tuple[nn.Module, Profile, Vocabulary]:
    """The model, profile and vocabulary of a training checkpoint, in eval mode.

    With ``profile`` or ``vocab`` given, a checkpoint made with another profile or an
    incompatible vocabulary is refused with a message naming both.
    """
    from referseg.model.segmenter import build_model

    path = Path(path)
    device = resolve_device(device)
    state = read_checkpoint(path, "cpu")
    for key in ("model", "profile", "vocab"):
        if key not in state:
            raise ValueError(f"{path} is not a referseg training checkpoint (no {key!r} entry)")
    saved_profile = Profile.from_dict(state["profile"])
    saved_vocab = Vocabulary(state["vocab"])
    if profile is not None:
        check_profile(state["profile"], profile, f"checkpoint {path}")
    if vocab is not None:
        check_vocab(saved_vocab, vocab, f"checkpoint {path}")
    model = build_model(saved_profile, len(saved_vocab))
    model.load_state_dict(state["model"])
    model.to(device).eval()
    model.vocab = saved_vocab  # so predict() needs only the model
    model.profile = saved_profile
    return model, saved_profile, saved_vocab


def append_log(path: Path, record: dict[str, Any]) -> None:
    """One JSON line per log point (training loss averaged since the previous one)."""
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def _log_records(path: Path) -> list[dict[str, Any]]:
    """The log's records; a half-written last line (the process was killed mid-write) is dropped."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f"training log {path}: line {number} is not JSON; the log is damaged. "
                             "Delete it to keep only the checkpoint's state, or train the stage again") from None
    return records


def truncate_log(path: Path, iteration: int) -> None:
    """Keep the log lines up to ``iteration`` (later ones were written after the checkpoint a run resumes from)."""
    if not path.is_file():
        return
    kept = [record for record in _log_records(path) if record["iteration"] <= iteration]
    with atomic_open(path) as handle:
        handle.write("".join(json.dumps(record) + "\n" for record in kept))


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The JSONL training log as a list of records (a half-written last line is left out)."""
    return _log_records(Path(path))


def remove_stale_temporaries(folder: Path, name: str) -> list[Path]:
    """Delete the half-written ``.<name>.*.tmp`` files a killed writer left in ``folder``."""
    stale = sorted(folder.glob(f".{name}.*.tmp")) if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


# --- the run and its splits -----------------------------------------------------------


class FrozenBackbone(nn.Module):
    """Just the profile's frozen convolutions, in the shape :class:`referseg.features.FeatureCache` reads."""

    def __init__(self, profile: Profile):
        super().__init__()
        from referseg.model.backbones import build_backbone

        self.backbone = build_backbone(profile).freeze()

    @torch.no_grad()
    def backbone_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)


class Run:
    """A run folder's profile, vocabulary and dataset; ``split(name)`` gives its :class:`SplitData`."""

    def __init__(self, run_dir: str | Path, device: str | torch.device = "auto", progress: bool = True):
        self.run_dir = Path(run_dir)
        config_file, vocab_file = self.run_dir / CONFIG, self.run_dir / VOCAB
        missing = [f.name for f in (config_file, vocab_file) if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{self.run_dir} is not a run folder: {' and '.join(missing)} missing. "
                f"Train stage 1 first: {train_hint(self.run_dir)}"
            )
        self.profile = Profile.load(config_file)
        self.vocab = Vocabulary.load(vocab_file)
        self.device = resolve_device(device)
        self.progress = progress
        self._refer: Refer | OfficialReferIt | ReferItText | None = None
        self._splits: dict[str, SplitData] = {}
        self._feature_model: nn.Module | None = None

    @classmethod
    def prepare(cls, run_dir: str | Path, profile: Profile, device: str | torch.device = "auto",
                progress: bool = True) -> Run:
        """Open (or start) ``run_dir`` for ``profile``: data, vocabulary, then config and vocab checked or written."""
        from referseg.data.refer import build_vocab, data_identity, load_refer

        refer = load_refer(profile)
        vocab = build_vocab(profile, refer)
        prepare_run_dir(Path(run_dir), profile, vocab, data=data_identity(profile))
        run = cls(run_dir, device, progress)
        run._refer = refer
        return run

    @property
    def refer(self) -> Refer | OfficialReferIt | ReferItText:
        if self._refer is None:
            from referseg.data.refer import load_refer

            self._refer = load_refer(self.profile)
        return self._refer

    def feature_model(self) -> nn.Module:
        """A module whose ``backbone`` is the profile's frozen, pretrained convolutions."""
        if self._feature_model is None:
            self._feature_model = FrozenBackbone(self.profile).to(self.device)
        return self._feature_model

    def split(self, name: str) -> SplitData:
        if name not in self._splits:
            from referseg.data.refer import ReferSegDataset

            dataset = ReferSegDataset(self.refer, name, self.vocab, self.profile)
            self._splits[name] = SplitData(dataset, self)
        return self._splits[name]

    @property
    def eval_dir(self) -> Path:
        return self.run_dir / EVAL

    @property
    def features_dir(self) -> Path:
        return self.run_dir / FEATURES


@dataclass
class Targets:
    """Per-pair label rows of one stage, so a training step only gathers rows."""

    label_index: np.ndarray  # (N,) row of the region's labels (pairs of a region share it)
    labels: np.ndarray  # stage 1: (R, g, g) uint8; stage 2: (R, S*S/8) bit-packed uint8
    side: int  # g (stage 1) or S (stage 2)
    packed: bool

    def batch_labels(self, pairs: np.ndarray) -> torch.Tensor:
        rows = self.labels[self.label_index[pairs]]
        if self.packed:
            rows = np.unpackbits(rows, axis=1, count=self.side * self.side)
        return torch.from_numpy(rows.reshape(len(pairs), self.side, self.side).astype(np.float32))


def build_targets(dataset: ReferSegDataset, stage: int, progress: bool = True) -> Targets:
    """The labels of every pair of a split for one stage (SPEC 5), computed once per region.

    Stage 1: ``lowres_labels`` of the letterboxed mask (OR-pooled by default);
    stage 2: the letterboxed mask > 0 at S x S (SPEC 3), bit-packed. The dataset letterboxes
    (``refer.square_mask``, ``refer.lowres_mask``): ReferIt's boxes are pooled without a mask.
    """
    profile, refer, pairs = dataset.profile, dataset.refer, dataset.pairs
    region_row: dict[int, int] = {}
    labels = []
    for pair in tqdm(pairs, desc=f"stage {stage} labels", unit="pair", disable=not progress, leave=False):
        if pair.ann_id in region_row:
            continue
        region_row[pair.ann_id] = len(labels)
        if stage == 1:
            labels.append(refer.lowres_mask(pair.ann_id, profile.input_size, profile.grid,
                                            profile.lowres_labels).astype(np.uint8))
        else:
            labels.append(np.packbits(refer.square_mask(pair.ann_id, profile.input_size).reshape(-1)))
    return Targets(
        label_index=np.array([region_row[p.ann_id] for p in pairs], dtype=np.int64),
        labels=np.stack(labels),
        side=profile.grid if stage == 1 else profile.input_size,
        packed=stage == 2,
    )


class SplitData:
    """One split of a run: pairs, token ids, image rows, labels, cached features, masks on demand."""

    def __init__(self, dataset: ReferSegDataset, run: Run | None = None, features: np.ndarray | None = None):
        self.dataset = dataset
        self.run = run
        self.profile: Profile = dataset.profile
        self.vocab: Vocabulary = dataset.vocab
        self.split: str = dataset.split
        self.pairs = dataset.pairs
        self.pair_image = dataset.pair_image  # (N,) image row of each pair
        self.tokens = dataset.tokens  # (N, T) int64, SPEC 2
        order = np.argsort(self.pair_image, kind="stable")
        bounds = np.searchsorted(self.pair_image[order], np.arange(len(dataset.image_ids) + 1))
        self.by_image: list[np.ndarray] = [order[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        self._features = features
        self._targets: dict[int, Targets] = {}
        self._square_masks: dict[tuple[int, int], np.ndarray] = {}
        self._square_images: dict[tuple[int, int], np.ndarray] = {}  # small letterboxes (proposals, GrabCut)
        self.cache: dict[str, Any] = {}  # per-split results shared between baselines (e.g. proposals)

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def num_images(self) -> int:
        return len(self.dataset.image_ids)

    def cached_features(self, model: nn.Module, dtype: str = "float16") -> np.ndarray:
        """(images, C, g, g) features of ``model``'s frozen backbone, from the run's feature cache."""
        from referseg.features import FeatureCache

        if self.run is None:
            raise ValueError("SplitData without a run needs its features passed in")
        return FeatureCache(model, self.dataset, self.profile, self.run.features_dir, dtype=dtype,
                            device=self.run.device, progress=self.run.progress).load()

    @property
    def features(self) -> np.ndarray:
        """(images, C, g, g) frozen backbone features, from the run's feature cache (built once)."""
        if self._features is None:
            if self.run is None:
                raise ValueError("SplitData without a run needs its features passed in")
            self._features = self.cached_features(self.run.feature_model())
        return self._features

    def image_features(self, image_indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Float32 features of some images, (n, C, g, g)."""
        return torch.from_numpy(np.asarray(self.features[np.asarray(image_indices)], dtype=np.float32))

    def labels(self, stage: int, progress: bool = True) -> Targets:
        """The stage's training labels of every pair (:func:`build_targets`), computed once."""
        if stage not in self._targets:
            self._targets[stage] = build_targets(self.dataset, stage, progress)
        return self._targets[stage]

    def size(self, i: int) -> tuple[int, int]:
        """(height, width) of pair ``i``'s image."""
        image = self.dataset.refer.images[self.pairs[i].image_id]
        return image["height"], image["width"]

    def image_size(self, image_index: int) -> tuple[int, int]:
        image = self.dataset.refer.images[self.dataset.image_ids[image_index]]
        return image["height"], image["width"]

    def square_image(self, image_index: int, size: int) -> np.ndarray:
        """The image letterboxed to ``size x size`` (SPEC 3), uint8 RGB; kept for the next caller."""
        key = (image_index, size)
        if key not in self._square_images:
            image = self.dataset.refer.load_image(self.dataset.image_ids[image_index])
            self._square_images[key] = np.clip(letterbox_image(image, size) + 0.5, 0, 255).astype(np.uint8)
        return self._square_images[key]

    def original_mask(self, i: int) -> np.ndarray:
        return self.dataset.original_mask(i)

    def square_mask(self, i: int, size: int) -> np.ndarray:
        """Pair ``i``'s ground truth letterboxed to ``size x size`` (SPEC 3), cached per region."""
        key = (self.pairs[i].ann_id, size)
        if key not in self._square_masks:
            self._square_masks[key] = self.dataset.refer.square_mask(self.pairs[i].ann_id, size)
        return self._square_masks[key]

    def lowres_label(self, i: int) -> np.ndarray:
        """The g x g label of SPEC 5 (OR-pooled letterboxed mask by default)."""
        square = self.square_mask(i, self.profile.input_size)
        return lowres_labels(square, self.profile.grid, self.profile.lowres_labels)

    def meta(self, i: int) -> dict:
        return self.dataset.meta(i)

    def training_images(self, limit: int, seed: int) -> np.ndarray:
        """Indices of at most ``limit`` images (all when 0), a seeded random choice, sorted."""
        if not limit or limit >= self.num_images:
            return np.arange(self.num_images)
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(self.num_images, size=limit, replace=False))
