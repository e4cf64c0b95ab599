"""Prior preservation: make sure ``--class_data_dir`` holds ``--num_class_images`` images of ``--class_prompt``."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from dora_diffusion.training.data.records import IMAGE_SUFFIXES, Record, open_image
from dora_diffusion.training.data.sampling import CLASS_GENERATION, derive_seed
from dora_diffusion.training.images import NonFiniteImages, generate, to_pil

logger = logging.getLogger(__name__)


def existing_class_images(class_dir: Path) -> list[Path]:
    if not class_dir.is_dir():
        return []
    return sorted(p for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def missing_class_indices(class_dir: Path, count: int, rank: int = 0, world: int = 1) -> list[int]:
    """Numbers of the class images still to render so that ``class_dir`` holds ``count``, this process's share.

    Numbering continues after the images already there; process ``rank`` of ``world`` takes every
    ``world``-th number, so several processes render disjoint images. Call it on every process before any
    of them writes to ``class_dir``.
    """
    start = len(existing_class_images(class_dir))
    return list(range(start, count))[rank::world]


def generate_class_images(
    pipe,
    class_dir: Path,
    prompt: str,
    indices: list[int],
    resolution: int,
    seed: int,
    batch_size: int = 4,
    num_inference_steps: int = 30,
) -> list[Path]:
    """Render the class images numbered ``indices`` of ``prompt`` with the base pipeline into ``class_dir``.

    Names are ``class-<prompt hash>-<n>.png``; the seed of image ``n`` is derived from ``(seed, n)``, so the
    images do not depend on how many processes share the work. Rendered as ``validation.generate`` does
    (the pipeline's own dtypes, no autocast); a NaN image stops the run (it would train the prior on noise).
    """
    class_dir.mkdir(parents=True, exist_ok=True)
    tag = hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:8]
    device = pipe.unet.device
    written = []
    for first in range(0, len(indices), batch_size):
        chunk = indices[first : first + batch_size]
        generators = [torch.Generator(device=device).manual_seed(derive_seed(seed, CLASS_GENERATION, n)) for n in chunk]
        try:
            pixels = generate(pipe, [prompt] * len(chunk), generators, resolution, num_inference_steps)
        except NonFiniteImages as err:
            raise NonFiniteImages(f"class images for prior preservation: {err}; nothing was written for them") from None
        for n, image in zip(chunk, to_pil(pixels)):
            path = class_dir / f"class-{tag}-{n:05d}.png"
            image.save(path)
            written.append(path)
    return written


def load_class_records(class_dir: Path, prompt: str, count: int, resolution: int | None = None) -> list[Record]:
    """The first ``count`` readable class images, each captioned ``prompt`` (shrunk as ``open_image`` does)."""
    records = []
    for path in existing_class_images(class_dir):
        if len(records) == count:
            break
        try:
            image, size = open_image(path, resolution)
            records.append(Record(image, prompt, path.name, size))
        except Exception as err:  # noqa: BLE001
            logger.warning("skipping unreadable class image %s: %s", path, err)
    if not records:
        raise ValueError(f"--class_data_dir {class_dir} holds no readable images")
    return records
