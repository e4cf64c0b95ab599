"""``DoRAPipelineMixin``: the ``*_dora`` functions of ``api.py`` as pipeline methods.

``import dora_diffusion`` copies its methods onto ``diffusers.DiffusionPipeline`` (``install_pipeline_methods``), so
every diffusers pipeline has them, as diffusers' own LoRA methods come from ``StableDiffusionXLLoraLoaderMixin``.
To keep diffusers' classes as they are, set ``DORA_DIFFUSION_PIPELINE_METHODS=0`` before the import and call the
functions (``dora_diffusion.load_dora_weights(pipe, ...)``), or subclass the mixin
(``class MyPipeline(DoRAPipelineMixin, StableDiffusionXLPipeline)``).
"""

from __future__ import annotations

import os

from dora_diffusion.pipeline import api

ENV_SWITCH = "DORA_DIFFUSION_PIPELINE_METHODS"
"""``0`` (or ``false``/``no``/``off``): ``import dora_diffusion`` leaves ``DiffusionPipeline`` as it is."""


class DoRAPipelineMixin:
    """DoRA/LoRA adapter methods for an SDXL-style diffusers pipeline (one with a ``unet``): the functions of
    ``pipeline.api``, each taking the pipeline as ``self``."""

    load_dora_weights = api.load_dora_weights
    set_dora_adapters = api.set_dora_adapters
    disable_dora = api.disable_dora
    enable_dora = api.enable_dora
    fuse_dora = api.fuse_dora
    unfuse_dora = api.unfuse_dora
    unload_dora_weights = api.unload_dora_weights
    delete_dora_adapters = api.delete_dora_adapters
    get_dora_adapters = api.get_dora_adapters
    get_active_dora_adapters = api.get_active_dora_adapters
    save_dora_weights = api.save_dora_weights


METHOD_NAMES = tuple(n for n, v in vars(DoRAPipelineMixin).items() if callable(v) and not n.startswith("_"))


def install_pipeline_methods() -> bool:
    """Copy ``DoRAPipelineMixin``'s methods onto ``diffusers.DiffusionPipeline`` (idempotent), unless
    ``DORA_DIFFUSION_PIPELINE_METHODS`` is ``0``; returns whether they were installed."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    from diffusers import DiffusionPipeline

    for name in METHOD_NAMES:
        setattr(DiffusionPipeline, name, getattr(DoRAPipelineMixin, name))
    return True
