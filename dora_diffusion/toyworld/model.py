"""The toy world's text-to-image model: exactly SDXL's component classes and conditioning, at toy size.

``UNet2DConditionModel`` with ``text_time`` conditioning, ``CLIPTextModel`` and ``CLIPTextModelWithProjection``
whose penultimate hidden states are concatenated (64 + 64 = 128 = the UNet's cross-attention dim), an
``AutoencoderKL`` with 4 latent channels, two ``CLIPTokenizer`` and SDXL's Euler scheduler, in a
``StableDiffusionXLPipeline``. Sizes (SDXL base in brackets): UNet blocks (32, 64, 128) [(320, 640, 1280)] on
16 x 16 latents [128 x 128]; VAE blocks (16, 32, 64), 4x downscale [8x]; text encoders 64 wide, 2 layers [768 /
1280, 12 / 32 layers].

The tokenizers are CLIP BPE over the 256 byte characters plus merges that make each word of the world one
token: a prompt in the world's words is a few tokens, and any other text (a trigger such as ``sks``) still
tokenizes, letter by letter.
"""

from __future__ import annotations

import json
import pathlib
import tempfile

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from dora_diffusion.tiny_sdxl import MODEL_MAX_LENGTH, byte_level_vocab, sdxl_scheduler, sdxl_unet, text_config
from dora_diffusion.toyworld.world import BACKGROUNDS, COLOURS, SHAPES

WORDS = (
    *SHAPES, *COLOURS, *BACKGROUNDS, "a", "an", "on", "and", "background", "with", "ring", "dots", "photo", "of",
)
_TEXT_HIDDEN = 64
_PROJECTION_DIM = 64
_TIME_EMBED_DIM = 16
_PAD_2 = "!"


def _word_merges(words: tuple[str, ...]) -> list[tuple[str, str]]:
    """BPE merges learnt on ``words`` (most frequent pair first) until each word is one token.

    Tokenizing a word of the list with these merges replays its learning, so it ends as one token ``word</w>``.
    """
    segments = {w: [*w[:-1], w[-1] + "</w>"] for w in dict.fromkeys(words)}
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for parts in segments.values():
            for pair in zip(parts, parts[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = max(counts, key=lambda pair: (counts[pair], -len(merges)))  # ties: first seen
        merges.append(best)
        for w, parts in segments.items():
            out, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    out.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            segments[w] = out


def build_tokenizers() -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """SDXL's two tokenizers for the toy world (the second pads with ``"!"`` like SDXL's ``tokenizer_2``)."""
    vocab = byte_level_vocab()
    merges = _word_merges(WORDS)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    with tempfile.TemporaryDirectory(prefix="dora_diffusion_toyworld_tokenizer_") as directory:
        root = pathlib.Path(directory)
        (root / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
        (root / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        tokenizer = CLIPTokenizer.from_pretrained(root, model_max_length=MODEL_MAX_LENGTH)
        tokenizer_2 = CLIPTokenizer.from_pretrained(root, model_max_length=MODEL_MAX_LENGTH, pad_token=_PAD_2)
    return tokenizer, tokenizer_2


def build_unet() -> UNet2DConditionModel:
    return sdxl_unet(
        16, (32, 64, 128), (_TEXT_HIDDEN, _TEXT_HIDDEN), _TIME_EMBED_DIM, _PROJECTION_DIM,
        layers_per_block=1,
        transformer_layers_per_block=(1, 1, 1),
        attention_head_dim=(1, 2, 4),  # diffusers' name for the number of heads, as in SDXL's config
        norm_num_groups=16,
    )


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=64,
        scaling_factor=1.0,  # set from the latents' spread after the VAE is trained
        force_upcast=False,
    )


def build_scheduler():
    """SDXL's Euler scheduler and noise schedule, sampling from ``t = 999`` (``timestep_spacing="trailing"``).

    SDXL's own ``"leading"`` spacing starts 20-step sampling at ``t = 951``, where training always left some of the
    image in the latent (``sqrt(alpha_bar) = 0.09``); on 16 x 16 latents a model learns to read the background colour
    from that leak, which pure noise at sampling time does not have. Lin et al. 2023 ("Common Diffusion Noise
    Schedules and Sample Steps are Flawed") recommend trailing spacing; diffusers' scheduler supports it as a setting.
    """
    return EulerDiscreteScheduler.from_config({**sdxl_scheduler().config, "timestep_spacing": "trailing"})


def build_untrained_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """The toy world's pipeline with fresh weights (the starting point of pretraining)."""
    tokenizer, tokenizer_2 = build_tokenizers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, vae = build_unet(), build_vae()
        text_encoder = CLIPTextModel(text_config(tokenizer, _TEXT_HIDDEN, 2, "quick_gelu"))
        cfg2 = text_config(tokenizer_2, _TEXT_HIDDEN, 2, "gelu")
        cfg2.projection_dim = _PROJECTION_DIM
        text_encoder_2 = CLIPTextModelWithProjection(cfg2)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=build_scheduler(),
        force_zeros_for_empty_prompt=True,
    )
