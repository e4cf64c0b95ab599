"""Validation images during and after training: fixed seeds, saved to ``validation/step-N/``, sent to trackers."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dora_diffusion.training.errors import TrainingError
from dora_diffusion.training.images import NonFiniteImages, generate, to_pil

logger = logging.getLogger(__name__)


def render(
    pipe,
    prompt: str,
    num_images: int,
    seed: int,
    resolution: int,
    num_inference_steps: int,
    guidance_scale: float,
) -> list[Image.Image]:
    """Image ``i`` uses a generator seeded ``seed + i``, so successive validations are comparable.

    Rendered as ``generate`` does (own dtypes, no autocast). Non-finite images are logged and saved black.
    """
    device = pipe.unet.device
    images = []
    models = [m for m in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2) if m is not None]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        for i in range(num_images):
            generator = torch.Generator(device=device).manual_seed(seed + i)
            try:
                pixels = generate(pipe, [prompt], [generator], resolution, num_inference_steps, guidance_scale)
            except NonFiniteImages as err:
                logger.warning("validation image %d: %s", i, err)
                pixels = np.zeros((1, resolution, resolution, 3), dtype=np.float32)
            images += to_pil(pixels)
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    return images


def validation_folder(step: int) -> str:
    """Where the images of ``step`` go, relative to the output folder."""
    return f"validation/step-{step}"


def save_images(images: list[Image.Image], output_dir: Path, step: int) -> list[Path]:
    """Write ``output_dir/validation/step-<step>/<i>.png``; returns the paths."""
    folder = Path(output_dir) / validation_folder(step)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = folder / f"{i:02d}.png"
        image.save(path)
        paths.append(path)
    return paths


def log_images(trackers, images: list[Image.Image], prompt: str, step: int) -> None:
    """Send the images to tensorboard (one NHWC grid per step) or wandb."""
    for tracker in trackers:
        if tracker.name == "tensorboard":
            stacked = np.stack([np.asarray(im) for im in images])  # (N, H, W, 3) uint8
            tracker.writer.add_images("validation", stacked, step, dataformats="NHWC")
            tracker.writer.flush()
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(im, caption=f"{i}: {prompt}") for i, im in enumerate(images)]}, step=step)
