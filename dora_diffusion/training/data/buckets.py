"""Aspect-ratio buckets: train on crops of about the training area in each image's own shape.

With ``--buckets`` a 4:3 photo is not cut to a square: it is resized to cover the bucket whose aspect ratio is
nearest its own and cropped to it. Buckets (kohya's ``enable_bucket``) are the sizes ``(w, h)``, multiples of
``step``, with ``w * h <= resolution^2``, ``w`` as large as that allows for each ``h``, and both sides within
``[min_side, max_side]``; the square ``resolution x resolution`` is always one. Every micro-batch holds
samples of one bucket; SDXL's micro-conditioning gets the bucket as target size.
"""

from __future__ import annotations

import math


def make_buckets(resolution: int, step: int = 64, min_side: int | None = None, max_side: int | None = None) -> list[tuple[int, int]]:
    """The bucket sizes (w, h), sorted by aspect ratio w / h (see the module docstring).

    Defaults: ``min_side = resolution / 2``, ``max_side = 2 * resolution`` (both rounded to ``step``). At 1024 px
    that is 17 buckets from 512 x 2048 (the tallest, 1:4) ... 1024 x 1024 ... 2048 x 512.
    """
    if step < 8 or step % 8:
        raise ValueError(f"bucket step must be a positive multiple of 8 (the VAE's factor), got {step}")
    min_side = min_side or max(step, resolution // 2 // step * step)
    max_side = max_side or 2 * resolution // step * step
    area = resolution * resolution
    sizes = {(resolution, resolution)}
    for h in range(min_side, max_side + 1, step):
        w = min(max_side, area // h // step * step)
        if w >= min_side:
            sizes |= {(w, h), (h, w)}
    return sorted(sizes, key=lambda wh: wh[0] / wh[1])


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is nearest (in log ratio) that of an image of ``size`` (w, h)."""
    ratio = math.log(size[0] / size[1])
    return min(range(len(buckets)), key=lambda i: (abs(math.log(buckets[i][0] / buckets[i][1]) - ratio), i))
