"""The pipeline-level adapter API, named after diffusers' LoRA methods (the differences: README, "Differences from
diffusers' LoRA methods").

Each function takes the pipeline first; ``DoRAPipelineMixin`` (``mixin.py``) offers them as methods, and
``import dora_diffusion`` adds those to every diffusers pipeline. A pipeline needs a ``unet``; ``text_encoder`` and
``text_encoder_2`` are adapted when present. Every function reads and updates the pipeline's ``AdapterRegistry``
(``registry.py``): none walks the models' modules once the registry exists.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import warnings
from pathlib import Path

import torch

from dora_diffusion import formats
from dora_diffusion.adapter_io import attach_adapter, check_fits, read_adapter, save_adapter
from dora_diffusion.core.inject import remove_adapter, remove_all
from dora_diffusion.formats import COMPONENTS, AdapterFileError, ModuleAdapter, shown
from dora_diffusion.pipeline.embeddings import find_embeddings, load_embeddings, unload_embeddings
from dora_diffusion.pipeline.registry import AdapterRegistry, LoadedAdapter, adaptable_models

logger = logging.getLogger(__name__)

AdapterWeight = float | dict[str, float]

__all__ = [  # what `dora_diffusion.pipeline` re-exports
    "adaptable_models", "base_weights", "delete_dora_adapters", "disable_dora", "enable_dora", "fuse_dora",
    "get_active_dora_adapters", "get_dora_adapters", "load_dora_weights", "save_dora_weights", "set_dora_adapters",
    "unfuse_dora", "unload_dora_weights",
]  # fmt: skip



def _old_positional(function: str, args: tuple, names: tuple[str, ...], given: dict) -> dict:
    """Keyword arguments from positional ones in this package's old order, with a ``FutureWarning``; a name also
    given by keyword is an error."""
    if len(args) > len(names):
        raise TypeError(f"{function}() takes at most {len(names)} arguments after the pipeline's first, got {len(args)}")
    out = dict(zip(names, args))
    twice = sorted(set(out) & {k for k, v in given.items() if v is not None})
    if twice:
        raise TypeError(f"{function}() got {', '.join(twice)} both by position and by keyword")
    warnings.warn(
        f"{function}(): passing {', '.join(out)} by position is deprecated and will be refused in a future release "
        f"(diffusers' LoRA methods order their arguments differently); pass {', '.join(f'{n}=' for n in out)} by keyword",
        FutureWarning,
        stacklevel=3,
    )
    return out


def get_dora_adapters(pipe) -> list[str]:
    """Names of the adapters loaded into ``pipe``, in load order."""
    return AdapterRegistry.of(pipe).names()


def get_active_dora_adapters(pipe) -> dict[str, float]:
    """``{adapter: strength}`` of the adapters that currently run (UNet strengths; diffusers' ``get_active_adapters``
    returns the names only)."""
    active: dict[str, float] = {}
    for comp, layers in AdapterRegistry.of(pipe).layers.items():
        for layer in layers.values():
            for name, k in layer.active.items():
                if comp == "unet" or name not in active:
                    active[name] = k
    return active


def _fit(pipe, registry: AdapterRegistry, matched: dict[str, dict[str, ModuleAdapter]]) -> None:
    """Raise ``AdapterFileError`` naming the first module whose file tensors do not fit."""
    for comp, mods in matched.items():
        for name, ma in mods.items():
            check_fits(f"{type(pipe).__name__}.{comp}.{name}", registry.modules[comp][name], ma)


def _registry_weights(registry: AdapterRegistry, modules: dict[str, dict[str, ModuleAdapter]]) -> dict[str, dict[str, torch.Tensor]]:
    """``{component: {module name: W0}}`` of modules already named as in the pipeline."""
    return {comp: {name: registry.modules[comp][name].weight.detach() for name in mods} for comp, mods in modules.items()}


def _new_adapter_name(registry: AdapterRegistry) -> str:
    taken = set(registry.names())
    i = 0
    while f"default_{i}" in taken:
        i += 1
    return f"default_{i}"


def _file_identity(path: Path) -> tuple:
    """What makes two paths the same file with the same content: device, inode, size, modification time."""
    st = path.stat()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _warn_if_loaded(registry: AdapterRegistry, path: Path | None) -> tuple | None:
    """Warn, naming the adapter, if the file at ``path`` is already loaded; return its identity."""
    if path is None:
        return None
    identity = _file_identity(path)
    first = next((a.name for a in registry.loaded.values() if a.identity == identity), None)
    if first is not None:
        warnings.warn(
            f"{path} is already loaded as adapter {first!r}; loading it again runs it twice (their changes add up). "
            f"For a stronger effect use set_dora_adapters({first!r}, 2.0); to reload it, delete_dora_adapters({first!r}) first",
            UserWarning,
            stacklevel=3,
        )
    return identity


def _check_new_name(pipe, registry: AdapterRegistry, adapter_name: str | None) -> str:
    if adapter_name is None:
        return _new_adapter_name(registry)
    if adapter_name in registry.loaded:
        raise ValueError(
            f"adapter name {adapter_name!r} is already in use in {type(pipe).__name__}; "
            "pick another or call delete_dora_adapters() first"
        )
    if not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter name {adapter_name!r} must be non-empty and contain no '.'")
    return adapter_name


def load_dora_weights(
    pipe,
    pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor],
    *args,
    adapter_name: str | None = None,
    weight_name: str | None = None,
    strict: bool = True,
    **hub_kwargs,
) -> str:
    """Load a DoRA or LoRA adapter (any supported dialect) into ``pipe`` and activate it at strength 1.

    ``pretrained_model_name_or_path_or_dict`` is a .safetensors file, a directory holding one, a Hub repo id,
    or a state dict. Adapters already active stay active (their deltas add up); use ``set_dora_adapters``
    to choose. With ``strict=False`` modules that match nothing are skipped with a warning. A failed load
    leaves ``pipe`` exactly as it was. Returns the adapter name (``default_N`` unless given).
    """
    if args:  # the old order: (source, weight_name, adapter_name, strict)
        given = {"weight_name": weight_name, "adapter_name": adapter_name}
        old = _old_positional("load_dora_weights", args, ("weight_name", "adapter_name", "strict"), given)
        weight_name, adapter_name = old.get("weight_name", weight_name), old.get("adapter_name", adapter_name)
        strict = old.get("strict", strict)
    if adapter_name is not None and not isinstance(adapter_name, str):
        raise ValueError(f"adapter_name must be a string, got {type(adapter_name).__name__} {adapter_name!r}")
    source = pretrained_model_name_or_path_or_dict
    parsed, path = read_adapter(source, weight_name, **hub_kwargs)
    registry = AdapterRegistry.of(pipe)
    adapter_name = _check_new_name(pipe, registry, adapter_name)
    if registry.fused():
        raise RuntimeError("adapters are fused into the weights; call unfuse_dora() before loading another")
    matched, unmatched = formats.match(parsed, registry.linear_conv_names())
    _fit(pipe, registry, matched)
    # the names are the pipeline's and _fit checked the shapes: W0 is read straight from the registry
    matched = formats.apply_base(parsed, matched, lambda modules: _registry_weights(registry, modules))
    if not matched:
        raise AdapterFileError(
            f"no key of this {parsed.dialect} adapter matches a module of {type(pipe).__name__} "
            f"({len(unmatched)} keys, e.g. {', '.join(shown(k) for k in unmatched[:4])}). Is it an adapter for another "
            "base model (SD 1.5, SD 2, Flux) rather than SDXL?"
        )
    if unmatched:
        msg = (
            f"{len(unmatched)} keys of this adapter match no module of {type(pipe).__name__}, "
            f"e.g. {', '.join(shown(k) for k in unmatched[:4])}"
        )
        if strict:
            raise AdapterFileError(f"{msg}. Pass strict=False to load the {sum(map(len, matched.values()))} modules that match.")
        logger.warning("%s; they were skipped (strict=False).", msg)
    identity = _warn_if_loaded(registry, path)
    disabled = registry.disabled()
    emb = find_embeddings(source) if isinstance(source, (str, os.PathLike)) and Path(source).is_dir() else None
    attach_adapter(registry.models, adapter_name, matched, registry.layers)
    try:
        tokens = load_embeddings(pipe, emb) if emb is not None else []  # pivotal tuning: the new tokens' embeddings
    except BaseException:
        for comp, model in registry.models.items():
            remove_adapter(model, adapter_name, registry.layers[comp])
        registry.synced()
        raise
    for layer in registry.all_layers():
        layer.disabled = disabled
    registry.loaded[adapter_name] = LoadedAdapter(adapter_name, path, identity, tokens)
    registry.synced()
    return adapter_name


def _strengths(names: list[str], adapter_weights) -> list[AdapterWeight]:
    """One checked weight per adapter name (a number, or ``{component: number}``)."""
    if adapter_weights is None:
        weights: list[AdapterWeight] = [1.0] * len(names)
    elif isinstance(adapter_weights, (int, float, dict)):
        weights = [adapter_weights] * len(names)
    else:
        weights = list(adapter_weights)
    if len(weights) != len(names):
        raise ValueError(f"got {len(weights)} adapter_weights for {len(names)} adapters")
    for w in weights:
        bad = set(w) - set(COMPONENTS) if isinstance(w, dict) else set()
        if bad:
            raise ValueError(f"unknown components {sorted(bad)} in adapter_weights; use {list(COMPONENTS)}")
        for k in w.values() if isinstance(w, dict) else [w]:
            if isinstance(k, bool) or not isinstance(k, numbers.Real) or not math.isfinite(k):
                raise ValueError(f"adapter strengths must be finite numbers, got {k!r} in adapter_weights")
    return weights


def _known(registry: AdapterRegistry, names: list[str]) -> None:
    known = registry.names()
    missing = [n for n in names if n not in known]
    if missing:
        raise ValueError(f"adapters {missing} are not loaded; loaded adapters: {known}")


def set_dora_adapters(
    pipe, adapter_names: str | list[str], adapter_weights: AdapterWeight | list[AdapterWeight] | None = None
) -> None:
    """Run exactly these adapters with these strengths (default 1.0); others are switched off.

    A strength k gives ``W0 + k (W' - W0)``: 0 is the base model, 1 the trained adapter. A weight may be a
    dict ``{"unet": 1.0, "text_encoder": 0.5, ...}`` to set components apart (missing ones: 1.0).
    """
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    registry = AdapterRegistry.of(pipe)
    _known(registry, names)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"adapters {repeated} are named more than once; give each adapter one strength")
    weights = _strengths(names, adapter_weights)
    _refuse_if_fused(registry, "set_dora_adapters")
    for comp, layers in registry.layers.items():
        per = {n: float(w.get(comp, 1.0) if isinstance(w, dict) else w) for n, w in zip(names, weights)}
        for layer in layers.values():
            layer.set_active(per)


def _refuse_if_fused(registry: AdapterRegistry, what: str) -> None:
    if registry.fused():
        raise RuntimeError(f"adapters are fused into the weights; call unfuse_dora() before {what}()")


def disable_dora(pipe) -> None:
    """Run the base model exactly, keeping the adapters loaded."""
    registry = AdapterRegistry.of(pipe)
    _refuse_if_fused(registry, "disable_dora")
    for layer in registry.all_layers():
        layer.disabled = True


def enable_dora(pipe) -> None:
    """Undo ``disable_dora``."""
    for layer in AdapterRegistry.of(pipe).all_layers():
        layer.disabled = False


def _components(registry: AdapterRegistry, components: list[str] | None) -> list[str]:
    if components is None:
        return list(registry.layers)
    bad = sorted(set(components) - set(COMPONENTS))
    if bad:
        raise ValueError(f"unknown components {bad}; use {list(COMPONENTS)}")
    return [c for c in registry.layers if c in components]


def fuse_dora(
    pipe,
    *args,
    components: list[str] | None = None,
    lora_scale: float = 1.0,
    adapter_names: list[str] | None = None,
) -> None:
    """Write ``W0 + sum_j k_j (W'_j - W0)`` into the base weights; inference then costs nothing extra.

    ``k_j`` is the strength set by ``set_dora_adapters`` times ``lora_scale``; by default the active adapters are
    fused, in every adapted component (``components`` names some: ``["unet"]``, say). ``unfuse_dora`` restores the
    original weights bit for bit.
    """
    if args:  # the old order: (adapter_names, lora_scale)
        given = {"adapter_names": adapter_names, "lora_scale": None if lora_scale == 1.0 else lora_scale}
        old = _old_positional("fuse_dora", args, ("adapter_names", "lora_scale"), given)
        adapter_names, lora_scale = old.get("adapter_names", adapter_names), old.get("lora_scale", lora_scale)
    registry = AdapterRegistry.of(pipe)
    if adapter_names is not None:
        _known(registry, list(adapter_names))
    if isinstance(lora_scale, bool) or not isinstance(lora_scale, numbers.Real) or not math.isfinite(lora_scale):
        raise ValueError(f"lora_scale must be a finite number, got {lora_scale!r}")
    chosen = _components(registry, components)
    _refuse_if_fused(registry, "fuse_dora")
    if registry.disabled():
        raise RuntimeError("adapters are disabled (disable_dora()); call enable_dora() before fuse_dora()")
    try:
        for comp in chosen:
            for layer in registry.layers[comp].values():
                names = list(layer.active) if adapter_names is None else adapter_names
                layer.fuse({n: layer.active.get(n, 1.0) * lora_scale for n in names if n in layer.adapters})
    except BaseException:
        unfuse_dora(pipe)
        raise


def unfuse_dora(pipe, components: list[str] | None = None) -> None:
    """Restore the base weights saved by ``fuse_dora`` (in ``components`` only, if named)."""
    registry = AdapterRegistry.of(pipe)
    for comp in _components(registry, components):
        for layer in registry.layers[comp].values():
            layer.unfuse()


def delete_dora_adapters(pipe, adapter_names: str | list[str]) -> None:
    """Remove adapters from ``pipe``; modules left with none get their original object back."""
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    registry = AdapterRegistry.of(pipe)
    _known(registry, names)
    _refuse_if_fused(registry, "delete_dora_adapters")
    for comp, model in registry.models.items():
        for name in names:
            remove_adapter(model, name, registry.layers[comp])
    for name in names:
        tokens = registry.loaded.pop(name).tokens
        if tokens:
            unload_embeddings(pipe, tokens)
    registry.synced()


def unload_dora_weights(pipe) -> None:
    """Unfuse and remove every adapter, putting the original modules back (and the tokens of their embeddings)."""
    registry = AdapterRegistry.of(pipe)
    for comp, model in registry.models.items():
        remove_all(model, registry.layers[comp])
    for name in list(registry.loaded):
        tokens = registry.loaded.pop(name).tokens
        if tokens:
            unload_embeddings(pipe, tokens)
    registry.synced()


def base_weights(pipe, modules: dict[str, dict[str, ModuleAdapter]]) -> dict[str, dict[str, torch.Tensor]]:
    """The base weights ``W0`` of ``pipe`` for these modules (names as in the pipeline or in SDXL base's layout).

    Adapters loaded into ``pipe`` do not change them (they are not fused: fused pipelines are refused). Raises
    ``AdapterFileError`` naming a module ``pipe`` lacks or whose shape does not fit.
    """
    registry = AdapterRegistry.of(pipe)
    _refuse_if_fused(registry, "base_weights")
    resolve = formats.resolver_for("diffusers")  # exact names, with or without CLIP's `text_model.` wrapper
    out: dict[str, dict[str, torch.Tensor]] = {}
    for comp, mods in modules.items():
        found = registry.modules.get(comp, {})
        mapping = resolve(comp, list(mods), set(found))
        for name, ma in mods.items():
            if name not in mapping:
                raise AdapterFileError(
                    f"{type(pipe).__name__} has no module {comp}.{name}; is it the base model this adapter was made for?"
                )
            module = found[mapping[name]]
            check_fits(f"{type(pipe).__name__}.{comp}.{mapping[name]}", module, ma)
            out.setdefault(comp, {})[name] = module.weight.detach()
    return out


def save_dora_weights(
    pipe,
    save_directory: str | os.PathLike,
    *args,
    adapter_name: str | None = None,
    weight_name: str | None = None,
    format: str = "diffusers",
    is_main_process: bool = True,
) -> Path | None:
    """Save one loaded adapter (default: the only one) as ``pytorch_lora_weights.safetensors``.

    ``format="diffusers"`` is also readable by diffusers' ``load_lora_weights``; ``format="kohya"`` is exact in
    LyCORIS; ``format="comfyui"`` is a kohya file exact in ComfyUI and Forge at every strength, whose
    ``dora_scale`` is computed against this pipeline's base weights (``m ||W0|| / ||W0 + s B A||``; see
    docs/formats.md). The file is written atomically. Returns its path.
    """
    if args:  # the old order: (save_directory, adapter_name, weight_name, format, is_main_process)
        given = {"adapter_name": adapter_name, "weight_name": weight_name}
        old = _old_positional(
            "save_dora_weights", args, ("adapter_name", "weight_name", "format", "is_main_process"), given
        )
        adapter_name, weight_name = old.get("adapter_name", adapter_name), old.get("weight_name", weight_name)
        format, is_main_process = old.get("format", format), old.get("is_main_process", is_main_process)
    registry = AdapterRegistry.of(pipe)
    known = registry.names()
    if adapter_name is None:
        if len(known) != 1:
            raise ValueError(f"pass adapter_name=; loaded adapters: {known}")
        adapter_name = known[0]
    elif adapter_name not in known:
        raise ValueError(f"adapter {adapter_name!r} is not loaded; loaded adapters: {known}")
    if not is_main_process:
        return None
    return save_adapter(registry.models, save_directory, adapter_name, weight_name, format, layers=registry.layers)
