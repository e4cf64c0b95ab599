"""What is loaded into one pipeline, kept in one place.

``AdapterRegistry.of(pipe)`` is built by one walk of each adaptable model (UNet and both text encoders) and kept in
step by every load, delete and unload that goes through ``dora_diffusion.pipeline``: the pipeline API reads it and
never walks the models again. It owns

- ``models``: ``{component: model}``;
- ``modules``: every module of each model by name, seen through adapter wrappers (what a file's names resolve to);
- ``layers``: the adapter wrappers by component and module name (each holds its adapters, strengths, fused state);
- ``loaded``: one ``LoadedAdapter`` per adapter name, in load order: the file it came from and the tokens its
  embeddings added.

Adapters added or removed behind its back through ``core.inject`` (``add_adapter`` on ``pipe.unet``, say) or a model
replaced (``pipe.unet = other``) are noticed without a walk (``core.inject.generation`` counts such changes per model)
and the registry is rebuilt by one walk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from dora_diffusion.core.inject import generation, ordered_adapter_names, walk
from dora_diffusion.core.layers import AdaptedLayer
from dora_diffusion.formats import COMPONENTS

ATTRIBUTE = "_dora_registry"
"""The pipeline attribute the registry lives in."""


@dataclass
class LoadedAdapter:
    """One adapter of a pipeline: where it came from, and what it added besides its layers."""

    name: str
    file: Path | None = None
    identity: tuple | None = None  # (device, inode, size, mtime) of ``file`` when it was loaded
    tokens: list[str] = field(default_factory=list)  # the tokens its embeddings file added (pivotal tuning)


def adaptable_models(pipe) -> dict[str, nn.Module]:
    """The adaptable models of ``pipe`` by component name (``unet``, ``text_encoder``, ``text_encoder_2``)."""
    found = {c: getattr(pipe, c, None) for c in COMPONENTS}
    found = {c: m for c, m in found.items() if isinstance(m, nn.Module)}
    if "unet" not in found:
        raise TypeError(f"{type(pipe).__name__} has no `unet`; DoRA adapters need an SDXL-style pipeline")
    return found


def _stamp(models: dict[str, nn.Module]) -> tuple:
    return tuple((comp, id(model), generation(model)) for comp, model in models.items())


class AdapterRegistry:
    """The adapters of one pipeline, its models' modules and wrappers (see the module doc)."""

    def __init__(self, pipe) -> None:
        self.models = adaptable_models(pipe)
        self.modules: dict[str, dict[str, nn.Module]] = {}
        self.layers: dict[str, dict[str, AdaptedLayer]] = {}
        for comp, model in self.models.items():
            self.modules[comp], self.layers[comp] = walk(model)
        self.loaded: dict[str, LoadedAdapter] = {n: LoadedAdapter(n) for n in ordered_adapter_names(self.all_layers())}
        self.stamp = _stamp(self.models)

    @classmethod
    def of(cls, pipe) -> AdapterRegistry:
        """The registry of ``pipe``, built on first use and rebuilt (one walk) if its models changed behind it."""
        registry = pipe.__dict__.get(ATTRIBUTE)
        if registry is not None and registry.stamp == _stamp(adaptable_models(pipe)):
            return registry
        fresh = cls(pipe)
        if registry is not None:  # keep what the old one knew of adapters still there
            fresh.loaded.update({n: a for n, a in registry.loaded.items() if n in fresh.loaded})
        setattr(pipe, ATTRIBUTE, fresh)
        return fresh

    def synced(self) -> None:
        """Record that ``layers`` is true again after this registry's own changes through ``core.inject``."""
        self.stamp = _stamp(self.models)

    def all_layers(self) -> list[AdaptedLayer]:
        """Every adapter wrapper of every model."""
        return [layer for comp in self.layers.values() for layer in comp.values()]

    def names(self) -> list[str]:
        """Adapter names in load order."""
        return list(self.loaded)

    def fused(self) -> bool:
        """True if some adapter is fused into the base weights."""
        return any(layer.fused for layer in self.all_layers())

    def disabled(self) -> bool:
        """True if the adapters are switched off (``disable_dora``)."""
        return any(layer.disabled for layer in self.all_layers())

    def linear_conv_names(self) -> dict[str, list[str]]:
        """``{component: names of its Linear and Conv2d modules}``: what adapter modules can name."""
        return {
            comp: [n for n, m in mods.items() if isinstance(m, (nn.Linear, nn.Conv2d))] for comp, mods in self.modules.items()
        }
