"""The denoising loss of one micro-batch: noise, timesteps, target, Min-SNR weights, prior preservation, and the
error's kind (kohya's ``--loss_type``: squared, absolute, pseudo-Huber, smooth L1)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dora_diffusion.training.args import HUBER_SCHEDULES, LOSS_TYPES


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


def huber_threshold(scheduler, timesteps: torch.Tensor, huber_c: float, schedule: str = "snr") -> torch.Tensor:
    """The pseudo-Huber threshold ``c_t`` per sample (N,), float32, as kohya's ``get_huber_threshold_if_needed``
    (with ``huber_scale`` 1): ``constant`` ``c``; ``exponential`` ``c ** (t / T)`` (1 at t = 0, ``c`` at the last
    timestep T); ``snr`` ``(1 - c) / (1 + sigma_t) ** 2 + c`` with ``sigma_t = sqrt((1 - alpha_bar) / alpha_bar)``
    (about 1 at low noise, where the loss is then nearly L2, and ``c`` at high noise)."""
    t = timesteps.to(torch.float32)
    if schedule == "constant":
        return torch.full_like(t, huber_c)
    if schedule == "exponential":
        return torch.exp(math.log(huber_c) * t / scheduler.config.num_train_timesteps)
    if schedule == "snr":
        alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device, torch.float32)[timesteps]
        sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()
        return (1.0 - huber_c) / (1.0 + sigmas) ** 2 + huber_c
    raise ValueError(f"unknown --huber_schedule {schedule!r}; use one of {', '.join(HUBER_SCHEDULES)}")


def elementwise_loss(
    pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2", huber_c: torch.Tensor | None = None
) -> torch.Tensor:
    """The error of each element, as kohya's ``conditional_loss`` (``d = pred - target``, ``c`` per sample (N,)):
    ``l2`` ``d^2``; ``l1`` ``|d|``; ``huber`` ``2 c (sqrt(d^2 + c^2) - c)`` (pseudo-Huber: ``d^2`` for small ``d``,
    ``2 c |d|`` for large); ``smooth_l1`` ``2 (sqrt(d^2 + c^2) - c)`` (``d^2 / c`` small, ``2 |d|`` large)."""
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    if loss_type not in ("huber", "smooth_l1"):
        raise ValueError(f"unknown --loss_type {loss_type!r}; use one of {', '.join(LOSS_TYPES)}")
    if huber_c is None:
        raise ValueError(f"--loss_type {loss_type} needs the threshold c per sample (huber_threshold)")
    c = huber_c.to(pred.dtype).view(-1, *([1] * (pred.dim() - 1)))  # (N, 1, 1, 1)
    smooth = torch.sqrt((pred - target) ** 2 + c**2) - c
    return 2 * c * smooth if loss_type == "huber" else 2 * smooth


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
    loss_type: str = "l2",
    huber_c: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean error in fp32 (squared by default; ``loss_type`` and ``huber_c`` (N,) as ``elementwise_loss``),
    Min-SNR weighted per sample if ``snr_gamma``, and by ``debiased_weights`` if ``debiased`` (both: the product,
    as kohya).

    ``mask`` (n, 1, h, w) in [0, 1], for the instance samples: the error of sample i is
    ``sum(mask_i * se_i) / sum(mask_i)`` over the latent pixels (channels averaged), so the loss keeps its scale
    whatever the mask's area. With prior preservation the last ``num_class`` samples are class images: their
    plain mean error (of the same kind) is added with ``prior_loss_weight``.
    """
    pred, target = pred.float(), target.float()
    n = pred.shape[0] - num_class
    c = (None, None) if huber_c is None else (huber_c[:n], huber_c[n:])
    se = elementwise_loss(pred[:n], target[:n], loss_type, c[0])
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
        if loss_type == "l2":
            prior = F.mse_loss(pred[n:], target[n:])
        else:
            prior = elementwise_loss(pred[n:], target[n:], loss_type, c[1]).mean()
        loss = loss + prior_loss_weight * prior
    return loss
