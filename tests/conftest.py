"""Shared fixtures: the tiny SDXL pipeline and a fixed way to render it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

torch.set_num_threads(1)  # tiny models gain nothing from threads, and 2 shared cores make them crawl

import dora_diffusion  # noqa: F401  (installs the pipeline methods)
from dora_diffusion.testing import TINY_RESOLUTION, build_tiny_sdxl_pipeline

PROMPT = "a photo of TOK toy on a table"


def render(pipe, prompt: str = PROMPT, seed: int = 0) -> np.ndarray:
    """Two denoising steps with a fixed generator, fp32 numpy images."""
    out = pipe(
        prompt,
        num_inference_steps=2,
        height=TINY_RESOLUTION,
        width=TINY_RESOLUTION,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )
    return out.images


def fresh_pipe():
    """A new tiny SDXL pipeline (same random weights every time), progress bar off."""
    p = build_tiny_sdxl_pipeline(seed=0)
    p.set_progress_bar_config(disable=True)
    return p


def file_modules(path) -> dict[str, dict[str, torch.Tensor]]:
    """``{module key prefix: {param: tensor}}`` of a kohya-style safetensors file (keys ``<module>.<param>``)."""
    from safetensors.torch import load_file

    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(path)).items():
        module, _, param = key.partition(".")
        groups.setdefault(module, {})[param] = t
    return groups


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


@pytest.fixture
def pipe():
    """A fresh tiny SDXL pipeline (same random weights every time)."""
    return fresh_pipe()


@pytest.fixture(scope="session")
def base_images() -> np.ndarray:
    p = build_tiny_sdxl_pipeline(seed=0)
    p.set_progress_bar_config(disable=True)
    return render(p)


def perturb_adapter(model: torch.nn.Module, adapter_name: str, seed: int, b_std: float = 0.05) -> None:
    """Make an untrained adapter look trained: random B, magnitudes scaled by U(0.8, 1.2)."""
    from dora_diffusion.inject import adapted_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            if adapter_name not in layer.adapters:
                continue
            b = layer.adapters[adapter_name].B
            b.copy_(torch.randn(b.shape, generator=g) * b_std)
            if layer.adapters[adapter_name].magnitude is not None:
                m = layer.adapters[adapter_name].magnitude
                m.mul_(0.8 + 0.4 * torch.rand(m.shape, generator=g))


def make_adapter_file(directory, seed: int = 1, targets: str = "all", use_dora: bool = True, text: bool = True):
    """Write a random-but-trained-looking adapter for the tiny pipeline; returns the file path."""
    from dora_diffusion import AdapterConfig, add_adapter

    p = build_tiny_sdxl_pipeline(seed=0)
    add_adapter(p.unet, AdapterConfig(rank=4, alpha=6, use_dora=use_dora, targets=targets), "a")
    perturb_adapter(p.unet, "a", seed)
    if text:
        for i, te in enumerate((p.text_encoder, p.text_encoder_2)):
            add_adapter(te, AdapterConfig(rank=2, use_dora=use_dora, targets="all"), "a")
            perturb_adapter(te, "a", seed + 100 + i)
    return p.save_dora_weights(directory)
