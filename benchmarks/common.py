"""Measurement helpers shared by the benchmark scripts: interleaved timing and peak resident memory."""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
from collections.abc import Callable

import torch


def pin_malloc() -> None:
    """Make glibc return freed blocks >= 64 KiB to the OS at once, so resident memory tracks live tensors.

    For memory measurements only, in a fresh process: it makes every large allocation a fresh mmap (page
    faults on each step), which would distort timings.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 65536)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 131072)  # M_TRIM_THRESHOLD
    except OSError:
        pass


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_bytes(fn: Callable[[], object], repeats: int = 3) -> int:
    """Median over ``repeats`` of (peak resident memory during ``fn()``) minus resident memory before it (Linux)."""
    out = []
    for _ in range(repeats):
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the VmHWM high-water mark
        before = _status("VmRSS")
        fn()
        out.append(_status("VmHWM") - before)
    return int(statistics.median(out))


def interleaved_times(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, raw: dict[str, list[float]] | None = None
) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved round-robin (starting one later each
    round) so drift and order effects hit all alike. ``raw`` receives every timing.

    Run it with the allocator's defaults (not after ``pin_malloc``): that is what users get.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    if raw is not None:
        raw.update(times)
    return {k: statistics.median(v) for k, v in times.items()}


def machine_line() -> str:
    import platform

    return (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"python {platform.python_version()}"
    )
