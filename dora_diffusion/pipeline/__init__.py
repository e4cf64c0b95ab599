"""Adapters in a diffusers pipeline: the ``*_dora`` API (``api``), the registry that owns what is loaded
(``registry``), the methods' mixin (``mixin``) and pivotal tuning's embeddings (``embeddings``)."""

from dora_diffusion.pipeline.api import *  # noqa: F403  (the *_dora functions; api.__all__ names them)
from dora_diffusion.pipeline.api import __all__ as _api_names
from dora_diffusion.pipeline.mixin import DoRAPipelineMixin, install_pipeline_methods
from dora_diffusion.pipeline.registry import AdapterRegistry

__all__ = ["AdapterRegistry", "DoRAPipelineMixin", "install_pipeline_methods", *_api_names]
