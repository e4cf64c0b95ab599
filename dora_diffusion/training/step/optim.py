"""Optimizer and learning-rate schedule for the adapter parameters."""

from __future__ import annotations

import argparse
import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


def param_groups(named: list[tuple[str, nn.Parameter]], args: argparse.Namespace, lr_scale: float = 1.0) -> list[dict]:
    """Groups: UNet and text encoders get their own learning rate; magnitudes get no weight decay
    (decaying ``m`` towards 0 would shrink the adapted weights, not regularise the update) and their own
    learning rate, ``--magnitude_lr`` (the DoRA knob: how fast the per-channel scale moves against the
    direction), which scales the text encoders' magnitudes by the same ratio.

    With ``--loraplus_lr_ratio`` (LoRA+, Hayou et al. 2024; kohya's network arg, PEFT's
    ``create_loraplus_optimizer``) the ``B`` matrices get their own groups at ratio x the learning rate of ``A``
    (UNet and text encoders alike); magnitudes keep theirs, as in kohya/LyCORIS (PEFT puts 1-D magnitudes with B).
    """
    unet_lr = args.learning_rate * lr_scale
    # Prodigy estimates one step size; diffusers gives every group the same lr with it.
    te_lr = unet_lr if args.optimizer == "prodigy" else args.text_encoder_lr * lr_scale
    magnitude_lr = getattr(args, "magnitude_lr", None)
    ratio = 1.0 if magnitude_lr is None else magnitude_lr / args.learning_rate
    plus = getattr(args, "loraplus_lr_ratio", None)
    groups: dict[tuple[str, str], list[nn.Parameter]] = {}
    for name, p in named:
        comp = "unet" if name.startswith("unet.") else "text_encoders"
        kind = "magnitude" if name.endswith(".magnitude") else "lowrank"
        if plus is not None and name.endswith(".B"):
            kind = "B"
        groups.setdefault((comp, kind), []).append(p)
    out = []
    for (comp, kind), params in groups.items():
        factor = {"magnitude": ratio, "B": plus, "lowrank": 1.0}[kind]
        out.append(
            {
                "params": params,
                "lr": (unet_lr if comp == "unet" else te_lr) * factor,
                "weight_decay": 0.0 if kind == "magnitude" else args.adam_weight_decay,
                "name": f"{comp}.{kind}",
            }
        )
    return out


def build_optimizer(groups: list[dict], args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW, 8-bit AdamW (bitsandbytes) or Prodigy (prodigyopt) over ``groups``."""
    betas = (args.adam_beta1, args.adam_beta2)
    if args.optimizer == "adamw":
        return torch.optim.AdamW(groups, betas=betas, eps=args.adam_epsilon)
    if args.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError("--optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(groups, betas=betas, eps=args.adam_epsilon)
    if args.optimizer == "prodigy":
        try:
            import prodigyopt
        except ImportError:
            raise ImportError("--optimizer prodigy needs prodigyopt: pip install prodigyopt") from None
        if args.learning_rate <= 0.1:
            logger.warning("Prodigy adapts the step size itself; --learning_rate is usually 1.0, got %g", args.learning_rate)
        return prodigyopt.Prodigy(
            groups,
            betas=betas,
            beta3=args.prodigy_beta3,
            eps=args.adam_epsilon,
            decouple=args.prodigy_decouple,
            use_bias_correction=args.prodigy_use_bias_correction,
            safeguard_warmup=args.prodigy_safeguard_warmup,
        )
    raise ValueError(f"unknown --optimizer {args.optimizer!r}")


def build_lr_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace, max_steps: int):
    """diffusers' schedule ``--lr_scheduler`` with ``--lr_warmup_steps``, stepped once per optimizer step."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=max_steps,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )
