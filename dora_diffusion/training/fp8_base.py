"""``--fp8_base``: the frozen UNet (and the text encoders, unless they train) stored in float8 e4m3fn with a
per-output-channel power-of-two scale, each layer dequantized to the training dtype when it computes
(``core/fp8.py``). kohya sd-scripts' flag of the same name casts the weights to float8 with no scale.

The saved adapter is an ordinary one (its own tensors, no float8); its metadata records ``fp8_base`` under
``training``, since DoRA's magnitudes were learnt against the dequantized ``W0``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dora_diffusion.core.fp8 import Float8Weight, to_float8, weight_bytes
from dora_diffusion.training.models import Components


@dataclass(frozen=True)
class Float8Report:
    """What ``store_in_float8`` left: float8 layers per model, and the weight bytes before and after."""

    layers: dict[str, int]
    bytes_before: int
    bytes_after: int

    def __str__(self) -> str:
        parts = ", ".join(f"{name} {n}" for name, n in self.layers.items())
        return (
            f"--fp8_base: {sum(self.layers.values())} Linear/Conv2d weights stored in float8 e4m3fn ({parts}); "
            f"weights {_size(self.bytes_before)} -> {_size(self.bytes_after)}"
        )


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def text_encoders_train(args) -> bool:
    """True if gradients change the text encoders or their token rows (adapters or pivotal tuning): they stay in the
    training dtype."""
    return bool(args.train_text_encoder or getattr(args, "train_text_encoder_ti", False))


def store_in_float8(components: Components, args, compute_dtype: torch.dtype) -> Float8Report:
    """Convert the frozen UNet (and the text encoders unless ``text_encoders_train``) to float8 storage, in place,
    computing in ``compute_dtype``. Call after the models have their device and dtype, before the adapters."""
    models = {"unet": components.unet}
    if not text_encoders_train(args):
        models.update(text_encoder=components.text_encoder, text_encoder_2=components.text_encoder_2)
    before = sum(weight_bytes(m) for m in models.values())
    for model in models.values():
        to_float8(model, compute_dtype)  # a pair's second half gets the models the first one converted: nothing to do
    layers = {name: sum(isinstance(m, Float8Weight) for m in model.modules()) for name, model in models.items()}
    return Float8Report(layers, before, sum(weight_bytes(m) for m in models.values()))
