"""Measurement helpers shared by the benchmark scripts: interleaved timing, peak resident memory, t intervals."""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


def pin_malloc() -> None:
    """Make glibc return freed blocks >= 64 KiB to the OS at once, so resident memory tracks live tensors.

    For memory measurements only, in a fresh process: it makes every large allocation a fresh mmap (page
    faults on each step), which would distort timings.
    """
    from dora_diffusion.tools.weights import return_freed_memory

    return_freed_memory(mmap_threshold=65536)


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


@dataclass(frozen=True)
class PairedRatio:
    """The median of per-pair time ratios ``a / b`` with its 95% interval, for wall and CPU time."""

    median: float
    low: float
    high: float
    cpu_median: float
    cpu_low: float
    cpu_high: float
    pairs: int

    @property
    def holds(self) -> bool:
        """The run counts only when its wall-time interval is narrower than +-3% of the median."""
        return (self.high - self.low) / 2 <= 0.03 * self.median

    def __str__(self) -> str:
        return (
            f"{self.median:.3f} [{self.low:.3f}, {self.high:.3f}] wall, {self.cpu_median:.3f} "
            f"[{self.cpu_low:.3f}, {self.cpu_high:.3f}] CPU, {self.pairs} pairs{'' if self.holds else '  (interval > +-3%: does not count)'}"
        )


T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086,
        21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042,
        40: 2.021, 60: 2.000, 120: 1.980}  # fmt: skip
"""Student's t 0.975 quantile by degrees of freedom."""


def t95(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom; between two tabulated ``df`` the smaller one's
    (the wider interval)."""
    return T975[max(k for k in T975 if k <= df)] if df >= 1 else math.nan


def mean_interval(values: list[float]) -> tuple[float, float, int]:
    """Mean, 95% t half-interval and count (half-interval nan below 2 values)."""
    n = len(values)
    if n < 2:
        return (values[0] if values else math.nan), math.nan, n
    return statistics.mean(values), t95(n - 1) * statistics.stdev(values) / math.sqrt(n), n


def median_interval(values: list[float], z: float = 1.96) -> tuple[float, float, float]:
    """Median and a distribution-free 95% interval for it: the order statistics ``k`` and ``n + 1 - k`` with
    ``k = floor((n - z sqrt(n)) / 2)`` (the binomial sign-test interval; needs n >= 6)."""
    s = sorted(values)
    n = len(s)
    k = max(1, int((n - z * math.sqrt(n)) / 2))
    return statistics.median(s), s[k - 1], s[n - k]


def paired_ratio(fa: Callable[[], object], fb: Callable[[], object], pairs: int, warmup: int = 1) -> PairedRatio:
    """Time ``fa`` and ``fb`` back to back ``pairs`` times (order alternating: a b, b a, ...), each pair giving one
    ratio ``t_a / t_b`` of wall time and one of CPU time (user + sys of the whole process, all threads). Noise
    that lasts longer than a pair (another job on a shared VM) hits both sides of a pair alike and cancels in its
    ratio; the median of the ratios ignores the pairs it hit unevenly."""
    for _ in range(warmup):
        fa(), fb()
    wall, cpu = [], []
    for i in range(pairs):
        times = {}
        for name, fn in (("a", fa), ("b", fb)) if i % 2 == 0 else (("b", fb), ("a", fa)):
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name] = (time.perf_counter() - w0, time.process_time() - c0)
        wall.append(times["a"][0] / times["b"][0])
        cpu.append(times["a"][1] / times["b"][1])
    return PairedRatio(*median_interval(wall), *median_interval(cpu), pairs)
