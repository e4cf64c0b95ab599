"""Shared fixtures: a fresh tiny SDXL pipeline and its base images. Shared helpers are in ``helpers.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

torch.set_num_threads(1)  # tiny models gain nothing from threads, and 2 shared cores make them crawl

from helpers import fresh_pipe, render  # noqa: E402  (helpers imports dora_diffusion: threads are set first)


@pytest.fixture
def pipe():
    """A fresh tiny SDXL pipeline (same random weights every time)."""
    return fresh_pipe()


@pytest.fixture(scope="session")
def base_images() -> np.ndarray:
    """The tiny pipeline's images with no adapter (``render``'s defaults)."""
    return render(fresh_pipe())
