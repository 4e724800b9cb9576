"""``make bench``: every benchmark of issue 6 in one run, about 5 minutes on two CPU cores.

    python -m benchmarks.run [--quick] [--out benchmarks/results] [--book book/benchmarks.md | --no-book]
    python -m benchmarks.run --data-path [--out benchmarks/results]

Writes ``<out>/bench-<time>.json`` and ``.md`` plus ``latest.json`` / ``latest.md``, and (unless
``--no-book`` or ``--quick``) the book's copy of the table. ``--quick`` runs every benchmark at
a tiny size in seconds: a check that the suite works, not a measurement. ``--data-path`` measures
only the data path at ReferIt scale (issue 13: each step at ReferIt's, the ``cpu`` and the ``smoke``
sizes, about 2 minutes on one thread; ``make bench`` runs it too) into ``<out>/data-path-<time>.json``
and ``.md`` (and ``data-path-latest.*``), never the book's page.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from benchmarks import report, suite
from benchmarks.machine import load_average, machine_info, matmul_peak
from referseg.config import Profile, get_profile
from referseg.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]


def bench_profiles(quick: bool) -> dict[str, Profile]:
    """``paper`` (random VGG-16 weights: ImageNet's cannot be fetched offline) and ``cpu``; tiny in quick mode."""
    paper = get_profile("paper", backbone_weights=None)
    cpu = get_profile("cpu")
    if quick:  # the paper's code path (VGG layout, fc6 7x7, stride 32) at a tiny width and size
        paper = paper.replace(name="paper-tiny", backbone="slim_vgg16", width_mult=1 / 16, input_size=64,
                              d_fc=32, d_im=32, d_embed=32, d_text=32, d_cls=16)
        cpu = get_profile("smoke")
    return {"paper": paper, "cpu": cpu}


def sizes(quick: bool, paper_steps: int) -> dict[str, Any]:
    """How much each benchmark measures: real runs (about 5 minutes on 2 idle cores), or tiny ones."""
    if quick:
        return {"synth_images": 12, "paper_steps": 1, "paper_warmup_batch": 1, "cpu_steps": 1, "cache_steps": 3,
                "cache_skip": 1, "paper_repeats": 1, "cpu_repeats": 1, "eval_samples": 10, "cache_images": 2,
                "config_size": None, "gpu_samples": 20, "gpu_steps": 2, "peak_sizes": (256, 512), "peak_repeats": 2,
                "forward_images": 2, "forward_repeats": 1, "build_repeats": 1, "synth_generated": 3}
    return {"synth_images": 40, "paper_steps": paper_steps, "paper_warmup_batch": 1, "cpu_steps": 3,
            "cache_steps": 8, "cache_skip": 2, "paper_repeats": 2, "cpu_repeats": 3, "eval_samples": 300,
            "cache_images": 3, "config_size": 256, "gpu_samples": 200, "gpu_steps": 20,
            "peak_sizes": (2048, 3072), "peak_repeats": 5, "forward_images": 12, "forward_repeats": 5,
            "build_repeats": 3, "synth_generated": 60}


def synthref_profile(profile: Profile, out: Path) -> Profile:
    """``profile`` on its SynthRef: the repository's (``data/synthref`` for ``cpu``) when it is there and
    has the profile's seed and size, else one generated (once, kept) under ``<out>/data``."""
    from referseg.data.refer import load_refer

    own = ROOT / profile.data_root
    if (own / "synthref" / "meta.json").is_file():
        try:
            candidate = profile.replace(data_root=str(own))
            load_refer(candidate)  # refuses a SynthRef of another seed or size
            return candidate
        except (FileExistsError, ValueError):
            pass
    candidate = profile.replace(data_root=str((out / "data" / f"synthref-{profile.synth_images}").resolve()))
    load_refer(candidate)  # generated here, not in a measured step
    return candidate


def data_path_profiles(quick: bool, out: Path) -> dict[str, Profile]:
    """The data sizes of the data path's table: ReferIt's text files (when ``../shared`` has them),
    the ``cpu`` and the ``smoke`` profiles' SynthRef; the ``smoke`` size alone in quick mode."""
    profiles: dict[str, Profile] = {}
    if not quick and (suite.OFFICIAL_REFERIT / "referit_query_test.json").is_file():
        profiles["ReferIt"] = suite.referit_data_profile()
    if not quick:
        profiles["cpu"] = synthref_profile(get_profile("cpu"), out)
    profiles["smoke"] = synthref_profile(get_profile("smoke"), out)
    return profiles


def measure_data_path(results: dict[str, Any], quick: bool, out: Path, scratch: Path,
                      measure: Callable[..., dict[str, Any]]) -> None:
    """``results["data_path"]``: every step of the data path at each size, one thread; a failed step
    is one of the run's errors."""
    results["data_path"] = measure("data path at ReferIt scale", suite.data_path_scale,
                                   data_path_profiles(quick, out), scratch / "data-path", threads=1)
    if results["data_path"].get("failed"):
        results["errors"].append("data path at ReferIt scale (" + "; ".join(results["data_path"]["failed"]) + ")")


def _measurer(results: dict[str, Any]) -> Callable[..., dict[str, Any]]:
    """``measure(name, function, ...)``: the benchmark's result with its seconds, or its error recorded."""

    def measure(name: str, function: Callable[..., Any], *fargs: Any, **kwargs: Any) -> dict[str, Any]:
        print(f"{name:<36}", end=" ", flush=True)
        begin = time.perf_counter()
        try:
            result = suite.timed(function, *fargs, **kwargs)
        except Exception as error:  # noqa: BLE001 - recorded, reported, and the exit status says so
            traceback.print_exc()
            result = {"error": f"{type(error).__name__}: {error}"}
            results["errors"].append(name)
        print(f"{time.perf_counter() - begin:7.1f} s", flush=True)
        return result

    return measure


def run_data_path(args: argparse.Namespace) -> dict[str, Any]:
    """Only the data path at ReferIt scale (``--data-path``): its own results, page and files."""
    out = Path(args.out)
    scratch = out / "scratch-data-path"
    shutil.rmtree(scratch, ignore_errors=True)
    start = time.perf_counter()
    results: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.run --data-path", "quick": False, "data_path_only": True,
        "machine": machine_info(), "load_average": {"start": load_average()}, "errors": [],
    }
    measure_data_path(results, False, out, scratch, _measurer(results))
    results["load_average"]["end"] = load_average()
    results["seconds"] = time.perf_counter() - start
    shutil.rmtree(scratch, ignore_errors=True)
    return results


def configuration_speed(entry: dict[str, Any]) -> float:
    """How a CPU set-up of the convolutions ranks: FLOPs per CPU-second (steady under load), else per second."""
    return entry.get("flops_per_cpu_s") or entry["flops_per_s"]


def run_benchmarks(args: argparse.Namespace) -> dict[str, Any]:
    """Every benchmark; a failing one is recorded (``error``) and the others still run."""
    from referseg.data.refer import ReferSegDataset, build_vocab, load_refer

    size = sizes(args.quick, args.paper_steps)
    profiles = bench_profiles(args.quick)
    out = Path(args.out)
    scratch = out / "scratch"  # run folders and caches of this run, removed at the end
    shutil.rmtree(scratch, ignore_errors=True)
    start = time.perf_counter()
    results: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "make bench" if not args.quick else "python -m benchmarks.run --quick",
        "quick": args.quick, "machine": machine_info(), "load_average": {"start": load_average()},
        "sizes": size, "errors": [],
    }

    measure = _measurer(results)
    results["peak"] = {"start": measure("matmul peak (CPU)", matmul_peak, "cpu", size["peak_sizes"],
                                         size["peak_repeats"])}
    gpu = torch.device("cuda") if torch.cuda.is_available() else None
    if gpu is not None:
        results["gpu_peak"] = measure("matmul peak (GPU)", matmul_peak, gpu)

    # Data: a small SynthRef (kept between runs), the vocabularies, the datasets.
    data_root = (out / "data" / f"synthref-{size['synth_images']}").resolve()
    cpu = profiles["cpu"].replace(data_root=str(data_root), synth_images=size["synth_images"])
    cpu_refer = load_refer(cpu)
    cpu_vocab = build_vocab(cpu, cpu_refer)
    official = suite.official_vocabulary()
    paper_vocab = official if official is not None and not args.quick else cpu_vocab
    results["vocabulary"] = {"paper": len(paper_vocab), "paper_source": "official ReferIt" if paper_vocab is official
                             else "SynthRef", "cpu": len(cpu_vocab)}
    paper = profiles["paper"]
    paper_on_synth = paper.replace(dataset="synthref", data_root=str(data_root), synth_images=size["synth_images"],
                                   train_split="train")
    training_images, training_images_source = suite.referit_training_images()

    configurations = measure("frozen convolutions: CPU set-ups", suite.backbone_configurations, paper,
                             input_size=size["config_size"])
    results["backbone_configurations"] = configurations
    default = [{"memory_format": "contiguous", "mkldnn": True, "flops_per_s": 0}]
    best = max(configurations.get("results", default), key=configuration_speed)
    results["peak"]["before paper step"] = measure("matmul peak (CPU), again", matmul_peak, "cpu",
                                                   size["peak_sizes"][:1], size["peak_repeats"])
    results["head_configurations"] = measure("fc6-fc8: CPU set-ups", suite.head_configurations, paper,
                                             repeats=size["paper_repeats"])
    # The step runs as the trainer does: each part in the layout the model gives it (VGG-16's
    # convolutions in channels_last, fc6-fc8 contiguous: the fastest of each table), with
    # oneDNN as the fastest set-up of the convolutions has it.
    results["training_step"] = {
        "paper": measure("training step, paper", suite.training_step, paper, len(paper_vocab),
                         steps=size["paper_steps"], warmup_batch=size["paper_warmup_batch"],
                         memory_format="model", mkldnn=best["mkldnn"]),
        "cpu": measure("training step, cpu", suite.training_step, cpu, len(cpu_vocab), steps=size["cpu_steps"]),
    }
    results["stage1_cache"] = measure("stage 1 with / without the cache", suite.stage1_cache_speedup, cpu,
                                      scratch / "runs", steps=size["cache_steps"], skip=size["cache_skip"])
    results["inference"] = {
        "paper": measure("inference, paper", suite.inference_latency, paper, paper_vocab,
                         repeats=size["paper_repeats"]),
        "cpu": measure("inference, cpu", suite.inference_latency, cpu, cpu_vocab, repeats=size["cpu_repeats"]),
    }
    results["evaluation"] = measure("evaluation throughput", suite.evaluation_throughput, size["eval_samples"],
                                    input_size=paper.input_size, mode=paper.eval_mode)
    results["evaluation_forward"] = measure("evaluation forward, cpu", suite.evaluation_forward, cpu,
                                            len(cpu_vocab), images=size["forward_images"],
                                            repeats=size["forward_repeats"])
    results["backbone_build"] = measure("backbone build, cpu", suite.backbone_build, cpu,
                                        repeats=size["build_repeats"])
    results["synthref"] = measure("SynthRef generation", suite.synthref_generation, scratch / "synthref",
                                  size["synth_generated"])
    measure_data_path(results, args.quick, out, scratch, measure)
    paper_dataset = ReferSegDataset(load_refer(paper_on_synth), paper_on_synth.train_split, cpu_vocab,
                                    paper_on_synth)
    results["feature_cache"] = measure("feature cache at paper scale", suite.feature_cache_paper_scale,
                                       paper_on_synth, paper_dataset, size["cache_images"], scratch / "features",
                                       training_images)
    results["feature_cache"]["training_images_source"] = training_images_source
    if gpu is not None:
        data = suite.pre_resized(paper_dataset, size["gpu_samples"])
        results["gpu"] = measure("GPU training, paper", suite.gpu_training, paper, data, len(paper_vocab),
                                 steps=size["gpu_steps"], device=str(gpu), training_images=training_images)
    else:
        results["gpu"] = {"status": "not measured (no GPU)"}
    results["notebooks"] = measure("notebook times", suite.notebook_times, ROOT / "book" / "notebooks")

    results["peak"]["end"] = measure("matmul peak (CPU), again", matmul_peak, "cpu", size["peak_sizes"][:1],
                                     size["peak_repeats"])
    peaks = [entry for entry in results["peak"].values() if "flops_per_s" in entry]
    results["peak"]["flops_per_s"] = max((entry["flops_per_s"] for entry in peaks), default=None)
    results["peak"]["flops_per_cpu_s"] = max((entry["flops_per_cpu_s"] for entry in peaks), default=None)
    for step in results["training_step"].values():
        if "flops_per_s" in step and results["peak"]["flops_per_s"]:
            step["of_peak"] = step["flops_per_s"] / results["peak"]["flops_per_s"]
            step["of_peak_per_cpu_s"] = step["flops_per_cpu_s"] / results["peak"]["flops_per_cpu_s"]
    results["load_average"]["end"] = load_average()
    results["seconds"] = time.perf_counter() - start
    shutil.rmtree(scratch, ignore_errors=True)
    return results


def write_results(results: dict[str, Any], out: Path, book: Path | None) -> Path:
    """``bench-<time>.json`` and ``.md`` in ``out``, ``latest.*`` beside them, and the book's copy."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = results["date"].replace(":", "").replace("+0000", "Z")  # the run's date: a re-render overwrites it
    text = json.dumps(results, indent=1, default=str) + "\n"
    page = report.markdown(results)
    kind = "data-path" if results.get("data_path_only") else "bench"
    latest = "data-path-latest" if kind == "data-path" else "latest"
    for name in (f"{kind}-{stamp}", latest):
        atomic_write_text(out / f"{name}.json", text)
        atomic_write_text(out / f"{name}.md", page)
    if book is not None:
        atomic_write_text(book, page)
    return out / f"{latest}.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="results folder")
    parser.add_argument("--book", default=str(ROOT / "book" / "benchmarks.md"),
                        help="the book's copy of the table (not written with --quick)")
    parser.add_argument("--no-book", action="store_true", help="do not update the book's copy")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check the suite in seconds")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    parser.add_argument("--paper-steps", type=int, default=2, help="timed paper training steps (about 30 s each)")
    parser.add_argument("--render", metavar="JSON", help="measure nothing: rewrite the tables of a results file")
    parser.add_argument("--data-path", action="store_true",
                        help="measure only the data path at ReferIt scale (never written to the book)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.render:
        results = json.loads(Path(args.render).read_text())
        args.quick = results.get("quick", False)
    elif args.data_path:
        results = run_data_path(args)
    else:
        results = run_benchmarks(args)
    partial = results.get("data_path_only", False)  # the book's page holds every benchmark
    book = None if args.no_book or args.quick or partial or results["errors"] else Path(args.book)
    page = write_results(results, Path(args.out), book)
    print(f"\n{page.read_text()}\nwritten: {page}" + (f" and {book}" if book else ""))
    if results["errors"]:
        print(f"error: these benchmarks failed: {', '.join(results['errors'])} (tracebacks above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
