"""Timing helpers shared by the benchmarks: device-synchronised, interleaved, median of repeats.

A benchmark hands :func:`time_interleaved` one zero-argument callable per variant. Each variant runs
``warmup`` times untimed (CUDA kernels, autotuning, caches and one-off calibrations happen there), then the
variants take turns ``repeats`` times in a rotating order, so a load change on a shared machine (or a GPU's
clock changes) hits all of them alike. On CUDA the device is synchronised before and after each timed call,
so the time is the GPU's work and not the launch of asynchronous kernels.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device | str) -> float:
    """Wall seconds of one ``fn()``, the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def time_interleaved(
    variants: dict[str, Callable[[], object]],
    device: torch.device | str,
    repeats: int,
    warmup: int = 1,
) -> dict[str, list[float]]:
    """Seconds of each timed call per variant: ``warmup`` untimed calls each, then ``repeats`` rounds in
    which the variants take turns (the order rotates by one each round)."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(time_call(variants[name], device))
    return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    """The median seconds of each variant."""
    return {name: statistics.median(values) for name, values in times.items()}


def matmul_tflops(
    m: int, k: int, n: int, dtype: torch.dtype, device: torch.device | str, repeats: int = 5
) -> tuple[float, float]:
    """``(TFLOP/s, median seconds)`` of one dense ``[m, k] @ [k, n]`` in ``dtype`` (2 m k n FLOPs), measured
    now on ``device``: the rate a benchmark's achieved TFLOP/s is compared with."""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(m, k, device=device, dtype=dtype, generator=generator)
    b = torch.randn(k, n, device=device, dtype=dtype, generator=generator)
    seconds = medians(time_interleaved({"mm": lambda: a @ b}, device, repeats, warmup=2))["mm"]
    return 2.0 * m * k * n / seconds / 1e12, seconds
