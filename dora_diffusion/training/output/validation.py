"""Validation images during and after training: fixed seeds, saved to ``validation/step-N/``, sent to trackers."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dora_diffusion.training.errors import TrainingError
from dora_diffusion.training.models import Components

logger = logging.getLogger(__name__)


def validation_pipeline(components: Components, unet, device: torch.device):
    """A ``StableDiffusionXLPipeline`` around the models being trained (no copy), with DPM-Solver++."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        text_encoder_2=components.text_encoder_2,
        tokenizer=components.tokenizer,
        tokenizer_2=components.tokenizer_2,
        unet=unet,
        scheduler=DPMSolverMultistepScheduler.from_config(components.noise_scheduler.config),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


class NonFiniteImages(TrainingError):
    """The pipeline rendered NaN or infinite pixels (usually an fp16 overflow)."""


@torch.no_grad()
def generate(
    pipe, prompts: list[str], generators: list[torch.Generator], resolution: int, num_inference_steps: int,
    guidance_scale: float | None = None,
) -> np.ndarray:
    """Render ``prompts`` in the pipeline's own dtypes, without autocast; (N, H, W, 3) float32 in [0, 1].

    The pipeline stops at the latents and the VAE decodes them in its own dtype (fp32 for SDXL's VAE): under
    autocast its convolutions would run in fp16 and overflow, and a half-precision pipeline hands a fp32 VAE
    latents it cannot take. Raises ``NonFiniteImages`` when any pixel is NaN or infinite.
    """
    extra = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
    latents = pipe(
        prompts, num_inference_steps=num_inference_steps, height=resolution, width=resolution,
        generator=generators, output_type="latent", **extra,
    ).images  # fmt: skip
    vae = pipe.vae
    config = vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    latents = latents.to(next(vae.parameters()).dtype)
    if mean is not None and std is not None:
        shape = (1, -1, 1, 1)
        mean = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(shape)
        std = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(shape)
        latents = latents * std / config.scaling_factor + mean
    else:
        latents = latents / config.scaling_factor
    pixels = vae.decode(latents, return_dict=False)[0].float()
    images = pipe.image_processor.postprocess(pixels, output_type="np")
    bad = ~np.isfinite(images).all(axis=(1, 2, 3))
    if bad.any():
        raise NonFiniteImages(
            f"{int(bad.sum())} of {len(images)} images of {prompts[0]!r} have NaN or infinite pixels "
            "(half-precision overflow): use --mixed_precision bf16 or no, or an fp16-safe VAE "
            "(--pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix)"
        )
    return images


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """(N, H, W, 3) floats in [0, 1] -> PIL images (rounded as diffusers' ``numpy_to_pil``)."""
    return [Image.fromarray((im * 255).round().astype(np.uint8)) for im in images]


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
