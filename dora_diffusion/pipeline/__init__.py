"""Adapters in a diffusers pipeline: the ``*_dora`` API (``api``), the registry that owns what is loaded
(``registry``), the methods' mixin (``mixin``) and pivotal tuning's embeddings (``embeddings``)."""

from dora_diffusion.pipeline.api import (
    adaptable_models,
    base_weights,
    delete_dora_adapters,
    disable_dora,
    enable_dora,
    fuse_dora,
    get_active_dora_adapters,
    get_dora_adapters,
    load_dora_weights,
    save_dora_weights,
    set_dora_adapters,
    unfuse_dora,
    unload_dora_weights,
)
from dora_diffusion.pipeline.mixin import DoRAPipelineMixin, install_pipeline_methods
from dora_diffusion.pipeline.registry import AdapterRegistry

__all__ = [
    "AdapterRegistry",
    "DoRAPipelineMixin",
    "adaptable_models",
    "base_weights",
    "delete_dora_adapters",
    "disable_dora",
    "enable_dora",
    "fuse_dora",
    "get_active_dora_adapters",
    "get_dora_adapters",
    "install_pipeline_methods",
    "load_dora_weights",
    "save_dora_weights",
    "set_dora_adapters",
    "unfuse_dora",
    "unload_dora_weights",
]
