"""The denoising loss: targets from the scheduler config, Min-SNR weights, prior preservation, noise offset."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from dora_diffusion.training.step.loss import denoising_loss, min_snr_weights, sample_noise, target_for


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


def test_debiased_weights_and_masked_loss():
    from diffusers import DDPMScheduler

    from dora_diffusion.training.step.loss import debiased_weights, denoising_loss, snr

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([0, 10, 500, 999])
    s = snr(scheduler, t)
    assert s[0] > 1000  # capped below
    want = 1.0 / torch.sqrt(torch.clamp(s, max=1000.0))
    assert torch.allclose(debiased_weights(scheduler, t), want)
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 4, 6, 6, generator=g), torch.randn(4, 4, 6, 6, generator=g)
    per = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(denoising_loss(pred, target, t, scheduler, debiased=True), (per * want).mean())
    # masked: all-ones equals unmasked; a mask on the left half is the error of the left half alone
    ones = torch.ones(4, 1, 6, 6)
    assert torch.allclose(denoising_loss(pred, target, t, scheduler, mask=ones), per.mean())
    left = torch.zeros(4, 1, 6, 6)
    left[..., :3] = 1.0
    want_left = ((pred - target)[..., :3] ** 2).mean(dim=(1, 2, 3)).mean()
    assert torch.allclose(denoising_loss(pred, target, t, scheduler, mask=left), want_left)
    # with a class sample after the instances, the mask covers the instances only
    got = denoising_loss(pred, target, t, scheduler, num_class=1, mask=left[:3])
    want = ((pred - target)[:3, ..., :3] ** 2).mean(dim=(1, 2, 3)).mean() + ((pred - target)[3:] ** 2).mean()
    assert torch.allclose(got, want)


def test_magnitude_learning_rate_groups():
    import argparse

    from torch import nn

    from dora_diffusion.training.step.optim import param_groups

    named = [(f"{c}.x.adapters.default.{k}", nn.Parameter(torch.zeros(2))) for c in ("unet", "text_encoder") for k in ("A", "magnitude")]
    args = argparse.Namespace(learning_rate=1e-4, text_encoder_lr=5e-6, optimizer="adamw", adam_weight_decay=1e-2, magnitude_lr=1e-3)
    lrs = {g["name"]: (g["lr"], g["weight_decay"]) for g in param_groups(named, args)}
    assert lrs == {"unet.lowrank": (1e-4, 1e-2), "unet.magnitude": (pytest.approx(1e-3), 0.0),
                   "text_encoders.lowrank": (5e-6, 1e-2), "text_encoders.magnitude": (pytest.approx(5e-5), 0.0)}  # fmt: skip
    args.magnitude_lr = None
    assert {g["name"]: g["lr"] for g in param_groups(named, args)}["unet.magnitude"] == 1e-4


def test_match_pattern():
    from dora_diffusion.core.config import match_pattern

    names = ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k",
             "down_blocks.10.attentions.0.transformer_blocks.0.attn1.to_q",
             "down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_k", "mid_block.attentions.0.proj_in"]  # fmt: skip
    got = match_pattern({"down_blocks.2": 16, "to_k": 4, "down_blocks.1": 2}, names)
    assert got == {names[0]: 2, names[2]: 16}  # whole dotted parts only (not down_blocks.10); most parts win
    assert match_pattern({"attn1.to_k": 3, "to_k": 4}, names) == {names[0]: 3, names[2]: 3}


def test_noise_does_not_depend_on_the_latents_memory_layout():
    z = torch.randn(2, 4, 8, 8)
    torch.manual_seed(0)
    a = sample_noise(z)
    torch.manual_seed(0)
    b = sample_noise(z.to(memory_format=torch.channels_last))
    assert torch.equal(a, b)
