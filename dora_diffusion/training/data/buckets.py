"""Aspect-ratio buckets: train on crops of about the training area in each image's own shape.

With ``--buckets`` a 4:3 photo is not cut to a square: it is resized to cover the bucket whose aspect ratio is
nearest its own and cropped to it. Buckets (kohya's ``enable_bucket``) are the sizes ``(w, h)``, multiples of
``step``, with ``w * h <= resolution^2``, ``w`` as large as that allows for each ``h``, and both sides within
``[min_side, max_side]``; the square ``resolution x resolution`` is always one. Every micro-batch holds
samples of one bucket; SDXL's micro-conditioning gets the bucket as target size.
"""

from __future__ import annotations

import math

import torch

from dora_diffusion.training.data.dataset import EPOCH_ORDER, MicroBatchSampler, derive_seed


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


class BucketBatchSampler(MicroBatchSampler):
    """``MicroBatchSampler`` whose global micro-batches each hold samples of one bucket.

    Epoch ``e``: the seeded permutation of all samples, split by bucket (keeping that order), each bucket's list
    wrapped around to whole global micro-batches of ``batch_size * num_processes``, then those micro-batches in a
    second seeded order. A pure function of ``(seed, epoch)``, so resuming at micro-batch ``j`` is exact.
    """

    def __init__(
        self, bucket_of: list[int], batch_size: int, num_processes: int, rank: int, seed: int, start: int = 0
    ) -> None:
        super().__init__(len(bucket_of), batch_size, num_processes, rank, seed, start)
        self.bucket_of = bucket_of
        self.per_epoch = micro_batches_per_epoch(bucket_of, batch_size * num_processes)

    def epoch_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(derive_seed(self.seed, EPOCH_ORDER, epoch))
        order = torch.randperm(self.num_items, generator=g).tolist()
        group = self.batch_size * self.num_processes
        chunks = []
        for bucket in sorted(set(self.bucket_of)):
            members = [i for i in order if self.bucket_of[i] == bucket]
            need = -(-len(members) // group) * group
            members = (members * (need // len(members) + 1))[:need]
            chunks += [members[k : k + group] for k in range(0, need, group)]
        g2 = torch.Generator().manual_seed(derive_seed(self.seed, EPOCH_ORDER, epoch, 1))
        return [i for c in torch.randperm(len(chunks), generator=g2).tolist() for i in chunks[c]]


def micro_batches_per_epoch(bucket_of: list[int], group: int) -> int:
    """Global micro-batches of ``group`` samples in one epoch: each bucket rounded up to whole micro-batches."""
    counts: dict[int, int] = {}
    for b in bucket_of:
        counts[b] = counts.get(b, 0) + 1
    return sum(-(-n // group) for n in counts.values())
