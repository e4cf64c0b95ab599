"""``--use_ema``: an exponential moving average of the trainable adapter tensors (SimpleTuner, ai-toolkit and
OneTrainer have one; diffusers' ``EMAModel`` is the formula).

After optimizer step ``t`` (1-based) every tensor's average moves towards the trained one:
``ema = d_t ema + (1 - d_t) w`` with ``d_t = min(ema_decay, (1 + k) / (10 + k))``, ``k = t - 1`` (diffusers'
``EMAModel`` with ``update_after_step=0``, no ``use_ema_warmup``): step 1 copies the weights, and the warm-up keeps
a short run's average from staying near the untrained adapter. The average is kept in fp32, beside the weights.

What trains, and what a checkpoint's ``adapter_state.safetensors`` keeps, are the raw weights; the average goes
into ``ema_state.safetensors`` beside them, so a resume continues both. Validation images and every written adapter
file use the average (``applied``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def ema_decay_at(step: int, ema_decay: float) -> float:
    """The decay ``d_t`` of the update after optimizer step ``step`` (1-based): 0 at step 1 (a copy), then
    ``min(ema_decay, (1 + k) / (10 + k))`` with ``k = step - 1``."""
    k = step - 1
    if k <= 0:
        return 0.0
    return min(ema_decay, (1 + k) / (10 + k))


class AdapterEMA:
    """The moving average of ``named`` parameters (``(name, parameter)``, the checkpoint's names), fp32."""

    def __init__(self, named: list[tuple[str, nn.Parameter]], decay: float) -> None:
        self.named = list(named)
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in self.named}
        """Each tensor's average (before step 1: the initial weights)."""

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move the average towards the current weights after optimizer step ``step`` (1-based)."""
        d = ema_decay_at(step, self.decay)
        for name, p in self.named:
            self.shadow[name].lerp_(p.detach().float(), 1.0 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averages by parameter name, fp32 on the CPU (for ``ema_state.safetensors``)."""
        return {name: t.detach().cpu().contiguous() for name, t in self.shadow.items()}

    @torch.no_grad()
    def load_state_dict(self, saved: dict[str, torch.Tensor]) -> None:
        """Restore the averages; ``KeyError``/``ValueError`` name the first tensor that is missing or misshapen."""
        missing = sorted(set(self.shadow) - set(saved))
        if missing:
            raise KeyError(f"no average for {len(missing)} adapter tensors, e.g. {missing[:2]}")
        for name, t in self.shadow.items():
            if saved[name].shape != t.shape:
                raise ValueError(f"average of {name} has shape {tuple(saved[name].shape)}, the tensor {tuple(t.shape)}")
            t.copy_(saved[name])

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the parameters hold the averages; afterwards their own values again, bit for bit."""
        with torch.no_grad():
            raw = [p.detach().clone() for _, p in self.named]
            for name, p in self.named:
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for (_, p), saved in zip(self.named, raw):
                    p.copy_(saved)
