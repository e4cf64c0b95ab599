"""Prior preservation: make sure ``--class_data_dir`` holds ``--num_class_images`` images of ``--class_prompt``."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from .data import IMAGE_SUFFIXES, Record, open_image
from .dataset import CLASS_GENERATION, derive_seed

logger = logging.getLogger(__name__)


def existing_class_images(class_dir: Path) -> list[Path]:
    if not class_dir.is_dir():
        return []
    return sorted(p for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def generate_class_images(
    pipe,
    class_dir: Path,
    prompt: str,
    count: int,
    resolution: int,
    seed: int,
    batch_size: int = 4,
    num_inference_steps: int = 30,
    autocast=None,
) -> list[Path]:
    """Render ``count`` images of ``prompt`` with the base pipeline into ``class_dir``; returns their paths.

    Names are ``class-<prompt hash>-<n>.png``; the seed of image ``n`` is derived from ``(seed, n)``.
    """
    import contextlib

    class_dir.mkdir(parents=True, exist_ok=True)
    tag = hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:8]
    start = len(existing_class_images(class_dir))
    device = pipe.unet.device
    written = []
    for first in range(0, count, batch_size):
        n = min(batch_size, count - first)
        generators = [
            torch.Generator(device=device).manual_seed(derive_seed(seed, CLASS_GENERATION, start + first + k)) for k in range(n)
        ]
        with torch.no_grad(), (autocast or contextlib.nullcontext)():
            images = pipe(
                [prompt] * n,
                num_inference_steps=num_inference_steps,
                height=resolution,
                width=resolution,
                generator=generators,
            ).images
        for k, image in enumerate(images):
            path = class_dir / f"class-{tag}-{start + first + k:05d}.png"
            image.save(path)
            written.append(path)
    return written


def load_class_records(class_dir: Path, prompt: str, count: int) -> list[Record]:
    """The first ``count`` readable class images, each captioned ``prompt``."""
    records = []
    for path in existing_class_images(class_dir):
        if len(records) == count:
            break
        try:
            records.append(Record(open_image(path), prompt, path.name))
        except Exception as err:  # noqa: BLE001
            logger.warning("skipping unreadable class image %s: %s", path, err)
    if not records:
        raise ValueError(f"--class_data_dir {class_dir} holds no readable images")
    return records
