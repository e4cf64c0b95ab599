"""The denoising loss of one micro-batch: noise, timesteps, target, Min-SNR weights, prior preservation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_noise(latents: torch.Tensor, noise_offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise like ``latents``, plus ``noise_offset`` times a per-(sample, channel) constant."""
    noise = torch.randn_like(latents)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(latents.shape[:2] + (1, 1), device=latents.device, dtype=latents.dtype)
    return noise


def target_for(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet predicts: the noise (epsilon) or the velocity (v_prediction), per the scheduler config."""
    prediction = scheduler.config.prediction_type
    if prediction == "epsilon":
        return noise
    if prediction == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {prediction!r}")


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ``alpha_bar / (1 - alpha_bar)`` at ``timesteps``, float32."""
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device, torch.float32)[timesteps]
    return alphas_cumprod / (1.0 - alphas_cumprod)


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): ``min(snr, gamma) / snr`` for epsilon,
    ``min(snr, gamma) / (snr + 1)`` for v-prediction."""
    s = snr(scheduler, timesteps)
    clipped = torch.clamp(s, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (s + 1.0)
    return clipped / s


def denoising_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler,
    snr_gamma: float | None = None,
    num_class: int = 0,
    prior_loss_weight: float = 1.0,
) -> torch.Tensor:
    """Mean squared error in fp32, Min-SNR weighted per sample if ``snr_gamma``.

    With prior preservation the last ``num_class`` samples are class images: their plain MSE is added with
    ``prior_loss_weight``.
    """
    pred, target = pred.float(), target.float()
    n = pred.shape[0] - num_class
    per_sample = F.mse_loss(pred[:n], target[:n], reduction="none").mean(dim=tuple(range(1, pred.dim())))  # (n,)
    if snr_gamma:
        per_sample = per_sample * min_snr_weights(scheduler, timesteps[:n], snr_gamma)
    loss = per_sample.mean()
    if num_class:
        loss = loss + prior_loss_weight * F.mse_loss(pred[n:], target[n:])
    return loss
