"""One micro-batch's denoising loss: the training objective, shared by the script and the toy world's runs.

``predict`` noises clean latents at timesteps and returns the UNet's prediction beside its target (the noise for
epsilon models, the velocity for v-prediction ones); ``micro_batch_loss`` draws the noise and timesteps of a
script micro-batch (timesteps uniform in ``[--min_timestep, --max_timestep)``) and weighs the error with
``loss.denoising_loss`` (the ``--loss_type``, Min-SNR, debiased estimation, masks, prior preservation).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from dora_diffusion.training.step.loss import denoising_loss, huber_threshold, sample_noise, target_for

if TYPE_CHECKING:
    from dora_diffusion.training.config import TrainConfig
    from dora_diffusion.training.data.encode import LatentSource, PromptSource
    from dora_diffusion.training.models import Components


def predict(
    unet: nn.Module,
    scheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    hidden: torch.Tensor,
    pooled: torch.Tensor,
    time_ids: torch.Tensor,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prediction, target)`` for clean ``latents`` (N, 4, h, w) noised with ``noise`` at ``timesteps`` (N,),
    conditioned on the prompts' ``hidden`` states (N, 77, D), ``pooled`` embeddings and SDXL's ``time_ids`` (N, 6)."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    with autocast():
        pred = unet(
            noisy, timesteps, encoder_hidden_states=hidden, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
        ).sample
    return pred, target_for(scheduler, latents, noise, timesteps)


def micro_batch_loss(
    batch: dict,
    components: Components,
    latents: LatentSource,
    prompts: PromptSource,
    config: TrainConfig,
    autocast,
) -> torch.Tensor:
    """The loss of one micro-batch (instance samples, then class samples with prior preservation)."""
    scheduler = components.noise_scheduler
    device = latents.device
    z = latents.latents(batch)  # (N, 4, h, w)
    noise = sample_noise(z, config.noise_offset)
    low, high = timestep_range(config, scheduler)
    timesteps = torch.randint(low, high, (z.shape[0],), device=device)
    with autocast():
        hidden, pooled = prompts.embeddings(batch["captions"])
    pred, target = predict(components.unet, scheduler, z, noise, timesteps, hidden, pooled, batch["time_ids"].to(device), autocast)
    num_class = len(batch["class_index"]) if "class_index" in batch else 0
    mask = batch["mask"].to(device) if "mask" in batch else None
    huber_c = None
    if config.loss_type in ("huber", "smooth_l1"):
        huber_c = huber_threshold(scheduler, timesteps, config.huber_c, config.huber_schedule)
    return denoising_loss(
        pred, target, timesteps, scheduler, config.snr_gamma, num_class, config.prior_loss_weight,
        config.debiased_estimation_loss, mask, config.loss_type, huber_c,
    )  # fmt: skip


def timestep_range(config: TrainConfig, scheduler) -> tuple[int, int]:
    """``[low, high)`` of the training timesteps: ``--min_timestep`` (default 0) and ``--max_timestep`` (default
    the scheduler's ``num_train_timesteps``), as kohya draws them; a range outside the scheduler's is an error."""
    total = scheduler.config.num_train_timesteps
    low = config.min_timestep if config.min_timestep is not None else 0
    high = config.max_timestep if config.max_timestep is not None else total
    if not 0 <= low < high <= total:
        raise ValueError(
            f"--min_timestep {low} / --max_timestep {high}: the timesteps must satisfy 0 <= min < max <= {total} "
            "(the scheduler's num_train_timesteps)"
        )
    return low, high
