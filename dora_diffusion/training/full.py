"""``--adapter full``: full fine-tuning (FT) of the targeted UNet weights, the DoRA paper's reference, in the script.

The modules ``--unet_targets`` selects (the same ones a DoRA or LoRA run adapts) have their ``weight`` trained in
place, in fp32; their biases and everything else stay frozen. Everything else of a run is the script's own: data
order, noise, timesteps, loss (prior preservation included), optimiser groups (``--learning_rate`` and
``--adam_weight_decay``, as for LoRA's A and B), schedule, checkpoints (the trained weights and their optimiser
state: a full-FT checkpoint of SDXL's attention is gigabytes), ``--resume_from_checkpoint`` and validation.

The output is an *exact* LoRA of the change ``W_ft - W0`` (``lora_of_change``), in the dialect the script writes for
LoRA, with ``"method": "FT"`` in its metadata, so ``load_dora_weights``, ``dora-diffusion analyze`` and the app read
an FT run as they read an adapter. ``toyworld/finetune.py`` (``method="ft"``) is the same training in a second loop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dora_diffusion.core.inject import find_targets
from dora_diffusion.formats import ModuleAdapter
from dora_diffusion.training.errors import TrainingError
from dora_diffusion.training.models import ADAPTER_NAME

FT_METHOD = "FT"
"""The ``method`` an FT run's file names in its metadata (``analysis.file_method``)."""


def check_full_precision(mixed_precision: str) -> None:
    """Raise ``TrainingError`` for ``--adapter full`` with half-precision training (``mixed_precision`` resolved).

    FT keeps no separate fp32 master copy: the trained weights are the UNet's own, which ``--mixed_precision``
    fp16/bf16 would store in half precision, where most of Adam's small updates round away.
    """
    if mixed_precision in ("fp16", "bf16"):
        raise TrainingError(
            f"--adapter full with --mixed_precision {mixed_precision}: full fine-tuning trains the UNet's own weights, "
            f"which would then be stored in {mixed_precision} (updates smaller than their rounding are lost). Pass "
            "--mixed_precision no (fp32; on SDXL that needs the memory of the whole fp32 UNet plus Adam's two states "
            "per trained weight)"
        )


@dataclass(frozen=True)
class FullCount:
    """What ``--adapter full`` trains: ``weights`` numbers in ``layers`` Linear/Conv2d modules."""

    weights: int
    layers: int

    @property
    def total(self) -> int:
        return self.weights

    def __str__(self) -> str:
        return f"trainable parameters: {self.weights:,} weights of {self.layers} layers (full fine-tuning; biases frozen)"


def lora_of_change(w0: torch.Tensor, w: torch.Tensor) -> ModuleAdapter:
    """An exact LoRA (scale 1: alpha = rank) of ``W - W0`` for a Linear (2-D) or Conv2d (4-D) weight.

    ``D = W - W0`` (fp32), ``K`` = in x kh x kw, rank ``r = min(out, K)``: when ``K <= out``, down = the identity
    (for a conv: an (in, kh, kw) kernel that copies each of the K input entries of a patch) and up = ``D``; else
    down = ``D`` (a conv of the full kernel) and up = the identity (a 1x1 conv). One factor is an identity, so
    ``up @ down`` is ``D`` bit for bit, and a merge computes ``W0 + D`` (``D`` itself rounded once: see
    ``docs/training.md``).
    """
    if w.shape != w0.shape or w.dim() not in (2, 4):
        raise ValueError(f"a Linear (2-D) or Conv2d (4-D) weight and its base of the same shape, got {tuple(w.shape)} and {tuple(w0.shape)}")
    delta = w.detach().float().cpu() - w0.detach().float().cpu()
    out, k = delta.shape[0], delta[0].numel()
    if k <= out:
        down = torch.eye(k).reshape(k, *delta.shape[1:])
        up = delta.reshape(out, k, *([1, 1] if delta.dim() == 4 else []))
    else:
        down = delta
        up = torch.eye(out).reshape(out, out, *([1, 1] if delta.dim() == 4 else []))
    return ModuleAdapter(down.contiguous(), up.contiguous(), None, float(min(out, k)))


class FullFineTune:
    """The targeted weights of ``unet`` made trainable, with a CPU copy of their base values to write the change.

    ``named`` is what the run's optimiser, checkpoints, EMA and gradient averaging see: ``("unet.<module>.weight",
    parameter)``. Construct it before ``--resume_from_checkpoint`` restores the trained values (the copy must be
    the base model's).
    """

    def __init__(self, unet: nn.Module, targets: str | list[str]) -> None:
        try:
            names = find_targets(unet, targets)
        except ValueError as err:
            raise ValueError(f"--unet_targets {targets!r}: {err}") from None
        modules = dict(unet.named_modules())
        self.unet = unet
        self.modules: dict[str, nn.Module] = {n: modules[n] for n in names}
        for name, module in self.modules.items():
            if module.weight.dtype != torch.float32:
                raise TrainingError(
                    f"--adapter full: {name}.weight is {module.weight.dtype}; full fine-tuning trains fp32 weights "
                    "(pass --mixed_precision no, and no --fp8_base)"
                )
        self.base = {n: m.weight.detach().to("cpu", copy=True) for n, m in self.modules.items()}
        for module in self.modules.values():
            module.weight.requires_grad_(True)
        self.named: list[tuple[str, nn.Parameter]] = [(f"unet.{n}.weight", m.weight) for n, m in self.modules.items()]

    def count(self) -> FullCount:
        """The trained weights and layers."""
        return FullCount(sum(p.numel() for _, p in self.named), len(self.named))

    def collect(self) -> dict[str, dict[str, ModuleAdapter]]:
        """The change of every targeted weight as an exact LoRA, ``{"unet": {module: ModuleAdapter}}``."""
        return {"unet": {n: lora_of_change(self.base[n], m.weight) for n, m in self.modules.items()}}

    def save(
        self,
        directory: str | os.PathLike,
        weight_name: str | None = None,
        format: str = "diffusers",
        metadata: dict | None = None,
    ) -> Path:
        """Write the change as a LoRA file in ``directory`` (``format`` as ``adapter_io.save_adapter``), its
        metadata's ``method`` naming it ``FT``; returns the file's path."""
        from dora_diffusion.adapter_io import write_modules

        base = {"unet": dict(self.base)} if format == "comfyui" else None
        info = {**(metadata or {}), "method": FT_METHOD}
        return write_modules(self.collect(), directory, ADAPTER_NAME, weight_name, format, info, self.unet, base)
