"""A tiny SDXL-architecture pipeline with random weights and toy image data, built offline.

Tests and the CPU demo use this instead of ``stabilityai/stable-diffusion-xl-base-1.0``: every component has
SDXL's structure (module names, block layout, text_time conditioning, two CLIP text encoders whose hidden
states are concatenated) at a size that runs two denoising steps on a CPU in a fraction of a second.

Sizes (SDXL base in brackets):

- UNet: block channels (32, 64, 64) [(320, 640, 1280)]; transformer blocks per attention module 2 in
  ``down_blocks.1``, 3 in ``down_blocks.2`` and the mid block [2, 10, 10]; 2 resnets per down block, 3 per up
  block [same]; heads (2, 4, 4) [(5, 10, 20)]; cross-attention dim 80 = 32 + 48 [2048 = 768 + 1280];
  addition_time_embed_dim 8 [256]; sample_size 8 [128].
- VAE: 4 blocks with channels (8, 16, 32, 32) [(128, 256, 512, 512)], so latents are 8x smaller than images
  [same]; scaling factor 0.13025 [same].
- text_encoder: CLIP, hidden size 32, 2 layers, quick_gelu [768, 12 layers]; text_encoder_2: CLIP with
  projection, hidden size 48, 3 layers, gelu, projection 32 [1280, 32 layers, projection 1280].
- tokenizers: byte-level CLIP BPE without merges, 514 tokens (256 bytes, the same with ``</w>``, start and end
  of text) [49408]; every byte of a prompt is one token, so prompts longer than 75 bytes (spaces excluded)
  are truncated.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import tempfile

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from PIL import Image, ImageDraw
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from dora_diffusion.tiny_sdxl import MODEL_MAX_LENGTH, byte_level_vocab, sdxl_scheduler, sdxl_unet, text_config

__all__ = [
    "MODEL_MAX_LENGTH",
    "TINY_RESOLUTION",
    "build_tiny_sdxl_pipeline",
    "make_toy_imagefolder",
    "make_toy_images",
    "save_tiny_clip",
    "save_tiny_dinov2",
    "save_tiny_sdxl_pipeline",
]

TINY_RESOLUTION = 64
"""Default image side in pixels: the tiny UNet's ``sample_size`` (8) times the VAE's downscale factor (8)."""

_TEXT_ENCODER_HIDDEN = 32
_TEXT_ENCODER_2_HIDDEN = 48
_PROJECTION_DIM = 32
_ADDITION_TIME_EMBED_DIM = 8
_PAD_2 = "!"
_CAPTION_DETAILS = ("", ", close-up", ", plain background", ", soft light")


def _tiny_tokenizers() -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """SDXL's two CLIP tokenizers over a byte-level vocabulary: any text tokenizes, one token per byte.

    The second pads with ``"!"`` (id 0) like SDXL's ``tokenizer_2``; the first pads with ``<|endoftext|>``.
    The vocabulary files live in a temporary directory only while the tokenizers are read from it.
    """
    with tempfile.TemporaryDirectory(prefix="dora_diffusion_tokenizer_") as directory:
        root = pathlib.Path(directory)
        (root / "vocab.json").write_text(json.dumps(byte_level_vocab(), ensure_ascii=False), encoding="utf-8")
        (root / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        tokenizer = CLIPTokenizer.from_pretrained(root, model_max_length=MODEL_MAX_LENGTH)
        tokenizer_2 = CLIPTokenizer.from_pretrained(root, model_max_length=MODEL_MAX_LENGTH, pad_token=_PAD_2)
    return tokenizer, tokenizer_2


def _tiny_unet() -> UNet2DConditionModel:
    """SDXL's UNet layout with few channels."""
    return sdxl_unet(
        TINY_RESOLUTION // 8,  # latent side: the VAE downscales by 8
        (32, 64, 64),
        (_TEXT_ENCODER_HIDDEN, _TEXT_ENCODER_2_HIDDEN),
        _ADDITION_TIME_EMBED_DIM,
        _PROJECTION_DIM,
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 3),  # down_blocks.0 has no attention
        attention_head_dim=(2, 4, 4),  # diffusers' name for the number of heads, as in SDXL's config
        norm_num_groups=8,
    )


def _tiny_vae() -> AutoencoderKL:
    """A 4-block KL autoencoder (8x downscale, 4 latent channels, SDXL's scaling factor), few channels."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=TINY_RESOLUTION,
        scaling_factor=0.13025,
        force_upcast=False,
    )


def build_tiny_sdxl_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> StableDiffusionXLPipeline:
    """A ``StableDiffusionXLPipeline`` with SDXL's architecture at toy size and random weights, built offline.

    The same ``seed`` gives the same weights; the caller's global torch RNG state is left untouched.
    Images of ``TINY_RESOLUTION`` pixels (the default height and width) take well under a second for two steps on
    a CPU. See the module docstring for the sizes.
    """
    tokenizer, tokenizer_2 = _tiny_tokenizers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _tiny_unet()
        torch.manual_seed(seed)
        vae = _tiny_vae()
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(text_config(tokenizer, _TEXT_ENCODER_HIDDEN, 2, "quick_gelu"))
        torch.manual_seed(seed)
        text_encoder_2 = CLIPTextModelWithProjection(text_config(tokenizer_2, _TEXT_ENCODER_2_HIDDEN, 3, "gelu"))
    for model in (unet, vae, text_encoder, text_encoder_2):
        # plain nn.Module.to: diffusers' ModelMixin.to warns about "modules to keep in float32" even when there are none
        torch.nn.Module.to(model, dtype=dtype)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=sdxl_scheduler(),
        force_zeros_for_empty_prompt=True,
    )


def save_tiny_sdxl_pipeline(path: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Write ``build_tiny_sdxl_pipeline(seed)`` to the directory ``path`` (safetensors); return the directory.

    ``StableDiffusionXLPipeline.from_pretrained(path)`` loads it back offline with the same weights.
    """
    path = pathlib.Path(path)
    build_tiny_sdxl_pipeline(seed).save_pretrained(path, safe_serialization=True)
    return path


def save_tiny_clip(path: str | os.PathLike, seed: int = 0, image_size: int = 32) -> pathlib.Path:
    """Write a CLIP model with random weights (text: the tiny byte-level tokenizer, hidden 32; vision: ViT with
    ``image_size`` px input, patch 8, hidden 32) and its processor to ``path``; return the directory.

    ``CLIPModel.from_pretrained(path)`` and ``CLIPProcessor.from_pretrained(path)`` read it back offline: the code
    path of CLIP-T / CLIP-I scoring, not its numbers.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    path = pathlib.Path(path)
    tokenizer = _tiny_tokenizers()[0]
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=image_size, patch_size=8, projection_dim=_PROJECTION_DIM)  # fmt: skip
    config = CLIPConfig(
        text_config=text_config(tokenizer, 32, 2, "quick_gelu").to_dict(),
        vision_config=vision.to_dict(),
        projection_dim=_PROJECTION_DIM,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(path, safe_serialization=True)
    size = {"shortest_edge": image_size}
    crop = {"height": image_size, "width": image_size}
    CLIPProcessor(CLIPImageProcessor(size=size, crop_size=crop), tokenizer).save_pretrained(path)
    return path


def save_tiny_dinov2(path: str | os.PathLike, seed: int = 0, image_size: int = 32) -> pathlib.Path:
    """Write a DINOv2 ViT with random weights (hidden 32, 2 layers, patch 8) and its image processor to ``path``;
    ``AutoModel`` / ``AutoImageProcessor`` read it back offline (the code path of DINO scoring)."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    path = pathlib.Path(path)
    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                          image_size=image_size, patch_size=8)  # fmt: skip
    Dinov2Model(config).save_pretrained(path, safe_serialization=True)
    size = {"shortest_edge": image_size}
    BitImageProcessor(size=size, crop_size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path


def make_toy_images(n: int, size: int = TINY_RESOLUTION, seed: int = 0) -> list[Image.Image]:
    """``n`` RGB ``size`` x ``size`` images of one concept: a red disc with a dark outline on varied backgrounds.

    Position, radius, background colour and a background stripe vary per image; the same seed gives the same
    images.
    """
    if n < 0 or size < 8:
        raise ValueError(f"make_toy_images needs n >= 0 and size >= 8 pixels, got n={n}, size={size}")
    rng = random.Random(seed)
    images = []
    for _ in range(n):
        background = tuple(rng.randrange(60, 230) for _ in range(3))
        image = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(image)
        stripe = tuple(rng.randrange(0, 256) for _ in range(3))
        y = rng.randrange(0, size)
        draw.rectangle((0, y, size - 1, min(size - 1, y + size // 6)), fill=stripe)
        radius = rng.uniform(0.18, 0.3) * size
        cx, cy = (rng.uniform(radius, size - radius) for _ in range(2))
        draw.ellipse(
            (cx - radius, cy - radius, cx + radius, cy + radius),
            fill=(220, 30, 30),
            outline=(40, 0, 0),
            width=max(1, size // 32),
        )
        images.append(image)
    return images


def make_toy_imagefolder(
    path: str | os.PathLike,
    n: int = 4,
    size: int = TINY_RESOLUTION,
    seed: int = 0,
    caption: str = "a photo of TOK toy",
    caption_column: str = "prompt",
) -> pathlib.Path:
    """Write ``make_toy_images(n, size, seed)`` as PNGs plus ``metadata.jsonl`` into ``path``; return ``path``.

    This is the Hugging Face ``imagefolder`` layout: ``datasets.load_dataset(str(path))`` reads it with the
    columns ``image`` and ``caption_column``. Captions are ``caption``, from the second image on followed by a
    short detail (``"a photo of TOK toy, close-up"``), so each one contains ``caption``.
    """
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, image in enumerate(make_toy_images(n, size, seed)):
        file_name = f"{i:04d}.png"
        image.save(path / file_name)
        rows.append({"file_name": file_name, caption_column: caption + _CAPTION_DETAILS[i % len(_CAPTION_DETAILS)]})
    with open(path / "metadata.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return path
