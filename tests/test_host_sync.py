"""No host sync in the DoRA training step: nothing in our layers reads a tensor's value back to Python.

On a GPU every ``bool(t)``, ``t.item()``, ``float(t)`` or ``t.tolist()`` waits for the device to finish
(``torch.cuda.set_sync_debug_mode`` reports them). A CPU has no such mode, so these tests count the calls
that would sync, by wrapping them on ``torch.Tensor`` while a forward and backward run.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from dora_diffusion.core.config import AdapterConfig
from dora_diffusion.core.inject import add_adapter
from dora_diffusion.core.layers import AdapterSpec, wrap
from dora_diffusion.testing import build_tiny_sdxl_pipeline
from helpers import make_base, make_input, perturb_layer

SYNCING = ("__bool__", "item", "tolist", "__float__", "__int__", "__index__", "numpy", "cpu")
"""Tensor methods that copy a value to the host (``cpu`` counts even on CPU, where it is free)."""


@contextlib.contextmanager
def count_host_syncs() -> Iterator[Counter]:
    """Count calls of the ``SYNCING`` methods (and ``torch.equal`` / ``torch.allclose``) inside the block."""
    counts: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in SYNCING}
    functions = {name: getattr(torch, name) for name in ("equal", "allclose")}

    def counted(name, original):
        def call(*args, **kwargs):
            counts[name] += 1
            return original(*args, **kwargs)

        return call

    for name, original in originals.items():
        setattr(torch.Tensor, name, counted(name, original))
    for name, original in functions.items():
        setattr(torch, name, counted(name, original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        for name, original in functions.items():
            setattr(torch, name, original)


def test_the_counter_sees_a_sync() -> None:
    t = torch.ones(3)
    with count_host_syncs() as counts:
        bool((t > 0).any())
        t.sum().item()
    assert counts == Counter({"__bool__": 1, "item": 1})


def _step(layer: nn.Module, x: torch.Tensor) -> None:
    y = layer(x.requires_grad_(True))
    (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()


@pytest.mark.parametrize("kind", ["linear", "conv3x3", "conv1x1"])
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("zero_rows", [False, True])
def test_dora_layer_step_has_no_host_sync(kind, recompute, zero_rows) -> None:
    """The lean training functions (also with magnitudes at 0, the case that used to be checked on the host)."""
    base = make_base(kind, torch.float32).requires_grad_(False)
    layer = wrap(base)
    layer.new_adapter("a", AdapterSpec(4, 3.0, True))
    perturb_layer(layer, "a")
    layer.recompute_output = recompute
    if zero_rows:
        with torch.no_grad():
            layer.adapters["a"].magnitude[[0, 2]] = 0.0
    x = make_input(base, torch.float32)
    _step(layer, x)  # first call: fills the norm caches
    with count_host_syncs() as counts:
        _step(layer, x)
    assert counts == Counter()
    assert layer.adapters["a"].magnitude.grad[0].abs() > 0 if zero_rows else True


@pytest.mark.parametrize("checkpointing", [False, True])
def test_unet_training_step_adds_no_host_sync(checkpointing) -> None:
    """A training step of the tiny SDXL UNet syncs exactly as often with DoRA on every Linear and Conv2d as without."""
    unet = build_tiny_sdxl_pipeline().unet.requires_grad_(False)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        sample=torch.randn(2, 4, 8, 8, generator=g).requires_grad_(True),  # a graph also without adapters
        timestep=torch.tensor([10, 500]),
        encoder_hidden_states=torch.randn(2, 77, 80, generator=g),
        added_cond_kwargs={"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.rand(2, 6, generator=g)},
    )

    def syncs() -> Counter:
        unet(**inputs).sample.square().mean().backward()  # warm-up (norm caches)
        with count_host_syncs() as counts:
            unet(**inputs).sample.square().mean().backward()
        return counts

    plain = syncs()
    add_adapter(unet, AdapterConfig(rank=4, use_dora=True, targets="all"), "default")
    with_dora = syncs()
    assert with_dora == plain, f"DoRA added host syncs: {with_dora - plain}"
