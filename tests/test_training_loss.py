"""The denoising loss: targets from the scheduler config, Min-SNR weights, prior preservation, noise offset."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from dora_diffusion.training.loss import denoising_loss, min_snr_weights, sample_noise, target_for


def _scheduler(prediction_type: str) -> DDPMScheduler:
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type)


def test_targets_follow_the_scheduler_config():
    latents, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([10, 500, 990])
    assert torch.equal(target_for(_scheduler("epsilon"), latents, noise, t), noise)
    s = _scheduler("v_prediction")
    a = s.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    b = (1 - s.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(target_for(s, latents, noise, t), a * noise - b * latents)  # v = sqrt(ab) e - sqrt(1-ab) x0


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_weights(prediction):
    s = _scheduler(prediction)
    t = torch.tensor([5, 300, 999])
    ab = s.alphas_cumprod[t].double()
    snr = ab / (1 - ab)
    expected = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / (snr if prediction == "epsilon" else snr + 1)
    torch.testing.assert_close(min_snr_weights(s, t, 5.0).double(), expected, rtol=1e-5, atol=0)
    assert snr[0] > 5 > snr[2]  # both branches of the min are exercised


def test_loss_with_prior_preservation_and_snr():
    s = _scheduler("epsilon")
    pred, target = torch.randn(4, 4, 2, 2), torch.randn(4, 4, 2, 2)
    t = torch.tensor([10, 900, 10, 900])
    w = min_snr_weights(s, t[:2], 5.0)
    per = ((pred[:2] - target[:2]) ** 2).mean(dim=(1, 2, 3))
    expected = (per * w).mean() + 0.5 * F.mse_loss(pred[2:], target[2:])
    torch.testing.assert_close(denoising_loss(pred, target, t, s, snr_gamma=5.0, num_class=2, prior_loss_weight=0.5), expected)
    torch.testing.assert_close(denoising_loss(pred, target, t, s), F.mse_loss(pred, target))


def test_noise_offset_adds_a_per_channel_constant():
    latents = torch.zeros(2, 4, 8, 8)
    torch.manual_seed(0)
    plain = sample_noise(latents)
    torch.manual_seed(0)
    offset = sample_noise(latents, noise_offset=0.1)
    shift = offset - plain  # (2, 4, 8, 8): one constant per sample and channel
    torch.testing.assert_close(shift, shift[:, :, :1, :1].expand_as(shift))
    assert 0 < shift.abs().max() < 0.5
