"""The machine a benchmark ran on, and its measured peak: dense matmul FLOP/s in the same run.

Every achieved FLOP/s figure is reported as a fraction of :func:`matmul_peak`, measured by the
same process on the same machine (float32 on CPU, bfloat16 on GPU), so a figure's efficiency
can be judged without trusting a data sheet.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any

import torch

from referseg.book import cpu_model


def usable_cpus() -> int:
    """CPUs this process may run on (the affinity mask), not the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages: other work on the machine makes the figures noisy."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_info() -> dict[str, Any]:
    """CPU model, cores, torch version and threads, oneDNN, and the GPU when there is one."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "usable_cpus": usable_cpus(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "gpu": None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so that wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Wall-clock and process CPU seconds (all threads) of a block, after waiting for the GPU.

    CPU seconds per wall second and thread is the share of the CPUs the process got: below 1
    when other work shares them, so FLOPs per CPU-second stay comparable under load.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.wall = self.cpu = 0.0

    def __enter__(self) -> Stopwatch:
        synchronize(self.device)
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        synchronize(self.device)
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu


def matmul_peak(device: str | torch.device = "cpu", sizes: tuple[int, ...] | None = None,
                repeats: int = 5) -> dict[str, Any]:
    """Best dense square-matmul FLOP/s (2 n^3 per product) over ``sizes``, all threads.

    float32 on CPU, bfloat16 on GPU (what training uses there). The best of ``repeats``
    products per size: the machine's reachable peak, the yardstick of every ratio. On the CPU
    also the best FLOPs per CPU-second (process time), which other work on the machine
    disturbs much less than wall-clock time.
    """
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sizes = sizes or ((4096, 8192) if device.type == "cuda" else (2048, 3072))
    per_size, per_cpu_s = {}, {}
    for n in sizes:
        generator = torch.Generator().manual_seed(n)
        a = torch.randn(n, n, generator=generator).to(device, dtype)
        b = torch.randn(n, n, generator=generator).to(device, dtype)
        a @ b  # warm-up: thread pool, allocations, kernel selection
        best_wall = best_cpu = float("inf")
        for _ in range(repeats):
            with Stopwatch(device) as watch:
                a @ b
            best_wall, best_cpu = min(best_wall, watch.wall), min(best_cpu, watch.cpu or float("inf"))
        per_size[str(n)] = 2 * n**3 / best_wall
        per_cpu_s[str(n)] = 2 * n**3 / best_cpu
    size, flops = max(per_size.items(), key=lambda item: item[1])
    result = {"flops_per_s": flops, "size": int(size), "dtype": str(dtype).replace("torch.", ""),
              "device": device.type, "per_size": per_size, "repeats": repeats}
    if device.type == "cpu":
        result["flops_per_cpu_s"] = max(per_cpu_s.values())
        result["per_size_per_cpu_s"] = per_cpu_s
    return result
