"""The order micro-batches come in, and every seed of a run.

Everything random in a run is a pure function of ``(seed, stream, index)`` through ``derive_seed``: the order of
epoch ``e`` is a permutation seeded by ``(seed, EPOCH_ORDER, e)``, so a resumed run sees exactly the micro-batches
an uninterrupted run would. With aspect-ratio buckets (``buckets``) each global micro-batch holds one bucket.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (``numpy.random.SeedSequence``)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


# stream ids for derive_seed, so different uses never share a seed
AUGMENT, CLASS_AUGMENT, EPOCH_ORDER, STEP_NOISE, CLASS_GENERATION, ADAPTER_INIT = range(6)
CAPTION_DRAW = 6


class MicroBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Endless micro-batches of dataset indices for one process, starting at global micro-batch ``start``.

    Epoch ``e`` is a permutation seeded by ``(seed, e)``, padded by wrapping around so every process gets
    full batches; global micro-batch ``j`` of the epoch holds ``batch_size * num_processes`` indices and
    process ``rank`` takes its slice.
    """

    def __init__(self, num_items: int, batch_size: int, num_processes: int, rank: int, seed: int, start: int = 0) -> None:
        self.num_items, self.batch_size, self.num_processes, self.rank = num_items, batch_size, num_processes, rank
        self.seed, self.start = seed, start
        self.per_epoch = -(-num_items // (batch_size * num_processes))
        """Micro-batches per epoch (ceil)."""

    def epoch_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(derive_seed(self.seed, EPOCH_ORDER, epoch))
        order = torch.randperm(self.num_items, generator=g).tolist()
        need = self.per_epoch * self.batch_size * self.num_processes
        while len(order) < need:
            order += order[: need - len(order)]
        return order

    def _take(self, order: list[int], pos: int) -> list[int]:
        first = (pos * self.num_processes + self.rank) * self.batch_size
        return order[first : first + self.batch_size]

    def batch(self, j: int) -> list[int]:
        """Indices of global micro-batch ``j`` for this process."""
        epoch, pos = divmod(j, self.per_epoch)
        return self._take(self.epoch_order(epoch), pos)

    def __iter__(self) -> Iterator[list[int]]:
        j = self.start
        while True:
            epoch, pos = divmod(j, self.per_epoch)
            order = self.epoch_order(epoch)  # once per epoch
            for p in range(pos, self.per_epoch):
                yield self._take(order, p)
            j = (epoch + 1) * self.per_epoch


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
