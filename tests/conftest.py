"""Shared fixtures: a fresh tiny SDXL pipeline and its base images. Shared helpers are in ``helpers.py``."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

torch.set_num_threads(1)  # tiny models gain nothing from threads, and 2 shared cores make them crawl


def _emulate_grad_dependent_kernels() -> None:
    """``DORA_TEST_GRAD_DEPENDENT_KERNELS=1``: make ``F.linear`` and ``F.conv2d`` round differently when the weight
    requires grad, as PyTorch's matmul does on some CPUs (on an AVX-512/AMX Xeon it folds a batched input one way
    for a weight that requires grad and another way for a frozen one: 5.7e-6 apart). On a CPU where both take the
    same path, this shows what a user's CPU would: any change to a base module's ``requires_grad`` breaks the
    bit-exact claims. The other path here is the same product computed in float64 and rounded once."""
    linear, conv2d = F.linear, F.conv2d

    def other_path(op):
        def run(x, weight, bias=None, *args, **kwargs):
            if not (weight.requires_grad and x.dtype == torch.float32 and weight.dtype == torch.float32):
                return op(x, weight, bias, *args, **kwargs)
            b = None if bias is None else bias.double()
            return op(x.double(), weight.double(), b, *args, **kwargs).float()

        return run

    F.linear, F.conv2d = other_path(linear), other_path(conv2d)


if os.environ.get("DORA_TEST_GRAD_DEPENDENT_KERNELS") == "1":
    _emulate_grad_dependent_kernels()

from helpers import fresh_pipe, render  # noqa: E402  (helpers imports dora_diffusion: threads are set first)


@pytest.fixture
def pipe():
    """A fresh tiny SDXL pipeline (same random weights every time)."""
    return fresh_pipe()


@pytest.fixture(scope="session")
def base_images() -> np.ndarray:
    """The tiny pipeline's images with no adapter (``render``'s defaults)."""
    return render(fresh_pipe())
