"""The SDXL components a DreamBooth run needs, SDXL prompt encoding, and the adapters put on them."""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from dora_diffusion.core.config import AdapterConfig, match_pattern
from dora_diffusion.core.inject import add_adapter, adapted_layers, find_targets, trainable_parameters, uncompiled
from dora_diffusion.training.args import parse_targets

logger = logging.getLogger(__name__)

ADAPTER_NAME = "default"
"""Name of the adapter being trained (it is the only one)."""


@dataclass
class Components:
    """Tokenizers, text encoders, VAE, UNet and the training noise scheduler of an SDXL model."""

    tokenizer: object
    tokenizer_2: object
    text_encoder: nn.Module
    text_encoder_2: nn.Module
    vae: nn.Module
    unet: nn.Module
    noise_scheduler: object

    def adaptable(self, train_text_encoder: bool) -> dict[str, nn.Module]:
        """Component name -> model for the models that carry the trained adapter."""
        models = {"unet": self.unet}
        if train_text_encoder:
            models.update(text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2)
        return models


def load_components(args: argparse.Namespace, dtype: torch.dtype = torch.float32) -> Components:
    """Load the base model (Hub id or local diffusers folder) and the chosen VAE, all frozen, on the CPU.

    The UNet and text encoders are read straight into ``dtype`` (the training dtype), so a process never
    holds SDXL's 14 GB of fp32 weights in host memory; the VAE in ``vae_dtype``.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    base = args.pretrained_model_name_or_path
    hub = {"revision": args.revision, "cache_dir": args.cache_dir}
    # CLIPTokenizer, not AutoTokenizer: transformers 5's AutoTokenizer first looks for a tokenizer/config.json,
    # which SDXL repos do not have, and offline (HF_HUB_OFFLINE=1) that lookup fails instead of being skipped
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", **hub)
    tokenizer_2 = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer_2", **hub)
    weights = {"variant": args.variant, **hub}
    te_dtype = {_transformers_dtype_kwarg(): dtype}
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", **te_dtype, **weights)
    text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder_2", **te_dtype, **weights)
    if args.pretrained_vae_model_name_or_path is None:
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae", **weights)
    else:
        vae = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, cache_dir=args.cache_dir)
    nn.Module.to(vae, dtype=vae_dtype(vae, dtype))  # ModelMixin.to warns about fp32 modules even when there are none
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", torch_dtype=dtype, **weights)
    noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler", **hub)
    prediction = noise_scheduler.config.prediction_type
    if prediction not in ("epsilon", "v_prediction"):
        raise ValueError(f"{base}: scheduler prediction_type {prediction!r} is not supported (epsilon, v_prediction)")
    for model in (text_encoder, text_encoder_2, vae, unet):
        model.requires_grad_(False)
        model.eval()
    return Components(tokenizer, tokenizer_2, text_encoder, text_encoder_2, vae, unet, noise_scheduler)


def native_resolution(args: argparse.Namespace) -> int:
    """The base model's own image side in pixels, ``unet.config.sample_size * vae_scale_factor`` (1024 for SDXL, 64
    for the toy world), read from the UNet's and the VAE's ``config.json`` without loading any weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from dora_diffusion.hub import hub_unreachable, quiet_hub_deprecations

    base, vae_id = args.pretrained_model_name_or_path, args.pretrained_vae_model_name_or_path
    hub = {"revision": args.revision, "cache_dir": args.cache_dir}
    # the Hub cache only when the Hub is unreachable: its client retries a dead network for about 25 s
    offline = any(not os.path.isdir(p) for p in (base, vae_id) if p is not None) and hub_unreachable() is not None
    with quiet_hub_deprecations():
        unet = UNet2DConditionModel.load_config(base, subfolder="unet", local_files_only=offline, **hub)
        if vae_id is None:
            vae = AutoencoderKL.load_config(base, subfolder="vae", local_files_only=offline, **hub)
        else:
            vae = AutoencoderKL.load_config(vae_id, cache_dir=args.cache_dir, local_files_only=offline)
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def _transformers_dtype_kwarg() -> str:
    """``dtype`` (transformers >= 4.56, where ``torch_dtype`` is deprecated) or ``torch_dtype`` (older)."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__).release >= (4, 56) else "torch_dtype"


def vae_dtype(vae: nn.Module, weight_dtype: torch.dtype) -> torch.dtype:
    """fp32, as diffusers' SDXL scripts keep it; ``weight_dtype`` only for a VAE that declares itself safe in half
    precision (``force_upcast: false``, as madebyollin/sdxl-vae-fp16-fix does). SDXL's own VAE overflows in fp16
    and loses detail in bf16."""
    if weight_dtype != torch.float32 and getattr(vae.config, "force_upcast", True) is False:
        return weight_dtype
    return torch.float32


def add_training_adapters(components: Components, args: argparse.Namespace) -> dict[str, nn.Module]:
    """Put a fresh ``ADAPTER_NAME`` adapter on the UNet (and the text encoders); returns the adapted models.

    Call after the base weights have their training dtype, so the magnitudes start at exactly ``||W0||``
    of the weights the forward pass uses. Adapter parameters are fp32 whatever the base dtype.
    """
    models = components.adaptable(args.train_text_encoder)
    rank_pattern, alpha_pattern = getattr(args, "rank_pattern", {}), getattr(args, "alpha_pattern", {})
    targets = {}
    for name, model in models.items():
        value = args.unet_targets if name == "unet" else args.text_encoder_targets
        flag = "--unet_targets" if name == "unet" else "--text_encoder_targets"
        try:
            targets[name] = find_targets(model, parse_targets(value))
        except ValueError as err:
            raise ValueError(f"{flag} {value!r}: {err}") from None
    every = [n for names in targets.values() for n in names]
    unused = sorted(k for k in {*rank_pattern, *alpha_pattern} if not match_pattern({k: 1}, every))
    if unused:
        raise ValueError(
            f"--rank_pattern/--alpha_pattern keys {unused} match no adapted module (keys are whole dotted parts of "
            f"a module name, such as 'down_blocks.2' or 'to_k', among the targets of --unet_targets {args.unet_targets!r})"
        )
    for name, model in models.items():
        names = targets[name]
        ranks = {n: int(r) for n, r in match_pattern(rank_pattern, names).items()}
        alphas = match_pattern(alpha_pattern, names)
        if getattr(args, "alpha_is_rank", False):  # no --alpha: alpha = rank, per module too (scale 1)
            alphas = {**{n: float(r) for n, r in ranks.items()}, **alphas}
        config = AdapterConfig(
            rank=args.rank, alpha=args.alpha, use_dora=args.adapter == "dora", dropout=args.dropout,
            use_rslora=args.rslora, targets=names, rank_pattern=ranks, alpha_pattern=alphas,
        )  # fmt: skip
        add_adapter(model, config, ADAPTER_NAME)
    return models


def enable_checkpointing(text_encoder: nn.Module) -> None:
    """Non-reentrant activation checkpointing for a transformers model (gradients reach the adapters inside)."""
    kwargs = {"use_reentrant": False}
    if hasattr(text_encoder, "activation_checkpointing_enable"):  # transformers >= 5
        text_encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def named_trainable(models: dict[str, nn.Module]) -> list[tuple[str, nn.Parameter]]:
    """``(component.parameter name, parameter)`` of the trained adapter, in a fixed order (checkpoint keys; a
    ``torch.compile``d model's names without its ``_orig_mod.`` prefix)."""
    out = []
    for comp, model in models.items():
        model = uncompiled(model)
        wanted = {id(p) for p in trainable_parameters(model, ADAPTER_NAME)}
        out += [(f"{comp}.{n}", p) for n, p in model.named_parameters() if id(p) in wanted]
    return out


@dataclass
class ParameterCount:
    """Trainable parameters split into the low-rank factors and the DoRA magnitude vectors."""

    lowrank: int
    magnitude: int
    layers: int

    @property
    def total(self) -> int:
        return self.lowrank + self.magnitude

    def __str__(self) -> str:
        return (
            f"trainable parameters: {self.total:,} = {self.lowrank:,} low-rank (A, B) + {self.magnitude:,} magnitude "
            f"in {self.layers} layers"
        )


def count_parameters(models: dict[str, nn.Module]) -> ParameterCount:
    """Count the trained adapter's parameters."""
    lowrank = magnitude = layers = 0
    for model in models.values():
        for layer in adapted_layers(model).values():
            adapter = layer.adapters[ADAPTER_NAME] if ADAPTER_NAME in layer.adapters else None
            if adapter is None:
                continue
            layers += 1
            lowrank += adapter.A.numel() + adapter.B.numel()
            if adapter.magnitude is not None:
                magnitude += adapter.magnitude.numel()
    return ParameterCount(lowrank, magnitude, layers)


def encode_prompts(
    components: Components, prompts: list[str], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL prompt embeddings: penultimate hidden states of both CLIP encoders concatenated, (N, 77, d1 + d2),
    and text_encoder_2's pooled projection, (N, proj). Gradients flow when the encoders are trained."""
    hidden = []
    pooled = None
    for tokenizer, encoder in (
        (components.tokenizer, components.text_encoder),
        (components.tokenizer_2, components.text_encoder_2),
    ):
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])  # (N, 77, d)
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out[0]
    return torch.cat(hidden, dim=-1), pooled


def vae_scale_factor(vae) -> int:
    """Pixels per latent pixel along a side: 8 for SDXL's VAE, 4 for the toy world's (diffusers' rule)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)
