"""The denoising loss of one micro-batch: noise, timesteps, target, Min-SNR weights, prior preservation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_noise(latents: torch.Tensor, noise_offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise of ``latents``' shape, plus ``noise_offset`` times a per-(sample, channel) constant.

    Drawn in the standard (contiguous) layout whatever ``latents``' strides: ``randn_like`` follows them, so fresh VAE
    latents (channels-last strides) and cached ones would get different noise from the same seed.
    """
    noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype)
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


DEBIASED_SNR_CAP = 1000.0
"""kohya caps the SNR at 1000 before weighting (the smallest timesteps would otherwise dominate)."""


def debiased_weights(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Debiased estimation (kohya ``--debiased_estimation_loss``, Yu et al. 2024): ``1 / sqrt(min(snr, 1000))``
    for epsilon, ``1 / (min(snr, 1000) + 1)`` for v-prediction."""
    s = snr(scheduler, timesteps).clamp(max=DEBIASED_SNR_CAP)
    if scheduler.config.prediction_type == "v_prediction":
        return 1.0 / (s + 1.0)
    return 1.0 / torch.sqrt(s)


def denoising_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler,
    snr_gamma: float | None = None,
    num_class: int = 0,
    prior_loss_weight: float = 1.0,
    debiased: bool = False,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error in fp32, Min-SNR weighted per sample if ``snr_gamma``, and by ``debiased_weights`` if
    ``debiased`` (both: the product, as kohya).

    ``mask`` (n, 1, h, w) in [0, 1], for the instance samples: the squared error of sample i is
    ``sum(mask_i * se_i) / sum(mask_i)`` over the latent pixels (channels averaged), so the loss keeps its scale
    whatever the mask's area. With prior preservation the last ``num_class`` samples are class images: their
    plain MSE is added with ``prior_loss_weight``.
    """
    pred, target = pred.float(), target.float()
    n = pred.shape[0] - num_class
    se = F.mse_loss(pred[:n], target[:n], reduction="none")
    if mask is None:
        per_sample = se.mean(dim=tuple(range(1, pred.dim())))  # (n,)
    else:
        w = mask.float().expand_as(se)
        per_sample = (se * w).sum(dim=(1, 2, 3)) / w.sum(dim=(1, 2, 3)).clamp_min(1e-8)
    if snr_gamma:
        per_sample = per_sample * min_snr_weights(scheduler, timesteps[:n], snr_gamma)
    if debiased:
        per_sample = per_sample * debiased_weights(scheduler, timesteps[:n])
    loss = per_sample.mean()
    if num_class:
        loss = loss + prior_loss_weight * F.mse_loss(pred[n:], target[n:])
    return loss
