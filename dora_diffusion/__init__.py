"""DoRA (weight-decomposed low-rank adaptation) for SDXL in diffusers.

``import dora_diffusion`` adds ``load_dora_weights``, ``set_dora_adapters``, ``fuse_dora`` and the rest of
``DoRAPipelineMixin`` as methods of every diffusers pipeline (``DORA_DIFFUSION_PIPELINE_METHODS=0`` before the
import leaves diffusers' classes as they are; the same functions take the pipeline first). The rooms of the
package and which way they depend: docs/architecture.md.
"""

from dora_diffusion._version import __version__
from dora_diffusion.core.config import AdapterConfig
from dora_diffusion.formats import AdapterFileError
from dora_diffusion.core.inject import add_adapter, find_targets, remove_adapter, set_recompute, trainable_parameters
from dora_diffusion.core.layers import AdaptedLayer, DoRAConv2d, DoRALinear
from dora_diffusion.adapter_io import save_adapter
from dora_diffusion.pipeline import (
    AdapterRegistry,
    DoRAPipelineMixin,
    delete_dora_adapters,
    disable_dora,
    enable_dora,
    fuse_dora,
    get_active_dora_adapters,
    get_dora_adapters,
    install_pipeline_methods,
    load_dora_weights,
    save_dora_weights,
    set_dora_adapters,
    unfuse_dora,
    unload_dora_weights,
)

install_pipeline_methods()

__all__ = [
    "__version__",
    "AdapterConfig",
    "AdapterFileError",
    "AdaptedLayer",
    "AdapterRegistry",
    "DoRAPipelineMixin",
    "DoRAConv2d",
    "DoRALinear",
    "add_adapter",
    "delete_dora_adapters",
    "disable_dora",
    "enable_dora",
    "find_targets",
    "fuse_dora",
    "get_active_dora_adapters",
    "get_dora_adapters",
    "load_dora_weights",
    "remove_adapter",
    "save_adapter",
    "save_dora_weights",
    "set_dora_adapters",
    "set_recompute",
    "trainable_parameters",
    "unfuse_dora",
    "unload_dora_weights",
]
