"""One function per benchmark of issue 6; each returns a JSON-ready dict and asserts no timing.

Every function takes the profile (and sizes) it measures, so ``benchmarks.run`` measures the
``paper`` and ``cpu`` profiles while the tests run the same code at a tiny size. Model code,
losses, the trainer and the feature cache are the package's own; only the inputs are made here.
"""

from __future__ import annotations

import json
import multiprocessing
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.machine import Stopwatch, synchronize
from referseg.config import Profile
from referseg.data.transforms import letterbox_image, letterbox_mask, prediction_mask
from referseg.losses import weighted_sigmoid_ce
from referseg.metrics import evaluate_masks
from referseg.model.backbones import build_backbone
from referseg.model.segmenter import build_model, param_groups
from referseg.text import Vocabulary
from referseg.train import freeze_backbone

OFFICIAL_REFERIT = Path(__file__).resolve().parents[2] / "shared" / "data" / "referit-official"
REFERIT_TRAINVAL_IMAGES = 9_995  # SPEC 2: trainval images with queries (the paper's training set)
REFERIT_TEST_PAIRS = 60_105  # SPEC 2, 6: (region, expression) pairs of the test split
REFERIT_SIZES = ((360, 480), (480, 360), (320, 480), (480, 320))  # SPEC 2: (height, width), mostly the first two
CPU_BOOK_BUDGET_S = 600.0  # DESIGN "Profiles": the whole cpu book within 10 minutes
CPU_BOOK_TARGET_S = 300.0  # issue 15: its notebooks within 5 minutes on two idle cores
EXPRESSION = "man on the left"  # any expression: latency does not depend on the words

# Leaf modules of the Segmenter whose FLOPs are reported apart (SPEC 4 names).
STEP_PARTS = {
    "frozen convolutions": "backbone",
    "fc6": "head.fc6",
    "fc7": "head.fc7",
    "fc8": "head.fc8",
    "LSTM": "text.lstm",
    "classifier": "classifier",
    "upsampling": "upsample",
}


# --------------------------------------------------------------------------- real ReferIt facts


def official_vocabulary() -> Vocabulary | None:
    """The official 8,803-token ReferIt vocabulary from ``../shared``, or None when absent."""
    path = OFFICIAL_REFERIT / "vocabulary_referit.txt"
    return Vocabulary.load(path) if path.is_file() else None


def referit_training_images() -> tuple[int, str]:
    """(images, source) of ReferIt's training set: the official trainval list, else SPEC 2."""
    path = OFFICIAL_REFERIT / "referit_trainval_imlist.txt"
    if path.is_file():
        count = sum(1 for line in path.read_text().splitlines() if line.strip())
        return count, "official referit_trainval_imlist.txt"
    return REFERIT_TRAINVAL_IMAGES, "SPEC 2"


def referit_sizes(count: int) -> list[tuple[int, int]]:
    """(height, width) of ``count`` ReferIt test images (official sizes file), else SPEC 2's sizes."""
    path = OFFICIAL_REFERIT / "referit_imsize.json"
    sizes = list(REFERIT_SIZES)
    if path.is_file():
        test_ids = (OFFICIAL_REFERIT / "referit_test_imlist.txt").read_text().split()
        widths_heights = json.loads(path.read_text())
        sizes = [(wh[1], wh[0]) for wh in (widths_heights.get(f"{i}.jpg") for i in test_ids[:count]) if wh]
    return [sizes[i % len(sizes)] for i in range(count)]


# --------------------------------------------------------------------------- FLOPs


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def step_flops(profile: Profile, vocab_size: int, high_res: bool = False) -> dict[str, Any]:
    """FLOPs of one training step (forward + backward), counted by FlopCounterMode on the meta device.

    The meta device computes shapes only, so even the paper step is counted at once. The
    frozen convolutions run forward only (no gradients, SPEC 5); ``parts`` splits the total
    by module, and ``trainable`` is everything but the frozen convolutions.
    """
    with torch.device("meta"):
        model = build_model(profile.replace(backbone_weights=None), vocab_size)
    model.train()
    batch, size, grid = profile.batch_size, profile.input_size, profile.grid
    side = size if high_res else grid
    images = torch.zeros(batch, 3, size, size, device="meta")
    tokens = torch.zeros(batch, profile.seq_len, dtype=torch.int64, device="meta")
    labels = torch.zeros(batch, side, side, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        logits = model(tokens, images=images, high_res=high_res)
        weighted_sigmoid_ce(logits, labels).backward()
    counts = counter.get_flop_counts()
    total = int(counter.get_total_flops())
    parts = {name: int(sum(counts.get(f"Segmenter.{module}", {}).values())) for name, module in STEP_PARTS.items()}
    parts = {name: value for name, value in parts.items() if value}
    parts["other"] = total - sum(parts.values())
    return {"total": total, "parts": parts, "trainable": total - parts.get("frozen convolutions", 0),
            "batch_size": batch, "high_res": high_res}


def backbone_flops(profile: Profile, images: int) -> int:
    """Forward FLOPs of the frozen convolutions on ``images`` images (meta device)."""
    with torch.device("meta"):
        backbone = build_backbone(profile.replace(backbone_weights=None))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        backbone(torch.zeros(images, 3, profile.input_size, profile.input_size, device="meta"))
    return int(counter.get_total_flops())


# --------------------------------------------------------------------------- training step


def _mkldnn(enabled: bool) -> Any:
    """oneDNN on or off for convolutions on the CPU (its TF32 notice about Intel GPUs silenced)."""
    warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
    return torch.backends.mkldnn.flags(enabled=enabled)


def _memory_format(name: str) -> torch.memory_format:
    formats = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    if name not in formats:
        raise ValueError(f"memory format {name!r}: use one of {', '.join(formats)}")
    return formats[name]


def random_batch(profile: Profile, vocab_size: int, batch: int, high_res: bool = False, seed: int = 0,
                 device: str | torch.device = "cpu", memory_format: str = "contiguous") -> dict[str, torch.Tensor]:
    """Normalised images, tokens and 0/1 labels of the profile's shapes (timing does not depend on content)."""
    generator = torch.Generator().manual_seed(seed)
    size, side = profile.input_size, profile.input_size if high_res else profile.grid
    images = torch.randn(batch, 3, size, size, generator=generator)
    return {
        "images": images.to(device).contiguous(  # "model": as the trainer feeds them
            memory_format=_memory_format("contiguous" if memory_format == "model" else memory_format)),
        "tokens": torch.randint(0, vocab_size, (batch, profile.seq_len), generator=generator).to(device),
        "labels": (torch.rand(batch, side, side, generator=generator) > 0.5).float().to(device),
    }


def training_step(profile: Profile, vocab_size: int, steps: int = 2, warmup_batch: int | None = None,
                  memory_format: str = "contiguous", mkldnn: bool = True, device: str = "cpu",
                  high_res: bool = False) -> dict[str, Any]:
    """Seconds per training step of SPEC 5 (SGD, batch ``profile.batch_size``) with images in.

    The step is the trainer's: frozen convolutions (forward, no gradients), then the trainable
    layers forward, weighted sigmoid cross-entropy, backward and the SGD update. The two phases
    are timed apart: with the feature cache a step is only the second one.
    ``warmup_batch`` (default: the full batch) is the batch of the untimed first step.
    """
    device_ = torch.device(device)
    config = profile.stage2 if high_res else profile.stage1
    torch.manual_seed(profile.seed)
    model = build_model(profile, vocab_size).to(device_)
    if memory_format != "model":  # "model": each part in the layout the model itself chooses (the trainer's)
        model = model.to(memory_format=_memory_format(memory_format))
    model.train()
    freeze_backbone(model, profile)
    optimizer = torch.optim.SGD(param_groups(model, profile.weight_decay), lr=config.lr, momentum=profile.momentum)

    phases = ("frozen forward", "trainable forward", "backward", "SGD update")

    def step(batch: dict[str, torch.Tensor]) -> dict[str, Stopwatch]:
        watches = {phase: Stopwatch(device_) for phase in phases}
        with watches["frozen forward"]:
            features = model.backbone_features(batch["images"])
        with watches["trainable forward"]:
            logits = model(batch["tokens"], features=features, high_res=high_res)
            loss = weighted_sigmoid_ce(logits.float(), batch["labels"], config.pos_weight, config.neg_weight)
        with watches["backward"]:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with watches["SGD update"]:
            optimizer.step()
        return watches

    with _mkldnn(mkldnn):
        step(random_batch(profile, vocab_size, warmup_batch or profile.batch_size, high_res, 1, device_,
                          memory_format))
        batch = random_batch(profile, vocab_size, profile.batch_size, high_res, 2, device_, memory_format)
        timed_steps = [step(batch) for _ in range(steps)]
    flops = step_flops(profile, vocab_size, high_res)
    wall = {phase: _median([t[phase].wall for t in timed_steps]) for phase in phases}
    cpu = {phase: _median([t[phase].cpu for t in timed_steps]) for phase in phases}
    totals = [sum(t[phase].wall for phase in phases) for t in timed_steps]
    step_s = _median(totals)
    step_cpu_s = _median([sum(t[phase].cpu for phase in phases) for t in timed_steps])
    frozen_s, frozen_cpu_s = wall["frozen forward"], cpu["frozen forward"]
    trainable_s = step_s - frozen_s
    trainable_cpu_s = step_cpu_s - frozen_cpu_s
    frozen_flops = flops["parts"].get("frozen convolutions", 0)
    threads = torch.get_num_threads()

    def per(value: float, seconds: float) -> float | None:
        return value / seconds if seconds > 0 else None

    return {
        "profile": profile.name, "device": device_.type, "batch_size": profile.batch_size,
        "input_size": profile.input_size, "backbone": profile.backbone, "vocab_size": vocab_size,
        "memory_format": memory_format, "mkldnn": mkldnn, "warmup_batch": warmup_batch or profile.batch_size,
        "threads": threads, "steps": steps, "step_s": step_s, "step_cpu_s": step_cpu_s, "steps_s": totals,
        "phases_s": wall, "phases_cpu_s": cpu, "cpu_share": step_cpu_s / (step_s * threads),
        "frozen_s": frozen_s, "trainable_s": trainable_s,
        "flops": flops["total"], "flop_parts": flops["parts"], "trainable_flops": flops["trainable"],
        "flops_per_s": flops["total"] / step_s,
        "frozen_flops_per_s": per(frozen_flops, frozen_s),
        "trainable_flops_per_s": per(flops["trainable"], trainable_s),
        "flops_per_cpu_s": per(flops["total"], step_cpu_s),
        "frozen_flops_per_cpu_s": per(frozen_flops, frozen_cpu_s),
        "trainable_flops_per_cpu_s": per(flops["trainable"], trainable_cpu_s),
    }


def backbone_configurations(profile: Profile, images: int = 1, repeats: int = 2,
                            input_size: int | None = None) -> list[dict[str, Any]]:
    """Forward speed of the frozen convolutions under each CPU set-up: memory format x oneDNN.

    ``input_size`` may shrink the images to keep this quick; the convolutions stay the same.
    Each set-up's best of ``repeats``, in wall-clock and in CPU seconds (steadier under load).
    """
    profile = profile.replace(input_size=input_size) if input_size else profile
    backbone = build_backbone(profile).eval()
    flops = backbone_flops(profile, images)
    results = []
    for memory_format, mkldnn in (("contiguous", True), ("channels_last", True), ("contiguous", False)):
        model = backbone.to(memory_format=_memory_format(memory_format))
        model.channels_last = memory_format == "channels_last"  # the layout measured, not the model's own
        batch = random_batch(profile, 4, images, memory_format=memory_format)["images"]
        with torch.no_grad(), _mkldnn(mkldnn):
            model(batch)  # warm-up
            watches = []
            for _ in range(repeats):
                with Stopwatch() as watch:
                    model(batch)
                watches.append(watch)
        best_wall, best_cpu = min(w.wall for w in watches), min(w.cpu for w in watches)
        results.append({"memory_format": memory_format, "mkldnn": mkldnn, "images": images,
                        "input_size": profile.input_size, "seconds": best_wall, "cpu_s": best_cpu,
                        "flops_per_s": flops / best_wall, "flops_per_cpu_s": flops / best_cpu if best_cpu else None})
    return results


def head_configurations(profile: Profile, repeats: int = 2, batch: int | None = None) -> list[dict[str, Any]]:
    """fc6-fc8 of a training step (forward, then backward to the weights) in each memory format.

    The head's input is the frozen convolutions' output (no gradient), at the profile's grid
    and batch; its FLOPs are counted on the same call. Best of ``repeats`` per layout.
    """
    from referseg.model.backbones import build_fc_head

    batch = batch or profile.batch_size
    torch.manual_seed(profile.seed)
    in_channels = build_backbone(profile.replace(backbone_weights=None)).out_channels
    head = build_fc_head(profile, in_channels)
    features = torch.randn(batch, in_channels, profile.grid, profile.grid)
    counter = FlopCounterMode(display=False)
    with counter:
        head(features).sum().backward()
    flops = int(counter.get_total_flops())
    results = []
    for memory_format in ("contiguous", "channels_last"):
        layout = _memory_format(memory_format)
        model = head.to(memory_format=layout)
        inputs = features.contiguous(memory_format=layout)
        watches = []
        for _ in range(repeats + 1):  # the first is a warm-up
            model.zero_grad(set_to_none=True)
            with Stopwatch() as watch:
                model(inputs).sum().backward()
            watches.append(watch)
        best_wall, best_cpu = min(w.wall for w in watches[1:]), min(w.cpu for w in watches[1:])
        results.append({"memory_format": memory_format, "batch": batch, "grid": profile.grid, "flops": flops,
                        "seconds": best_wall, "cpu_s": best_cpu, "flops_per_s": flops / best_wall,
                        "flops_per_cpu_s": flops / best_cpu if best_cpu else None})
    return results


# --------------------------------------------------------------------------- stage 1 with and without the cache


def _status_mib(field: str) -> float | None:
    """A memory field of ``/proc/self/status`` (``VmHWM``, ``VmRSS``) in MiB; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB: VmHWM, which (unlike ru_maxrss) a fresh
    process does not inherit from the parent it was forked from; ru_maxrss off Linux."""
    peak = _status_mib("VmHWM")
    if peak is not None:
        return peak
    import resource

    scale = 1024 if sys.platform != "darwin" else 1024 * 1024  # ru_maxrss: KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def train_steps_child(profile: Profile, run_dir: str, steps: int, threads: int) -> dict[str, Any]:
    """In a fresh process: ``referseg.train.train`` stage 1 for ``steps`` iterations; step times and peak memory."""
    from referseg.runs import read_log
    from referseg.train import train

    torch.set_num_threads(threads)
    rss_start = peak_rss_mib()
    start = time.perf_counter()
    train(profile, 1, Path(run_dir), stop_after=steps, progress=False)
    seconds = time.perf_counter() - start
    records = read_log(Path(run_dir) / "stage1" / "log.jsonl")
    return {"step_s": [profile.batch_size / record["pairs_per_s"] for record in records],
            "run_s": seconds, "max_rss_mib": peak_rss_mib(), "max_rss_after_imports_mib": rss_start}


def stage1_cache_speedup(profile: Profile, run_root: Path, steps: int = 12, skip: int = 2,
                         threads: int | None = None) -> dict[str, Any]:
    """Stage-1 seconds per step of the real trainer with and without the feature cache, from one run.

    Each run is a fresh process (``referseg.train.train`` with ``log_every=1``), so its peak
    resident memory (VmHWM) is the training's own. The first ``skip`` steps are warm-up.
    """
    threads = threads or torch.get_num_threads()
    context = multiprocessing.get_context("spawn")
    runs = {}
    for label, cached in (("with cache", True), ("without cache", False)):
        run_profile = profile.replace(cache_features=cached, log_every=1,
                                      checkpoint_every=max(profile.checkpoint_every, steps + 1))
        run_dir = run_root / ("cached" if cached else "uncached")
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            result = pool.submit(train_steps_child, run_profile, str(run_dir), steps, threads).result()
        timed = result["step_s"][skip:] or result["step_s"]
        runs[label] = {**result, "median_step_s": _median(timed), "timed_steps": len(timed)}
    with_cache, without = runs["with cache"]["median_step_s"], runs["without cache"]["median_step_s"]
    return {"profile": profile.name, "batch_size": profile.batch_size, "threads": threads, "steps": steps,
            "skipped": skip, "runs": runs, "speedup": without / with_cache}


# --------------------------------------------------------------------------- inference and evaluation


def inference_latency(profile: Profile, vocab: Vocabulary, repeats: int = 3,
                      image_size: int | None = None) -> dict[str, Any]:
    """Seconds for ``referseg.predict.predict`` on one square image and expression (letterbox in, mask out)."""
    from referseg.predict import predict

    torch.manual_seed(profile.seed)
    model = build_model(profile, len(vocab)).eval()
    side = image_size or profile.input_size
    image = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    predict(model, image, EXPRESSION, vocab, profile)  # warm-up
    watches = []
    for _ in range(repeats):
        with Stopwatch() as watch:
            mask = predict(model, image, EXPRESSION, vocab, profile)
        watches.append(watch)
    times = [watch.wall for watch in watches]
    return {"profile": profile.name, "image": f"{side}x{side}", "mask_shape": list(mask.shape),
            "input_size": profile.input_size, "threads": torch.get_num_threads(), "repeats": repeats,
            "median_s": _median(times), "best_s": min(times), "median_cpu_s": _median([w.cpu for w in watches])}


def evaluation_throughput(samples: int = 200, input_size: int = 512, mode: str = "logits") -> dict[str, Any]:
    """Samples per second of ``prediction_mask`` (undo the letterbox) and ``evaluate_masks`` at ReferIt sizes."""
    sizes = referit_sizes(samples)
    rng = np.random.default_rng(0)
    logits = [rng.standard_normal((input_size, input_size), dtype=np.float32) for _ in range(8)]
    targets = []
    for height, width in sizes:
        target = np.zeros((height, width), dtype=bool)
        target[height // 4 : 3 * height // 4, width // 3 : 2 * width // 3] = True
        targets.append(target)
    start = time.perf_counter()
    predictions = [prediction_mask(logits[i % len(logits)], h, w, mode) for i, (h, w) in enumerate(sizes)]
    middle = time.perf_counter()
    scores = evaluate_masks(predictions, targets)
    end = time.perf_counter()
    total = end - start
    return {"samples": len(scores["intersections"]), "input_size": input_size, "mode": mode,
            "sizes": sorted({f"{w}x{h}" for h, w in sizes}),
            "undo_letterbox_per_s": samples / (middle - start), "metrics_per_s": samples / (end - middle),
            "samples_per_s": samples / total, "referit_test_pairs": REFERIT_TEST_PAIRS,
            "referit_test_s": REFERIT_TEST_PAIRS * total / samples}


def evaluation_forward(profile: Profile, vocab_size: int, images: int = 16, pairs_per_image: int = 8,
                       repeats: int = 3) -> dict[str, Any]:
    """Seconds per pair of the evaluation's forward pass (cached features in, S x S logits out), with
    fc6-fc8 once per pair (the trainer's forward) and once per image (``split_logits``), alternating.

    Pairs come in ``profile.eval_batch_size`` batches of neighbouring images, as in ``split_logits``;
    SynthRef's test split has about 8 expressions per image. Also reports how far the logits differ.
    """
    torch.manual_seed(profile.seed)
    model = build_model(profile.replace(backbone_weights=None), vocab_size).eval()
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(images, model.backbone.out_channels, profile.grid, profile.grid, generator=generator)
    pair_image = np.repeat(np.arange(images), pairs_per_image)
    tokens = torch.randint(0, vocab_size, (len(pair_image), profile.seq_len), generator=generator)
    batches = [np.arange(start, min(start + profile.eval_batch_size, len(pair_image)))
               for start in range(0, len(pair_image), profile.eval_batch_size)]

    def per_pair() -> list[torch.Tensor]:
        return [model(tokens[batch], features=features[pair_image[batch]], high_res=True) for batch in batches]

    def per_image() -> list[torch.Tensor]:
        outputs = []
        for batch in batches:
            rows, index = np.unique(pair_image[batch], return_inverse=True)
            visual = model.visual_map(features[rows])
            outputs.append(model(tokens[batch], visual=visual, image_index=torch.from_numpy(index), high_res=True))
        return outputs

    times: dict[str, list[float]] = {"per pair": [], "per image": []}
    with torch.no_grad():
        reference, shared = per_pair(), per_image()  # warm-up, and the two results compared
        for _ in range(repeats):
            for label, forward in (("per pair", per_pair), ("per image", per_image)):
                start = time.perf_counter()
                forward()
                times[label].append((time.perf_counter() - start) / len(pair_image))
    difference = max(float((a - b).abs().max()) for a, b in zip(reference, shared, strict=True))
    per_pair_s, per_image_s = _median(times["per pair"]), _median(times["per image"])
    return {"profile": profile.name, "images": images, "pairs": len(pair_image), "pairs_per_image": pairs_per_image,
            "batch_size": profile.eval_batch_size, "threads": torch.get_num_threads(), "repeats": repeats,
            "per_pair_s": per_pair_s, "per_image_s": per_image_s, "speedup": per_pair_s / per_image_s,
            "identical": all(torch.equal(a, b) for a, b in zip(reference, shared, strict=True)),
            "max_difference": difference}


def backbone_build(profile: Profile, repeats: int = 3) -> dict[str, Any]:
    """Seconds of ``build_backbone``: the first call in a process reads the weights file, later ones do not."""
    from referseg.model import backbones

    backbones._LITE0_STATES.clear()  # as in a fresh process
    with Stopwatch() as first:
        build_backbone(profile)
    later = []
    for _ in range(repeats):
        with Stopwatch() as watch:
            build_backbone(profile)
        later.append(watch.wall)
    return {"profile": profile.name, "backbone": profile.backbone, "threads": torch.get_num_threads(),
            "first_s": first.wall, "later_s": _median(later), "repeats": repeats}


def synthref_generation(folder: Path, images: int, seed: int = 0) -> dict[str, Any]:
    """Seconds (wall clock and CPU) to generate a SynthRef of ``images`` images, PNG files included."""
    import shutil

    from referseg.data.synthetic import generate_synthref

    shutil.rmtree(folder, ignore_errors=True)
    with Stopwatch() as watch:
        generate_synthref(folder, seed=seed, images=images, progress=False)
    shutil.rmtree(folder, ignore_errors=True)
    return {"images": images, "seed": seed, "seconds": watch.wall, "cpu_s": watch.cpu,
            "images_per_s": images / watch.wall, "cpu_profile_images": 600, "cpu_profile_s": 600 * watch.wall / images}


# --------------------------------------------------------------------------- the cpu book


def notebook_times(folder: Path) -> dict[str, Any]:
    """Per-notebook seconds from the papermill metadata of the executed book (``book/notebooks``), and
    the book's time in all: the wall clock of the build that executed every one of them (its record,
    ``build.json``; notebooks run side by side), else the sum of their durations."""
    from referseg.book import BUILD_RECORD

    rows = []
    for path in sorted(Path(folder).glob("*.ipynb")):
        try:
            papermill = json.loads(path.read_text()).get("metadata", {}).get("papermill", {})
        except (OSError, ValueError):
            continue
        if papermill.get("duration") is None:
            continue
        rows.append({"notebook": path.stem, "seconds": float(papermill["duration"]),
                     "profile": papermill.get("parameters", {}).get("profile"),
                     "end_time": papermill.get("end_time"), "failed": papermill.get("exception") is not None})
    if not rows:
        return {"status": f"not measured (no executed notebooks in {folder})"}
    busy = sum(row["seconds"] for row in rows)
    try:
        build = json.loads((Path(folder) / BUILD_RECORD).read_text())
    except (OSError, ValueError):
        build = {}
    one_build = bool(build) and not build.get("skipped") and {row["notebook"] for row in rows} <= set(
        build.get("executed", []))
    total = float(build["wall_s"]) if one_build else busy
    measured = (f"wall clock of one build, {build['jobs']} at once" if one_build else
                "sum of the notebooks' durations (no record of one build that executed them all)")
    profiles = sorted({str(row["profile"]) for row in rows})
    return {"notebooks": rows, "total_s": total, "notebook_s": busy, "measured": measured,
            "jobs": build.get("jobs") if one_build else None, "profiles": profiles,
            "budget_s": CPU_BOOK_BUDGET_S, "target_s": CPU_BOOK_TARGET_S, "cpu_book": profiles == ["cpu"],
            "within_budget": profiles == ["cpu"] and total <= CPU_BOOK_BUDGET_S,
            "within_target": profiles == ["cpu"] and total <= CPU_BOOK_TARGET_S}


# --------------------------------------------------------------------------- the feature cache at paper scale


class FirstImages:
    """The first ``count`` images of a ReferSegDataset: all of it that a FeatureCache reads."""

    def __init__(self, dataset: Any, count: int):
        if count > len(dataset.image_ids):
            raise ValueError(f"asked for {count} images but split {dataset.split!r} has {len(dataset.image_ids)}")
        self.dataset = dataset
        self.split = f"{dataset.split}-first{count}"
        self.image_ids = list(dataset.image_ids[:count])

    def image_tensor(self, image_index: int) -> torch.Tensor:
        return self.dataset.image_tensor(image_index)


def feature_cache_paper_scale(profile: Profile, dataset: Any, images: int, folder: Path,
                              training_images: int) -> dict[str, Any]:
    """Build the real FeatureCache on ``images`` images; project its size and time to ``training_images``.

    Checks the machinery at the profile's per-image shape: a float16 (N, C, g, g) memory map,
    valid on reload, equal to the backbone's output within float16 rounding.
    """
    from referseg.features import FeatureCache

    torch.manual_seed(profile.seed)
    model = build_model(profile, len(dataset.vocab))
    view = FirstImages(dataset, images)
    cache = FeatureCache(model, view, profile, folder, dtype="float16", progress=False)
    with Stopwatch() as watch:
        path = cache.build()
    build_s, build_cpu_s = watch.wall, watch.cpu
    array = FeatureCache(model, view, profile, folder, dtype="float16", progress=False).load()
    with torch.no_grad():
        direct = model.backbone_features(view.image_tensor(0)[None])[0].numpy()
    scale = float(np.abs(direct).max()) or 1.0
    per_image = int(np.prod(array.shape[1:])) * array.dtype.itemsize
    rate = images / build_s
    return {
        "profile": profile.name, "backbone": profile.backbone, "input_size": profile.input_size,
        "images": images, "shape": list(array.shape), "dtype": str(array.dtype),
        "memory_mapped": isinstance(array, np.memmap), "valid_on_reload": cache.is_valid(),
        "max_relative_error": float(np.abs(array[0].astype(np.float32) - direct).max() / scale),
        "file_bytes": path.stat().st_size, "bytes_per_image": per_image,
        "build_s": build_s, "images_per_s": rate,
        "training_images": training_images,
        "projected_bytes": training_images * per_image, "projected_build_s": training_images / rate,
        "build_cpu_s": build_cpu_s, "threads": torch.get_num_threads(),
        # all threads busy all the time: the time on an otherwise idle machine
        "projected_build_idle_s": training_images * build_cpu_s / images / torch.get_num_threads(),
    }


# --------------------------------------------------------------------------- the data path at ReferIt scale

# The steps of the data path before any pixel is read, in the order a run takes them (SPEC 2, 5, 1).
DATA_PATH_STEPS = ("annotations", "vocabulary", "tokens", "stage-1 targets", "stage-2 targets", "evaluation",
                   "evaluation against boxes")
MACHINE_16GB_MIB = 16 * 1024  # a "16 GB" machine: 16 GiB of memory, of which the system needs some


def referit_data_profile(root: Path = OFFICIAL_REFERIT) -> Profile:
    """The ``paper`` profile reading ReferIt's official text files at ``root``: real expressions, boxes
    and image sizes (:class:`referseg.data.refer.ReferItText`), each region's box standing in for its
    mask; the official vocabulary when ``root`` has it. The files hold no pixels, so the profile leaves
    the visual features out (``visual_features=False``, as the ``text`` profile); the data path (512
    letterbox, 16x16 grid, OR-pooled labels, T = 20, trainval and test) is the paper's."""
    from referseg.config import get_profile

    vocabulary = Path(root) / "vocabulary_referit.txt"
    return get_profile("paper", dataset="referit-text", visual_features=False, data_root=str(root),
                       vocab_file=str(vocabulary) if vocabulary.is_file() else None)


def resident_mib() -> float | None:
    """Resident memory of this process now (VmRSS) in MiB; None off Linux."""
    return _status_mib("VmRSS")


def reset_peak_rss() -> bool:
    """Lower this process's peak resident memory (VmHWM) to its resident memory now (Linux: ``5`` into
    ``/proc/self/clear_refs``), so that :func:`peak_rss_mib` then measures what follows; False if not."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return resident_mib() is not None


def data_step_child(profile: Profile, step: str, folder: str, threads: int = 1) -> dict[str, Any]:
    """In a fresh process: one step of :data:`DATA_PATH_STEPS` with the package's own functions, after
    its prerequisites (built first, not timed). Wall and CPU seconds, the process's peak resident memory
    (VmHWM: imports, prerequisites and the step) and the step's own (its peak over the resident memory
    at its start, the peak lowered there with :func:`reset_peak_rss`), and the sizes it made."""
    from referseg.data.refer import ReferSegDataset, build_vocab, load_refer
    from referseg.evaluate import box_counts, evaluate_stream, mean_box_prior, modes_for, save_method
    from referseg.runs import Run, SplitData, build_targets

    if step not in DATA_PATH_STEPS:
        raise ValueError(f"unknown step {step!r}; the steps are {', '.join(DATA_PATH_STEPS)}")
    torch.set_num_threads(threads)
    warnings.simplefilter("ignore")  # "expressions of only unknown words": the text chapter counts them
    imports_mib = peak_rss_mib()
    refer: Any = None
    vocab: Any = None
    dataset: Any = None
    run: Any = None
    train: Any = None
    if step in ("vocabulary", "tokens", "stage-1 targets", "stage-2 targets"):
        refer = load_refer(profile)
    if step in ("tokens", "stage-1 targets", "stage-2 targets"):
        vocab = build_vocab(profile, refer)
    if step in ("stage-1 targets", "stage-2 targets"):
        dataset = ReferSegDataset(refer, profile.train_split, vocab, profile)
    if step.startswith("evaluation"):  # a run folder, as `referseg evaluate` reads: profile, vocabulary
        import pandas  # noqa: F401 - imported by the results' frame: its import is not the step's work

        run = Run.prepare(Path(folder) / "run", profile, device="cpu", progress=False)
    if step == "evaluation against boxes":
        train = run.split(profile.train_split)
    prerequisites_mib = peak_rss_mib()
    start_mib = resident_mib()
    reset = reset_peak_rss()

    phases: dict[str, float] = {}
    sizes: dict[str, Any] = {}
    mode, side = profile.eval_mode, profile.input_size
    wall, cpu = time.perf_counter(), time.process_time()

    def phase(name: str, function: Callable[[], Any]) -> Any:
        begin = time.perf_counter()
        value = function()
        phases[name] = time.perf_counter() - begin
        return value

    if step == "annotations":
        refer = phase("read", lambda: load_refer(profile))
        split_pairs = phase("pairs of the two splits",
                            lambda: {s: refer.pairs(s) for s in (profile.train_split, profile.eval_split)})
        train_pairs, test_pairs = split_pairs[profile.train_split], split_pairs[profile.eval_split]
        sizes = {"images": len(refer.images), "train_pairs": len(train_pairs), "test_pairs": len(test_pairs),
                 "train_regions": len({p.ann_id for p in train_pairs}),
                 "test_regions": len({p.ann_id for p in test_pairs})}
    elif step == "vocabulary":
        vocab = build_vocab(profile, refer)
        sizes = {"tokens": len(vocab), "source": "official file" if profile.vocab_file else
                 f"built from {profile.train_split}"}
    elif step == "tokens":
        dataset = phase("encode (ReferSegDataset)",
                        lambda: ReferSegDataset(refer, profile.train_split, vocab, profile))
        data = phase("SplitData", lambda: SplitData(dataset))
        sizes = {"pairs": len(data), "seq_len": data.tokens.shape[1], "images": data.num_images,
                 "token_bytes": data.tokens.element_size() * data.tokens.numel()}
    elif step in ("stage-1 targets", "stage-2 targets"):
        stage = int(step[6])
        targets = build_targets(dataset, stage, progress=False)
        sizes = {"pairs": len(targets.label_index), "regions": len(targets.labels),
                 "label_shape": list(targets.labels.shape[1:]), "side": targets.side, "packed": targets.packed,
                 "label_bytes": int(targets.labels.nbytes), "index_bytes": int(targets.label_index.nbytes)}
    elif step == "evaluation":  # a constant prediction through evaluate_models' own bookkeeping
        test = phase("test split (tokens)", lambda: run.split(profile.eval_split))
        square = np.ones((side, side), dtype=np.float32)  # the whole image, S x S logits
        modes = modes_for(mode)
        counts = phase("counts (evaluate_stream)", lambda: evaluate_stream(
            test, ((i, {"whole-image": square}) for i in range(len(test))), modes))
        summary = phase("frame, summary, files (save_method)", lambda: save_method(
            run, test, "whole-image", "whole image", counts["whole-image"], mode, sum(phases.values())))
        csv = run.eval_dir / f"whole-image_{test.split}.csv"
        sizes = {"pairs": len(test), "modes": list(modes), "regions": len({p.ann_id for p in test.pairs}),
                 "image_sizes": len({test.size(i) for i in range(len(test))}), "csv_bytes": csv.stat().st_size,
                 "overall_iou": summary["overall_iou"]}
    else:  # "evaluation against boxes": the text chapter's bookkeeping, the mean-box prior of trainval
        test = phase("test split (tokens)", lambda: run.split(profile.eval_split))
        coverage, level = phase("mean-box prior (mean_box_prior)", lambda: mean_box_prior(train))
        prior = (coverage - level).astype(np.float32)
        counts = phase("counts (box_counts)", lambda: box_counts(test, [(np.arange(len(test)), prior)], mode))
        summary = phase("frame, summary, files (save_method)", lambda: save_method(
            run, test, "mean-box", "mean-box prior", {mode: counts}, mode, sum(phases.values())))
        sizes = {"pairs": len(test), "modes": [mode], "train_pairs": len(train),
                 "csv_bytes": (run.eval_dir / f"mean-box_{test.split}.csv").stat().st_size,
                 "overall_iou": summary["overall_iou"]}
    seconds, cpu_s = time.perf_counter() - wall, time.process_time() - cpu
    peak_mib = peak_rss_mib()
    return {"step": step, "profile": profile.name, "seconds": seconds, "cpu_s": cpu_s, "phases_s": phases,
            "sizes": sizes, "threads": threads, "imports_mib": imports_mib, "prerequisites_mib": prerequisites_mib,
            "peak_mib": max(prerequisites_mib, peak_mib),
            "step_mib": peak_mib - start_mib if reset and start_mib is not None else None,
            "peak_reset": reset}


def data_path_scale(profiles: dict[str, Profile], folder: Path, threads: int = 1,
                    steps: Sequence[str] = DATA_PATH_STEPS) -> dict[str, Any]:
    """Seconds and peak memory of each step of the data path (:data:`DATA_PATH_STEPS`) for each of
    ``profiles`` (``{label: profile}``, e.g. ReferIt, ``cpu``, ``smoke``), each step in a fresh process
    (:func:`data_step_child`) so that its peak resident memory is its own. The boxes' step runs where
    the data gives boxes (``dataset="referit-text"``). Run folders and files go under ``folder``.
    A step that fails (or whose process dies, e.g. out of memory) is recorded as ``error``."""
    context = multiprocessing.get_context("spawn")
    data: dict[str, Any] = {}
    for label, profile in profiles.items():
        by_step: dict[str, Any] = {}
        for step in steps:
            if step == "evaluation against boxes" and profile.dataset != "referit-text":
                by_step[step] = {"status": "not applicable (masks, not boxes)"}
                continue
            work = Path(folder) / label / step.replace(" ", "-")
            try:
                with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                    by_step[step] = pool.submit(data_step_child, profile, step, str(work), threads).result()
            except Exception as error:  # noqa: BLE001 - recorded; the run lists it among its errors
                by_step[step] = {"error": f"{type(error).__name__}: {error}"}
        data[label] = {"profile": profile.name, "dataset": profile.dataset, "data_root": profile.data_root,
                       "synth_images": profile.synth_images, "input_size": profile.input_size, "grid": profile.grid, "seq_len": profile.seq_len,
                       "train_split": profile.train_split, "eval_split": profile.eval_split,
                       "eval_mode": profile.eval_mode, "steps": by_step}
    measured = [(entry["peak_mib"], label, step) for label, entry in data.items()
                for step, entry in entry["steps"].items() if "peak_mib" in entry]
    largest = max(measured, default=(None, None, None))
    failed = [f"{label}: {step}" for label, entry in data.items() for step, entry in entry["steps"].items()
              if "error" in entry]
    return {"threads": threads, "steps": list(steps), "data": data, "limit_mib": MACHINE_16GB_MIB,
            "memory": "VmHWM of a fresh process per step (imports, prerequisites, step); the step's own: "
                      "its peak over the resident memory at its start (VmHWM lowered there via "
                      "/proc/self/clear_refs)",
            "largest_peak_mib": largest[0], "largest_peak": {"data": largest[1], "step": largest[2]},
            "fits_16gb": largest[0] is not None and largest[0] <= MACHINE_16GB_MIB and not failed,
            "failed": failed}


# --------------------------------------------------------------------------- the GPU path


class PreResizedImages(torch.utils.data.Dataset):
    """Letterboxed uint8 images, tokens and masks in memory: a data loader's workers only slice them."""

    def __init__(self, images: np.ndarray, tokens: np.ndarray, masks: np.ndarray):
        self.images, self.tokens, self.masks = images, tokens, masks

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"index": i, "image": torch.from_numpy(self.images[i]).permute(2, 0, 1),  # (3, S, S) uint8
                "tokens": torch.from_numpy(self.tokens[i]), "mask": torch.from_numpy(self.masks[i])}


def pre_resized(dataset: Any, count: int) -> PreResizedImages:
    """``count`` (image, expression, mask) samples of a ReferSegDataset, letterboxed once to uint8 (cycled)."""
    size = dataset.profile.input_size
    rows = [i % len(dataset.pairs) for i in range(count)]
    pairs = [dataset.pairs[i] for i in rows]
    boxed = {pid: letterbox_image(dataset.refer.load_image(pid), size).round().clip(0, 255).astype(np.uint8)
             for pid in {p.image_id for p in pairs}}
    images = np.stack([boxed[p.image_id] for p in pairs])
    tokens = dataset.tokens[rows].numpy()  # SPEC 2 ids, encoded once by the dataset
    masks = np.stack([letterbox_mask(dataset.refer.load_mask(p.ann_id), size) for p in pairs]).astype(np.uint8)
    return PreResizedImages(images, tokens, masks)


def _forever(loader: torch.utils.data.DataLoader) -> Iterator[dict[str, torch.Tensor]]:
    while True:
        yield from loader


def gpu_training(profile: Profile, data: PreResizedImages, vocab_size: int, steps: int = 20, warmup: int = 3,
                 device: str = "cuda", num_workers: int = 4, training_images: int | None = None) -> dict[str, Any]:
    """Steps per second of the paper set-up on a GPU, and the projected time of SPEC 5's schedule.

    channels_last, bfloat16 autocast, a DataLoader with workers and pinned memory over
    pre-resized uint8 images (normalised on the device). Four steps are timed: stages 1 and 2,
    each with images through the frozen convolutions and with features from a device-resident
    float16 cache (built here from the same loader; its build rate is measured too).
    Runs on any device (the tests use the CPU); the benchmark calls it only with a GPU.
    """
    device_ = torch.device(device)
    fmt = torch.channels_last
    torch.manual_seed(profile.seed)
    model = build_model(profile, vocab_size).to(device_).to(memory_format=fmt)
    model.train()
    freeze_backbone(model, profile)
    optimizer = torch.optim.SGD(param_groups(model, profile.weight_decay), lr=profile.stage1.lr,
                                momentum=profile.momentum)
    mean = torch.tensor(profile.pixel_mean, device=device_).view(1, 3, 1, 1)
    std = torch.tensor(profile.pixel_std, device=device_).view(1, 3, 1, 1)
    pinned = device_.type == "cuda"

    def loader(shuffle: bool) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            data, batch_size=profile.batch_size, shuffle=shuffle, drop_last=shuffle, num_workers=num_workers,
            pin_memory=pinned, persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers else None)

    def autocast() -> torch.autocast:
        return torch.autocast(device_.type, dtype=torch.bfloat16)

    def images_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        images = batch["image"].to(device_, non_blocking=True).float()
        return ((images - mean) / std).contiguous(memory_format=fmt)  # SPEC 3 normalisation, on the device

    # the feature cache, built on the device: (N, C, g, g) float16, rows indexed like ``data``
    features = None
    build_start = time.perf_counter()
    with torch.no_grad(), autocast():
        for batch in loader(shuffle=False):
            out = model.backbone_features(images_of(batch)).half()
            if features is None:
                features = torch.empty(len(data), *out.shape[1:], dtype=torch.float16, device=device_)
            features[batch["index"].to(device_)] = out
    synchronize(device_)
    build_s = time.perf_counter() - build_start

    def step(batch: dict[str, torch.Tensor], stage: int, cached: bool) -> None:
        config = profile.stage1 if stage == 1 else profile.stage2
        tokens = batch["tokens"].to(device_, non_blocking=True)
        masks = batch["mask"].to(device_, non_blocking=True).float()
        # SPEC 5 labels: stage 1 ORs each stride x stride block (max-pool of 0/1), stage 2 the S x S mask
        labels = F.max_pool2d(masks[:, None], profile.stride)[:, 0] if stage == 1 else masks
        with autocast():
            if cached:
                logits = model(tokens, features=features[batch["index"].to(device_)].float(), high_res=stage == 2)
            else:
                logits = model(tokens, images=images_of(batch), high_res=stage == 2)
        loss = weighted_sigmoid_ce(logits.float(), labels, config.pos_weight, config.neg_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    batches = _forever(loader(shuffle=True))
    flops = {stage: step_flops(profile, vocab_size, high_res=stage == 2) for stage in (1, 2)}
    timings = {}
    for stage in (1, 2):
        for cached in (False, True):
            for _ in range(warmup):
                step(next(batches), stage, cached)
            synchronize(device_)
            start = time.perf_counter()
            for _ in range(steps):
                step(next(batches), stage, cached)
            synchronize(device_)
            seconds = (time.perf_counter() - start) / steps
            counted = flops[stage]["trainable"] if cached else flops[stage]["total"]
            timings[f"stage{stage} {'cached' if cached else 'images'}"] = {
                "step_s": seconds, "steps_per_s": 1 / seconds, "flops": counted, "flops_per_s": counted / seconds}
    training_images = training_images or len(data)
    cache_rate = len(data) / build_s
    schedule = {}
    for variant in ("images", "cached"):
        seconds = (profile.stage1.iterations * timings[f"stage1 {variant}"]["step_s"]
                   + profile.stage2.iterations * timings[f"stage2 {variant}"]["step_s"])
        if variant == "cached":
            seconds += training_images / cache_rate
        schedule[variant] = seconds
    return {"device": device_.type, "gpu": torch.cuda.get_device_name(device_) if pinned else None,
            "profile": profile.name, "batch_size": profile.batch_size, "num_workers": num_workers,
            "pinned_memory": pinned, "memory_format": "channels_last", "autocast": "bfloat16",
            "samples": len(data), "steps": steps, "timings": timings,
            "cache_build_images_per_s": cache_rate, "training_images": training_images,
            "iterations": profile.stage1.iterations + profile.stage2.iterations,
            "projected_schedule_s": schedule}


def timed(function: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Call a benchmark and add the wall-clock seconds it took (``bench_s``)."""
    start = time.perf_counter()
    result = function(*args, **kwargs)
    if isinstance(result, dict):
        result["bench_s"] = time.perf_counter() - start
        return result
    return {"results": result, "bench_s": time.perf_counter() - start}
