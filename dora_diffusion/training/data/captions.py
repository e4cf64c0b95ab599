"""kohya's caption options: ``--caption_dropout_rate``, ``--shuffle_caption`` with ``--keep_tokens``.

Each instance sample draws its caption once per epoch from ``(seed, CAPTION_DRAW, epoch, dataset index)``
(``sampling.derive_seed``), so a resumed run, or another number of processes, draws the same captions as an
uninterrupted run. Class prompts (prior preservation) are never changed.
"""

from __future__ import annotations

import random

from dora_diffusion.training.data.sampling import CAPTION_DRAW, derive_seed


def draw_caption(
    caption: str,
    seed: int,
    epoch: int,
    index: int,
    dropout_rate: float = 0.0,
    shuffle: bool = False,
    keep_tokens: int = 0,
) -> str:
    """The caption sample ``index`` trains with in ``epoch``, as kohya's ``process_caption``: with probability
    ``dropout_rate`` the empty caption ``""``; otherwise, with ``shuffle``, the comma-separated tags in a random
    order, the first ``keep_tokens`` tags kept in front, joined with ``", "``; otherwise ``caption`` itself."""
    rng = random.Random(derive_seed(seed, CAPTION_DRAW, epoch, index))
    if dropout_rate and rng.random() < dropout_rate:
        return ""
    if not shuffle:
        return caption
    tags = [t.strip() for t in caption.strip().split(",")]
    fixed, flexible = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(flexible)
    return ", ".join(fixed + flexible)


def draw_batch_captions(
    captions: list[str], indices: list[int], seed: int, epoch: int, dropout_rate: float, shuffle: bool, keep_tokens: int
) -> list[str]:
    """``captions`` of a micro-batch with the instance samples' (the first ``len(indices)``, dataset indices
    ``indices``) drawn by ``draw_caption``; class prompts after them unchanged."""
    drawn = [
        draw_caption(c, seed, epoch, i, dropout_rate, shuffle, keep_tokens)
        for c, i in zip(captions, indices)
    ]
    return drawn + list(captions[len(indices) :])
