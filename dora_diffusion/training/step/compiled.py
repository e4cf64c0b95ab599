"""``--compile``: the UNet's training forward through ``torch.compile``; everything else keeps the eager module.

Only the training step calls the compiled UNet. Validation, class images, the saved adapter, checkpoints and the
EMA all work on the module itself (``CompiledUNet.module``): the same parameters, its own names (no ``_orig_mod.``
prefix in any file), and the eager inference path for the images, so a validation neither recompiles (no gradients,
a CFG batch of two) nor differs from what a user who loads the file gets.

Shapes: without ``--buckets`` every micro-batch has the same shape and one static graph serves the run. With
``--buckets`` the latent sides change from batch to batch; they are marked dynamic at every call
(``torch._dynamo.maybe_mark_dynamic``), so the first graph has symbolic sides and later buckets reuse it instead of
recompiling when each side first changes (dynamo's automatic dynamic shapes) or once per bucket (``dynamic=False``).
Guards on sizes that tracing records (a convolution backend chosen by the input's size, on a CPU) can still make a
bucket across such a threshold compile once more.

Inside the compiled graph the adapted layers take the ``reference`` forward path (``core/forward_paths.py``),
which inductor fuses; the lean DoRA functions trace too (no graph break) and run there with
``AdaptedLayer.compile_lean``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class CompiledUNet:
    """A UNet's ``torch.compile``d forward, called like the UNet; ``module`` is the UNet itself (shared parameters)."""

    def __init__(self, unet: nn.Module, backend: str = "inductor", dynamic_sides: bool = False) -> None:
        """Compile lazily (the first call compiles): ``backend`` is a ``torch.compile`` backend; ``dynamic_sides``
        marks the sample's height and width dynamic at every call (aspect-ratio buckets)."""
        self.module = unet
        self.backend = backend
        self.dynamic_sides = dynamic_sides
        self.compiled: Callable = torch.compile(unet, backend=backend)

    def __call__(self, sample: torch.Tensor, *args, **kwargs):
        """The UNet's output for ``sample`` (N, C, h, w) and the UNet's other arguments, through the compiled graph."""
        if self.dynamic_sides:
            torch._dynamo.maybe_mark_dynamic(sample, 2)
            torch._dynamo.maybe_mark_dynamic(sample, 3)
        return self.compiled(sample, *args, **kwargs)
