"""Difference maps: where, and how much, two columns of a grid differ at the same seed.

For two images ``a`` and ``b`` of one seed (uint8 RGB), the map is ``d = mean_c |a_c - b_c|`` per pixel and its
mean is ``mean(d)`` in 0-255 units. A map is shown as a grey image ``min(255, gain * d)``. The pairs: every adapter
column against the base column of its seed, and every DoRA column against every LoRA column at the same strength.
Each of these two groups shares one ``gain`` (the power of two, 1 to 64, that brings the group's 99th-percentile
difference closest to 255), so maps of a group compare by brightness, and the small DoRA - LoRA differences are
not drawn black beside the large ones from the base.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dora_diffusion.compare.infotext import column_name
from dora_diffusion.compare.plan import Column, GridPlan

MAX_GAIN = 64


@dataclass(frozen=True)
class DifferenceMap:
    """``|a - b|`` of two cells of one seed: the amplified map, its mean (0-255 units) and a caption."""

    seed: int
    a: Column
    b: Column
    image: Image.Image
    mean: float
    gain: int

    @property
    def label(self) -> str:
        """``"|dora 1.00 − base|"``."""
        return f"|{column_name(self.a)} − {column_name(self.b)}|"

    @property
    def caption(self) -> str:
        """``"|dora 1.00 − base| · seed 0 · mean 3.21/255 · ×16"``."""
        return f"{self.label} · seed {self.seed} · mean {self.mean:.2f}/255 · ×{self.gain}"


def difference_pairs(
    columns: Sequence[Column], kinds: Mapping[str, str], pair: tuple[str, str] | None = None
) -> list[tuple[Column, Column]]:
    """The column pairs a grid's difference view shows (module docstring), in column order.

    ``kinds`` maps adapter names to ``"DoRA"`` or ``"LoRA"`` (``Comparer.kinds()``). ``pair`` (two adapter names)
    replaces "every DoRA against every LoRA" with the columns of ``pair[0]`` against those of ``pair[1]`` at the
    same strength, whatever their kinds.
    """
    pairs = []
    base = next((c for c in columns if c.adapter is None), None)
    adapters = [c for c in columns if c.adapter is not None]
    if base is not None:
        pairs += [(c, base) for c in adapters]
    for a in adapters:
        for b in adapters:
            chosen = (
                (a.adapter, b.adapter) == pair
                if pair is not None
                else kinds.get(a.adapter) == "DoRA" and kinds.get(b.adapter) == "LoRA"
            )
            if chosen and a.strength == b.strength and a.adapter != b.adapter:
                pairs.append((a, b))
    return pairs


def default_pair(names: Sequence[str], kinds: Mapping[str, str]) -> tuple[str, str] | None:
    """The pair the difference view starts with: the first DoRA and the first LoRA of ``names`` (load order),
    else the first two adapters; None with fewer than two."""
    dora = next((n for n in names if kinds.get(n) == "DoRA"), None)
    lora = next((n for n in names if kinds.get(n) == "LoRA"), None)
    if dora and lora:
        return dora, lora
    return (names[0], names[1]) if len(names) >= 2 else None


def abs_difference(a: Image.Image, b: Image.Image) -> np.ndarray:
    """``mean_c |a_c - b_c|`` per pixel of two RGB images of one size, float32 (H, W) in 0-255 units."""
    if a.size != b.size:
        raise ValueError(f"images of {a.size} and {b.size} pixels cannot be compared")
    x = np.asarray(a.convert("RGB"), dtype=np.int16)
    y = np.asarray(b.convert("RGB"), dtype=np.int16)
    return np.abs(x - y).mean(axis=2).astype(np.float32)  # (H, W)


def shared_gain(maps: Sequence[np.ndarray]) -> int:
    """The power of two from 1 to ``MAX_GAIN`` that brings the 99th percentile of all ``maps`` closest to 255."""
    p99 = float(np.percentile(np.concatenate([m.ravel() for m in maps]), 99)) if maps else 0.0
    if p99 <= 255 / MAX_GAIN:
        return MAX_GAIN
    return int(min(MAX_GAIN, max(1, 2 ** math.floor(math.log2(255 / p99)))))


def difference_maps(
    plan: GridPlan,
    images: Mapping[tuple[int, Column], Image.Image],
    kinds: Mapping[str, str],
    pair: tuple[str, str] | None = None,
) -> list[DifferenceMap]:
    """The difference maps of a grid, row by row (seed by seed), pair by pair (``difference_pairs``, with
    ``pair``).

    ``images`` maps ``(seed, column)`` to the rendered cell; pairs with a cell missing (a grid stopped early)
    are left out.
    """
    raw = []
    for seed in plan.seeds:
        for a, b in difference_pairs(plan.columns, kinds, pair):
            if (seed, a) in images and (seed, b) in images:
                raw.append((seed, a, b, abs_difference(images[seed, a], images[seed, b])))
    gains = {group: shared_gain([d for _, _, b, d in raw if (b.adapter is None) == group]) for group in (True, False)}
    maps = []
    for seed, a, b, d in raw:
        gain = gains[b.adapter is None]
        image = Image.fromarray(np.clip(d * gain, 0, 255).round().astype(np.uint8)).convert("RGB")
        maps.append(DifferenceMap(seed, a, b, image, float(d.mean()), gain))
    return maps


def mean_differences(maps: Sequence[DifferenceMap]) -> dict[str, float]:
    """Mean of each pair's map over the seeds, by label (``"|dora 1.00 − base|"``), in pair order."""
    sums: dict[str, list[float]] = {}
    for m in maps:
        sums.setdefault(m.label, []).append(m.mean)
    return {label: float(np.mean(v)) for label, v in sums.items()}
