"""DreamBooth on a toy-world subject in one process: DoRA, LoRA, or full fine-tuning of the same modules.

The quality benchmark and the section-3 analysis train hundreds of small runs; this loop does what
``train_dreambooth_dora.py`` does for one of them (same objective and optimiser settings) without re-reading the
pipeline and the images per run, and adds the paper's full fine-tuning (FT) reference, which the script has not:

- objective: the script's own (``training.step.step.predict`` and ``training.step.loss.denoising_loss``): SDXL's
  epsilon loss ``|eps - eps_theta(sqrt(a_t) z0 + sqrt(1 - a_t) eps, t, c)|^2``, ``t`` uniform over the 1000 training
  steps, on the instance images' VAE latents (means, scaled) and captions (no Min-SNR, no prior preservation);
- AdamW (betas 0.9 / 0.999, eps 1e-8), constant learning rate, weight decay 1e-4 (not on DoRA magnitudes),
  gradients clipped to norm 1, ``batch_size`` images per step drawn without replacement within an epoch;
- DoRA / LoRA: ``add_adapter`` with the script's ``AdapterConfig`` (alpha = rank, so ``s = 1``) on ``targets``;
  FT: the same modules' weights (not their biases) trained in place, everything else frozen.

``full_rank_lora`` writes a FT run as an exact LoRA file (``A = I``, ``B = W_ft - W0``), so every tool that reads
adapters (``load_dora_weights``, ``dora-diffusion analyze``) reads FT runs too.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dora_diffusion.core.config import AdapterConfig
from dora_diffusion.core.inject import add_adapter, adapted_layers, find_targets, trainable_parameters
from dora_diffusion.adapter_io import save_adapter
from dora_diffusion.training.step.loss import denoising_loss
from dora_diffusion.training.step.step import predict
from dora_diffusion.toyworld.subjects import SUBJECTS, Subject, instance_caption, instance_scenes
from dora_diffusion.toyworld.world import RESOLUTION, render

METHODS = ("dora", "lora", "ft")
ADAPTER_NAME = "default"
TIME_IDS = (RESOLUTION, RESOLUTION, 0, 0, RESOLUTION, RESOLUTION)
"""SDXL's micro-conditioning of a full, uncropped ``RESOLUTION`` image: original size, crop corner, target size."""


@dataclass(frozen=True)
class SubjectData:
    """A subject's instance images and captions, encoded once: what every training step reads."""

    latents: torch.Tensor  # (N, 4, h, w), times the VAE's scaling_factor
    hidden: torch.Tensor  # (N, 77, D): both encoders' penultimate states, concatenated
    pooled: torch.Tensor  # (N, P)
    captions: tuple[str, ...]


def encode_prompts(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``StableDiffusionXLPipeline.encode_prompt`` computes for the positive prompts, without guidance."""
    with torch.no_grad():
        hidden, _, pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    return hidden, pooled


@torch.no_grad()
def encode_subject(pipe, subject: Subject | str, n: int = 6) -> SubjectData:
    """The latents and caption embeddings of ``subject``'s ``n`` instance images (as ``make_subject_dataset``)."""
    subject = SUBJECTS[subject] if isinstance(subject, str) else subject
    scenes = instance_scenes(subject, n)
    pixels = np.stack([np.asarray(render(s)) for s in scenes])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    vae = pipe.vae
    latents = vae.encode(x.to(vae.dtype)).latent_dist.mean.float() * vae.config.scaling_factor
    captions = tuple(instance_caption(subject, s) for s in scenes)
    hidden, pooled = encode_prompts(pipe, list(captions))
    return SubjectData(latents, hidden.float(), pooled.float(), captions)


def _optimizer(unet: nn.Module, method: str, learning_rate: float) -> tuple[torch.optim.Optimizer, list]:
    if method == "ft":
        params = [p for p in unet.parameters() if p.requires_grad]
        groups = [{"params": params, "weight_decay": 1e-4}]
    else:
        params = trainable_parameters(unet, ADAPTER_NAME)
        magnitudes = {id(a.magnitude) for layer in adapted_layers(unet).values() for a in layer.adapters.values() if a.magnitude is not None}
        groups = [
            {"params": [p for p in params if id(p) not in magnitudes], "weight_decay": 1e-4},
            {"params": [p for p in params if id(p) in magnitudes], "weight_decay": 0.0},
        ]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.999), eps=1e-8), params


def training_scheduler(pipe):
    """The DDPM scheduler of ``pipe``'s config: what the script trains with (``training.models.load_components``)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def prepare_unet(base_unet: nn.Module, method: str, rank: int = 4, targets: str = "attn") -> nn.Module:
    """A float32 copy of ``base_unet`` set up for ``method``: an adapter added, or the targets' weights trainable."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    unet = copy.deepcopy(base_unet).float().requires_grad_(False)
    if method == "ft":
        modules = dict(unet.named_modules())
        for name in find_targets(unet, targets):
            modules[name].weight.requires_grad_(True)
    else:
        add_adapter(unet, AdapterConfig(rank=rank, use_dora=method == "dora", targets=targets), ADAPTER_NAME)
    return unet


def train_subject(
    pipe,
    data: SubjectData,
    method: str,
    rank: int = 4,
    learning_rate: float = 2e-3,
    steps: int = 150,
    seed: int = 0,
    batch_size: int = 4,
    targets: str = "attn",
    callback: Callable[[int, nn.Module], None] | None = None,
) -> nn.Module:
    """Train ``method`` on ``data`` for ``steps`` steps; returns the trained UNet (a copy; ``pipe`` is untouched).

    ``callback(step, unet)`` runs after every optimiser step (``step`` counts from 1), e.g. to save checkpoints.
    """
    unet = prepare_unet(pipe.unet, method, rank, targets)
    unet.train()
    optimizer, params = _optimizer(unet, method, learning_rate)
    fit(pipe, unet, data, optimizer, params, steps, seed, batch_size, callback)
    return unet.eval().requires_grad_(False)


def fit(
    pipe,
    unet: nn.Module,
    data: SubjectData,
    optimizer: torch.optim.Optimizer,
    params: list[torch.Tensor],
    steps: int,
    seed: int = 0,
    batch_size: int = 4,
    callback: Callable[[int, nn.Module], None] | None = None,
) -> None:
    """``steps`` optimiser steps of ``unet`` (whatever adapters it carries: ours, or LyCORIS's modules applied to
    it) on ``data`` with the script's objective: ``batch_size`` images per step drawn without replacement within an
    epoch, uniform timesteps, gradients of ``params`` clipped to norm 1; noise, timesteps and order from ``seed``."""
    scheduler = training_scheduler(pipe)
    num_timesteps = scheduler.config.num_train_timesteps
    gen = torch.Generator().manual_seed(seed)
    time_ids = torch.tensor([TIME_IDS], dtype=torch.float32)
    order: list[int] = []
    for step in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(data.latents), generator=gen).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        z0 = data.latents[idx]
        t = torch.randint(0, num_timesteps, (len(idx),), generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        pred, target = predict(unet, scheduler, z0, eps, t, data.hidden[idx], data.pooled[idx], time_ids.repeat(len(idx), 1))
        loss = denoising_loss(pred, target, t, scheduler)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if callback is not None:
            callback(step + 1, unet)


@torch.no_grad()
def sample(pipe, unet: nn.Module, prompts: list[str], seeds: list[int], steps: int = 20, guidance: float = 4.0):
    """Images of ``prompts`` (one seed each) with ``unet`` in place of the pipeline's: 20 Euler steps, guidance 4."""
    from diffusers import StableDiffusionXLPipeline

    sampler = StableDiffusionXLPipeline(**{**pipe.components, "unet": unet})
    sampler.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return sampler(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gens).images


def save_run(
    base_unet: nn.Module, unet: nn.Module, method: str, directory: str | os.PathLike, metadata: dict | None = None
) -> Path:
    """Write a run as an adapter file in ``directory`` (FT as ``full_rank_lora``, its metadata naming it ``FT``)."""
    if method == "ft":
        unet = full_rank_lora(base_unet, unet)
        metadata = {**(metadata or {}), "method": "FT"}
    return save_adapter({"unet": unet}, directory, ADAPTER_NAME, metadata=metadata)


def full_rank_lora(base_unet: nn.Module, tuned_unet: nn.Module) -> nn.Module:
    """``base_unet`` with a LoRA that reproduces ``tuned_unet`` exactly on every Linear whose weight changed.

    Per changed Linear ``W0 -> W_ft`` (d_out x d_in): rank ``d_in``, ``A = I``, ``B = W_ft - W0``, scale 1, so
    ``W0 + s B A = W_ft`` (up to float32 rounding of the difference). Raises on a changed non-Linear weight.
    """
    tuned = dict(tuned_unet.named_modules())
    changed: dict[str, torch.Tensor] = {}
    for name, module in base_unet.named_modules():
        w0 = getattr(module, "weight", None)
        if not isinstance(w0, torch.Tensor) or name not in tuned:
            continue
        delta = tuned[name].weight.detach().float() - w0.detach().float()
        if not delta.any():
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{name}: only Linear weights can be written as a full-rank LoRA ({type(module).__name__})")
        changed[name] = delta
    if not changed:
        raise ValueError("the fine-tuned UNet has no changed weights")
    out = copy.deepcopy(base_unet).float()
    ranks = {name: delta.shape[1] for name, delta in changed.items()}
    add_adapter(out, AdapterConfig(rank=1, use_dora=False, targets=list(changed), rank_pattern=ranks,
                                   alpha_pattern={k: float(r) for k, r in ranks.items()}), ADAPTER_NAME)  # fmt: skip
    for name, layer in adapted_layers(out).items():
        with torch.no_grad():
            layer.adapters[ADAPTER_NAME].A.copy_(torch.eye(ranks[name]))
            layer.adapters[ADAPTER_NAME].B.copy_(changed[name])
    return out
