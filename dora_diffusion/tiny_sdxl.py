"""SDXL's component classes at any size: the one builder under both the random tiny pipeline of ``testing`` and the
toy world's trained model (``toyworld.model``).

``sdxl_unet`` is SDXL's UNet layout (text_time conditioning, 3 down blocks), ``text_config`` a CLIP text encoder
whose vocabulary is its tokenizer's, ``byte_level_vocab`` a CLIP BPE vocabulary over the 256 byte characters (any
text tokenizes), ``sdxl_scheduler`` the Euler scheduler of SDXL base's config.
"""

from __future__ import annotations

from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTokenizer

MODEL_MAX_LENGTH = 77
"""Token sequence length of both tokenizers and text encoders, as in SDXL."""

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
"""CLIP's start and end of text tokens."""


def byte_level_alphabet() -> list[str]:
    """The 256 printable characters GPT-2/CLIP use for the bytes 0..255, in CLIP's vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    unprintable = [b for b in range(256) if b not in printable]
    # printable bytes stand for themselves; the others are shifted to the code points 256, 257, ...
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(unprintable))]


def byte_level_vocab() -> dict[str, int]:
    """Token -> id: the 256 byte characters, the same with ``</w>``, then start and end of text (514 tokens)."""
    alphabet = byte_level_alphabet()
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}


def text_config(
    tokenizer: CLIPTokenizer, hidden_size: int, num_layers: int, hidden_act: str, projection_dim: int = 32
) -> CLIPTextConfig:
    """A small CLIP text config whose vocabulary and special ids are the tokenizer's."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        projection_dim=projection_dim,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act=hidden_act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def sdxl_unet(
    sample_size: int, block_out_channels: tuple[int, int, int], text_dims: tuple[int, int], time_embed_dim: int,
    projection_dim: int, **sizes,
) -> UNet2DConditionModel:
    """SDXL's UNet layout (3 down blocks, the first without attention, text_time conditioning) at the given sizes.

    ``text_dims``: the two text encoders' hidden sizes, concatenated into the cross-attention dim. ``sizes``:
    ``layers_per_block``, ``transformer_layers_per_block``, ``attention_head_dim``, ``norm_num_groups``.
    """
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=block_out_channels,
        cross_attention_dim=sum(text_dims),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        # 6 micro-conditioning numbers (original size, crop corner, target size) plus text_encoder_2's pooled output
        projection_class_embeddings_input_dim=6 * time_embed_dim + projection_dim,
        **sizes,
    )


def sdxl_scheduler() -> EulerDiscreteScheduler:
    """The Euler scheduler with the values of SDXL base's ``scheduler_config.json``."""
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
        timestep_spacing="leading",
        steps_offset=1,
    )
