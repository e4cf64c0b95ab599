"""Images from the models being trained: a pipeline around them (no copy) and seeded rendering that refuses NaN
pixels. Validation (``output/validation.py``) and prior preservation's class images (``data/prior.py``) both
render through here."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from dora_diffusion.training.errors import NonFiniteImages
from dora_diffusion.training.models import Components


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
