"""The markdown page of one benchmark run: a header naming the machine, one summary table, details.

The text has no top-level heading so that a book page can include it under its own.
"""

from __future__ import annotations

from typing import Any

GIB = 2**30


def seconds(value: float | None) -> str:
    """0.0123 -> '12.3 ms', 4.56 -> '4.56 s', 754 -> '12.6 min', 9000 -> '2.50 h'."""
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.3g} ms"
    if value < 120:
        return f"{value:.3g} s"
    if value < 7200:
        return f"{value / 60:.3g} min"
    return f"{value / 3600:.3g} h"


def flops(value: float | None, per_second: bool = False) -> str:
    """3.0e12 -> '3.00 TFLOP' (or 'TFLOP/s')."""
    if value is None:
        return "-"
    unit = "FLOP/s" if per_second else "FLOP"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def size(value: float | None) -> str:
    """1_620_000_000 -> '1.62 GB', 48_000 -> '48 kB' (decimal units, as a file's size)."""
    if value is None:
        return "-"
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}B"
    return f"{value:.0f} B"


def mib(value: float | None) -> str:
    """3512.4 -> '3,512 MiB'."""
    return "-" if value is None else f"{value:,.0f} MiB"


def _row(*cells: Any) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def _line(*cells: Any) -> str:
    """A row of the summary table (seven columns)."""
    return _row(*cells, *[""] * (7 - len(cells)))


def _failed(result: dict[str, Any] | None) -> str | None:
    if result is None:
        return "not run"
    if "error" in result:
        return f"failed: {result['error']}"
    if "status" in result:
        return result["status"]
    return None


def _step_rows(label: str, step: dict[str, Any] | None, peak: dict[str, Any]) -> list[str]:
    problem = _failed(step)
    if problem:
        return [_row(label, "", problem, "", "", "", "")]
    assert step is not None
    layout = ("convolutions channels last, fc6-fc8 contiguous (the model's own)" if step["memory_format"] == "model"
              else step["memory_format"].replace("_", " "))
    setup = (f"{step['backbone']} at {step['input_size']}, batch {step['batch_size']}, "
             f"{layout}, oneDNN {'on' if step['mkldnn'] else 'off'}, "
             f"{step['threads']} threads (got {100 * step['cpu_share']:.0f}% of them)")
    frozen = step["flop_parts"].get("frozen convolutions", 0)

    def ratios(per_s: float | None, per_cpu_s: float | None) -> tuple[str, str, str]:
        return (flops(per_s, True), percent(per_s / peak["flops_per_s"] if per_s else None),
                percent(per_cpu_s / peak["flops_per_cpu_s"] if per_cpu_s and peak.get("flops_per_cpu_s") else None))

    return [
        _row(label, setup, f"{seconds(step['step_s'])} per step ({seconds(step['step_cpu_s'])} of CPU time: "
             f"{seconds(step['step_cpu_s'] / step['threads'])} on {step['threads']} idle CPUs)", flops(step["flops"]),
             *ratios(step["flops_per_s"], step["flops_per_cpu_s"])),
        _row("&nbsp;&nbsp;frozen convolutions (forward)", "", seconds(step["frozen_s"]), flops(frozen),
             *ratios(step["frozen_flops_per_s"], step["frozen_flops_per_cpu_s"])),
        _row("&nbsp;&nbsp;trainable layers (forward, backward, SGD) = a step with the cache", "",
             seconds(step["trainable_s"]), flops(step["trainable_flops"]),
             *ratios(step["trainable_flops_per_s"], step["trainable_flops_per_cpu_s"])),
    ]


def summary_rows(results: dict[str, Any]) -> list[str]:
    """The summary table's rows: one per benchmark of issue 6."""
    peak = results["peak"]
    rows = [_row("benchmark", "configuration", "result", "FLOPs", "FLOP/s", "of peak",
                 "of peak per CPU-second"), _row(*["---"] * 7)]
    per_cpu = peak.get("flops_per_cpu_s")
    rows.append(_line("matmul peak (CPU)", f"{peak['start']['dtype']} square matmuls (n = "
                     f"{', '.join(peak['start']['per_size'])}), best of {peak['start']['repeats']}, measured "
                     f"{sum(1 for v in peak.values() if isinstance(v, dict))} times in the run",
                     "", "", flops(peak["flops_per_s"], True), "100%",
                     f"{flops(per_cpu, True).replace('/s', '')} per CPU-second" if per_cpu else ""))
    gpu_peak = results.get("gpu_peak")
    if gpu_peak and "flops_per_s" in gpu_peak:
        rows.append(_line("matmul peak (GPU)", f"{gpu_peak['dtype']} square matmuls", "", "",
                         flops(gpu_peak["flops_per_s"], True), "100%", ""))
    steps = results.get("training_step", {})
    rows += _step_rows("training step, `paper`", steps.get("paper"), peak)
    rows += _step_rows("training step, `cpu`", steps.get("cpu"), peak)

    cache = results.get("stage1_cache")
    problem = _failed(cache)
    if problem:
        rows.append(_line("stage-1 step with / without the feature cache", "", problem, "", "", ""))
    else:
        runs = cache["runs"]
        setup = f"`{cache['profile']}` profile, `referseg.train`, batch {cache['batch_size']}, {cache['threads']} threads"
        rows.append(_line("stage-1 step with the feature cache", setup,
                         seconds(runs["with cache"]["median_step_s"]), "", "", ""))
        rows.append(_line("stage-1 step without the feature cache", "images decoded, letterboxed, convolved",
                         seconds(runs["without cache"]["median_step_s"]), "", "", ""))
        rows.append(_line("&nbsp;&nbsp;speed-up of the cache", "same run", f"**{cache['speedup']:.1f}x**", "", "", ""))
        rows.append(_line("peak memory of training", f"`{cache['profile']}` stage 1, {cache['steps']} steps, "
                         "peak resident memory (VmHWM) of the training process",
                         f"{runs['with cache']['max_rss_mib']:.0f} MiB with the cache, "
                         f"{runs['without cache']['max_rss_mib']:.0f} MiB without "
                         f"({runs['with cache']['max_rss_after_imports_mib']:.0f} MiB after imports)",
                         "", "", ""))

    for name, latency in results.get("inference", {}).items():
        problem = _failed(latency)
        rows.append(_line(f"inference latency, `{name}`",
                         "" if problem else f"`predict()`: one {latency['image']} image and expression",
                         problem or f"{seconds(latency['median_s'])} (best {seconds(latency['best_s'])}; "
                         f"{seconds(latency['median_cpu_s'])} of CPU time on {latency['threads']} threads)",
                         "", "", ""))
    evaluation = results.get("evaluation")
    problem = _failed(evaluation)
    rows.append(_line("evaluation throughput",
                     "" if problem else f"undo letterbox ({evaluation['input_size']} logits) + `evaluate_masks` "
                     f"at ReferIt sizes",
                     problem or f"{evaluation['samples_per_s']:.0f} samples/s "
                     f"(the {evaluation['referit_test_pairs']:,} test pairs in {seconds(evaluation['referit_test_s'])})",
                     "", "", ""))

    forward = results.get("evaluation_forward")
    problem = _failed(forward)
    rows.append(_line(f"evaluation forward, `{forward['profile'] if not problem else 'cpu'}`",
                     "" if problem else f"cached features to {forward['pairs']} S x S logits, "
                     f"{forward['pairs_per_image']} expressions per image, batch {forward['batch_size']}, "
                     f"{forward['threads']} threads",
                     problem or f"{seconds(forward['per_pair_s'])} per pair with fc6-fc8 once per pair, "
                     f"{seconds(forward['per_image_s'])} once per image: **{forward['speedup']:.1f}x** (logits "
                     + ("identical)" if forward["identical"] else f"within {forward['max_difference']:.1e})"),
                     "", "", ""))
    build = results.get("backbone_build")
    problem = _failed(build)
    rows.append(_line(f"backbone build, `{build['profile'] if not problem else 'cpu'}`",
                     "" if problem else f"`build_backbone`, {build['backbone']} with its "
                     f"ImageNet weights, {build['threads']} threads",
                     problem or f"{seconds(build['first_s'])} the first time in a process (reads the weights "
                     f"file), {seconds(build['later_s'])} after", "", "", ""))
    synthref = results.get("synthref")
    problem = _failed(synthref)
    rows.append(_line("SynthRef generation", "" if problem else f"{synthref['images']} images and their "
                     "annotations, PNG encoding included",
                     problem or f"{synthref['images_per_s']:.1f} images/s ({seconds(synthref['cpu_s'])} of CPU "
                     f"time); the `cpu` profile's {synthref['cpu_profile_images']} in "
                     f"{seconds(synthref['cpu_profile_s'])}", "", "", ""))

    features = results.get("feature_cache")
    problem = _failed(features)
    if problem:
        rows.append(_line("feature cache at paper scale", "", problem, "", "", ""))
    else:
        shape = "x".join(str(s) for s in features["shape"][1:])
        rows.append(_line("feature cache at paper scale",
                         f"{features['backbone']} at {features['input_size']}: {shape} {features['dtype']} "
                         f"per image, built on {features['images']} images",
                         f"{features['images_per_s']:.2f} images/s; {features['training_images']:,} training "
                         f"images: **{features['projected_bytes'] / 1e9:.2f} GB** "
                         f"({features['projected_bytes'] / GIB:.2f} GiB), "
                         f"**{seconds(features['projected_build_s'])}** at this run's speed, "
                         f"{seconds(features['projected_build_idle_s'])} on {features['threads']} idle CPUs",
                         "", "", ""))

    data_path = results.get("data_path")
    if data_path is not None:
        rows.append(_line("data path at ReferIt scale", "annotations, vocabulary, tokens, stage-1 and stage-2 "
                         "targets, evaluation bookkeeping: each step in a fresh process, at each data size "
                         "(table below)", _failed(data_path) or _data_path_verdict(data_path), "", "", ""))

    gpu = results.get("gpu")
    problem = _failed(gpu)
    if problem:
        rows.append(_line("GPU training, `paper`", "channels_last, bf16 autocast, pinned loader", problem, "", "", ""))
    else:
        for key, timing in gpu["timings"].items():
            rows.append(_line(f"GPU training, `paper`, {key}",
                             f"{gpu['gpu']}, channels_last, bf16, {gpu['num_workers']} loader workers",
                             f"{timing['steps_per_s']:.1f} steps/s", flops(timing["flops"]),
                             flops(timing["flops_per_s"], True),
                             percent(timing["flops_per_s"] / results["gpu_peak"]["flops_per_s"])
                             if "flops_per_s" in results.get("gpu_peak", {}) else ""))
        for variant, total in gpu["projected_schedule_s"].items():
            rows.append(_line(f"&nbsp;&nbsp;{gpu['iterations']:,} iterations ({variant})", "projected",
                             seconds(total), "", "", ""))

    notebooks = results.get("notebooks")
    problem = _failed(notebooks)
    if problem:
        rows.append(_line("the `cpu` book", "papermill durations", problem, "", "", ""))
    else:
        which = ", ".join(notebooks["profiles"])
        verdict = (("within" if notebooks["within_budget"] else "over") + f" the {seconds(notebooks['budget_s'])} budget"
                   + (", " + ("within" if notebooks.get("within_target") else "over")
                      + f" the {seconds(notebooks['target_s'])} target" if "target_s" in notebooks else "")
                   if notebooks["cpu_book"] else f"profile {which}: the `cpu` book is not measured")
        how = notebooks.get("measured", "sum of the notebooks' durations")
        busy = (f"; {seconds(notebooks['notebook_s'])} of notebook time"
                if notebooks.get("jobs") else "")
        rows.append(_line("the book's notebooks", f"{len(notebooks['notebooks'])} notebooks, profile {which}",
                         f"{seconds(notebooks['total_s'])} in all ({verdict}; {how}{busy})", "", "", ""))
    return rows


def _data_path_size(step: str, sizes: dict[str, Any]) -> str:
    """What one step of the data path made, in words."""
    if step == "annotations":
        return (f"{sizes['images']:,} images; {sizes['train_pairs']:,} training pairs ({sizes['train_regions']:,} "
                f"regions), {sizes['test_pairs']:,} test pairs")
    if step == "vocabulary":
        return f"{sizes['tokens']:,} tokens ({sizes['source']})"
    if step == "tokens":
        return f"{sizes['pairs']:,} training pairs x {sizes['seq_len']} ids ({size(sizes['token_bytes'])})"
    if step.startswith("stage-"):
        shape = (f"{sizes['side']}x{sizes['side']} bit-packed" if sizes["packed"]
                 else "x".join(str(n) for n in sizes["label_shape"]) + " uint8")
        return f"{sizes['regions']:,} regions, {shape}: {size(sizes['label_bytes'])}"
    modes = " and ".join(sizes["modes"])
    what = "their boxes, the mean-box prior" if step == "evaluation against boxes" else "masks at original size"
    return f"{sizes['pairs']:,} test pairs against {what} ({modes}); CSV {size(sizes['csv_bytes'])}"


def _data_path_verdict(data_path: dict[str, Any]) -> str:
    """The largest peak and whether it fits a 16 GB machine, in a sentence."""
    if data_path.get("largest_peak_mib") is None:
        return "nothing measured"
    where = data_path["largest_peak"]
    largest = data_path["largest_peak_mib"]
    first = next(iter(data_path["data"]))  # the largest data comes first
    stage2 = data_path["data"][first]["steps"].get("stage-2 targets", {})
    made = ""
    if "sizes" in stage2:
        made = (f"{first} stage-2 targets: {stage2['sizes']['regions']:,} regions, "
                f"{size(stage2['sizes']['label_bytes'])} in {seconds(stage2['seconds'])}; ")
    verdict = ("fits a 16 GB machine" if data_path["fits_16gb"] else
               "**does not fit a 16 GB machine**" if largest > data_path["limit_mib"] else
               "failed: " + ", ".join(data_path["failed"]))
    return (f"{made}largest peak {mib(largest)} ({where['step']}, {where['data']}): "
            f"{percent(largest / data_path['limit_mib'])} of 16 GiB, {verdict}")


def data_path_lines(results: dict[str, Any]) -> list[str]:
    """The data path's table: each step at each size (ReferIt, ``cpu``, ``smoke``), time and peak memory."""
    data_path = results.get("data_path")
    if data_path is None:
        return []
    problem = _failed(data_path)
    if problem:
        return ["", f"Data path at ReferIt scale: {problem}."]
    labels = list(data_path["data"])
    described = []
    for label, entry in data_path["data"].items():
        source = ("ReferIt's official text files (real expressions, boxes and image sizes; a region's box "
                  "stands in for its mask)" if entry["dataset"] == "referit-text" else
                  f"its SynthRef ({entry['synth_images']:,} images)" if entry["dataset"] == "synthref" else
                  f"its {entry['dataset']}")
        described.append(f"{label}: profile `{entry['profile']}` at {entry['input_size']} "
                         f"({entry['grid']}x{entry['grid']} grid) on {source}")
    lines = ["", "The data path before any pixel is read, at each data size: the package's own functions "
             "(`load_refer`, `build_vocab`, `ReferSegDataset` and `SplitData`, `build_targets` for stages 1 and 2 "
             "on the training split, and on the test split `evaluate_stream` of a constant whole-image "
             "prediction in both modes, then `save_method`'s per-sample frame, summary and files; for boxes "
             "`mean_box_prior` and `box_counts` as the text chapter does). "
             + "; ".join(described) + ". "
             f"Each step runs in a fresh process ({data_path['threads']} thread) after its prerequisites, "
             "which are not timed. Peak memory: the process's peak resident memory (VmHWM: imports, "
             "prerequisites and the step); the step's own: its peak above the resident memory at its start "
             "(VmHWM lowered there through `/proc/self/clear_refs`).", "",
             _row("step", "data", "size", "time", "peak memory", "the step's own"), _row(*["---"] * 6)]
    for step in data_path["steps"]:
        for number, label in enumerate(labels):
            entry = data_path["data"][label]["steps"].get(step)
            problem = _failed(entry)
            name = step if number == 0 else ""
            if problem:
                lines.append(_row(name, label, problem, "", "", ""))
                continue
            assert entry is not None
            lines.append(_row(name, label, _data_path_size(step, entry["sizes"]), seconds(entry["seconds"]),
                              mib(entry["peak_mib"]), mib(entry["step_mib"])))
    lines += ["", f"In short: {_data_path_verdict(data_path)}."]
    phased = [(step, entry) for step, entry in data_path["data"][labels[0]]["steps"].items()
              if len(entry.get("phases_s", {})) > 1]
    if phased:
        lines += ["", f"Where the time of the steps goes ({labels[0]}):", "",
                  _row("step", "phase", "time"), _row("---", "---", "---")]
        for step, entry in phased:
            for number, (phase, wall) in enumerate(entry["phases_s"].items()):
                lines.append(_row(step if number == 0 else "", phase, seconds(wall)))
    return lines


def data_path_page(results: dict[str, Any]) -> str:
    """The page of a run of the data path alone (``python -m benchmarks.run --data-path``)."""
    machine, load = results["machine"], results["load_average"]
    header = (f"Measured on {results['date'][:10]} by `{results['command']}` in {seconds(results['seconds'])} "
              f"on {machine['cpu']} ({machine['usable_cpus']} CPUs), torch {machine['torch']}; load average "
              f"(1, 5, 15 min) at the start {load['start']}, at the end {load['end']}.")
    return "\n".join([header, *data_path_lines(results)]) + "\n"


def details(results: dict[str, Any]) -> list[str]:
    """Smaller tables: FLOPs by part, CPU set-ups of the convolutions, notebooks, GPU."""
    lines: list[str] = []
    paper = results.get("training_step", {}).get("paper")
    if paper and not _failed(paper):
        lines += ["", f"FLOPs of one `paper` training step by part (FlopCounterMode, batch {paper['batch_size']}; "
                  "forward only for the frozen convolutions, forward and backward elsewhere):", "",
                  _row("part", "FLOPs", "share"), _row("---", "---", "---")]
        for part, value in sorted(paper["flop_parts"].items(), key=lambda item: -item[1]):
            lines.append(_row(part, flops(value), percent(value / paper["flops"])))
        lines += ["", f"Phases of the `paper` step (median of {paper['steps']} steps; CPU seconds summed over "
                  f"{paper['threads']} threads):", "", _row("phase", "wall clock", "CPU"), _row("---", "---", "---")]
        for phase, wall in paper["phases_s"].items():
            lines.append(_row(phase, seconds(wall), seconds(paper["phases_cpu_s"][phase])))
    configurations = results.get("backbone_configurations")
    if configurations and not _failed(configurations):
        peak = results["peak"]["flops_per_s"]
        lines += ["", "The frozen convolutions' forward pass under each CPU set-up "
                  f"({configurations['results'][0]['images']} image at {configurations['results'][0]['input_size']}, "
                  "best of several); the model computes them channels last:", "",
                  _row("memory format", "oneDNN", "time", "FLOP/s", "of peak", "of peak per CPU-second"),
                  _row(*["---"] * 6)]
        per_cpu = results["peak"].get("flops_per_cpu_s")
        for entry in configurations["results"]:
            lines.append(_row(entry["memory_format"].replace("_", " "), "on" if entry["mkldnn"] else "off",
                              seconds(entry["seconds"]), flops(entry["flops_per_s"], True),
                              percent(entry["flops_per_s"] / peak),
                              percent(entry["flops_per_cpu_s"] / per_cpu) if entry.get("flops_per_cpu_s") and per_cpu
                              else "-"))
    heads = results.get("head_configurations")
    if heads and not _failed(heads):
        peak = results["peak"]["flops_per_s"]
        per_cpu = results["peak"].get("flops_per_cpu_s")
        first = heads["results"][0]
        lines += ["", f"fc6-fc8 of the `paper` step (forward, and backward to the weights; batch {first['batch']} "
                  f"at the {first['grid']}x{first['grid']} grid, {flops(first['flops'])}) under each memory format, "
                  "best of several; the model keeps them contiguous:", "",
                  _row("memory format", "time", "FLOP/s", "of peak", "of peak per CPU-second"), _row(*["---"] * 5)]
        for entry in heads["results"]:
            lines.append(_row(entry["memory_format"].replace("_", " "), seconds(entry["seconds"]),
                              flops(entry["flops_per_s"], True), percent(entry["flops_per_s"] / peak),
                              percent(entry["flops_per_cpu_s"] / per_cpu) if entry.get("flops_per_cpu_s") and per_cpu
                              else "-"))
    features = results.get("feature_cache")
    if features and not _failed(features):
        lines += ["", f"Feature cache check at the paper's per-image shape: a {features['dtype']} memory map "
                  f"({features['memory_mapped']}), valid on reload ({features['valid_on_reload']}), "
                  f"{features['file_bytes']:,} bytes for {features['images']} images, largest difference to "
                  f"the backbone's own output {features['max_relative_error']:.1e} of its largest value."]
    lines += data_path_lines(results)
    notebooks = results.get("notebooks")
    if notebooks and not _failed(notebooks):
        lines += ["", _row("notebook", "profile", "time"), _row("---", "---", "---")]
        for row in notebooks["notebooks"]:
            lines.append(_row(row["notebook"], row["profile"], seconds(row["seconds"])))
    return lines


def markdown(results: dict[str, Any]) -> str:
    """The whole page: who measured what where, the summary table, then the details."""
    if results.get("data_path_only"):
        return data_path_page(results)
    machine = results["machine"]
    load = results["load_average"]
    peak = results["peak"]
    threads = machine["torch_threads"]
    # the bench itself keeps about `threads` CPUs busy: more than that at the end is someone else
    busy = load["start"][:1] > [0.5] or load["end"][:1] > [threads + 0.5]
    oversubscribed = load["start"][:1] > [machine["usable_cpus"] - threads + 0.5]
    header = [
        f"Measured on {results['date'][:10]} by `{results['command']}` in {seconds(results['seconds'])}"
        + (" (quick mode: tiny sizes, not the real figures)" if results.get("quick") else "") + ".",
        f"Machine: {machine['cpu']} ({machine['usable_cpus']} CPUs, {machine['cpu_capability']}), "
        f"torch {machine['torch']} with {threads} threads, oneDNN {'on' if machine['mkldnn'] else 'off'}, "
        f"GPU: {machine['gpu'] or 'none'}.",
        f"Load average (1, 5, 15 min) at the start {load['start']}, at the end {load['end']}"
        + (f": other work shared the {machine['usable_cpus']} CPUs, so every figure here is noisy"
           if busy else "") + "; ratios to the peak are measured in the same run."
        + (" With more runnable work than CPUs, threads of one operation wait for each other while the "
           "system runs someone else's, which slows many small multithreaded operations (the `cpu` profile's "
           "steps) far more than a few large ones; `--threads 1` measures them with less of that."
           if oversubscribed and threads > 1 else ""),
        "Peak (dense matmul, measured "
        + ", ".join(f"{key}: {flops(entry['flops_per_s'], True)}" for key, entry in peak.items()
                    if isinstance(entry, dict) and "flops_per_s" in entry)
        + "); the best is the yardstick. Under load, FLOPs per CPU-second (process time over all threads) "
        "compare better than FLOP/s: other work takes CPU time from the bench, not from the arithmetic.",
    ]
    return "\n".join(["\n\n".join(header), "", *summary_rows(results), *details(results)]) + "\n"
