"""Pipeline-level adapter API, named after diffusers' LoRA methods.

Each function takes the pipeline first; ``import dora_diffusion`` also installs them as methods of every
diffusers pipeline (``pipe.load_dora_weights(...)``). A pipeline needs a ``unet``; ``text_encoder`` and
``text_encoder_2`` are adapted when present.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from dora_diffusion.adapter_io import attach_adapter, check_fits, save_adapter
from dora_diffusion.formats import (
    COMPONENTS,
    AdapterFileError,
    ModuleAdapter,
    ParsedAdapter,
    parse_state_dict,
    read_safetensors,
    resolve_file,
    resolver_for,
    shown,
)
from dora_diffusion.formats.comfyui import from_comfyui_modules
from dora_diffusion.core.inject import (
    adapted_layers,
    base_modules,
    linear_conv_names,
    ordered_adapter_names,
    remove_adapter,
    remove_all,
)
from dora_diffusion.pipeline.embeddings import find_embeddings, load_embeddings, unload_embeddings
from dora_diffusion.core.layers import AdaptedLayer

logger = logging.getLogger(__name__)

AdapterWeight = float | dict[str, float]


def adaptable_models(pipe) -> dict[str, nn.Module]:
    """The adaptable models of ``pipe`` by component name (``unet``, ``text_encoder``, ``text_encoder_2``)."""
    found = {c: getattr(pipe, c, None) for c in COMPONENTS}
    found = {c: m for c, m in found.items() if isinstance(m, nn.Module)}
    if "unet" not in found:
        raise TypeError(f"{type(pipe).__name__} has no `unet`; DoRA adapters need an SDXL-style pipeline")
    return found


def _layers(pipe) -> list[AdaptedLayer]:
    return [layer for model in adaptable_models(pipe).values() for layer in adapted_layers(model).values()]


def get_dora_adapters(pipe) -> list[str]:
    """Names of the adapters loaded into ``pipe``, in load order."""
    return ordered_adapter_names(_layers(pipe))


def get_active_dora_adapters(pipe) -> dict[str, float]:
    """``{adapter: strength}`` of the adapters that currently run (UNet strengths)."""
    active: dict[str, float] = {}
    for comp, model in adaptable_models(pipe).items():
        for layer in adapted_layers(model).values():
            for name, k in layer.active.items():
                if comp == "unet" or name not in active:
                    active[name] = k
    return active


def _match_modules(pipe, parsed: ParsedAdapter) -> tuple[dict[str, dict[str, ModuleAdapter]], list[str]]:
    """Map every file module to a module of ``pipe``; return ``{component: {module name: ModuleAdapter}}`` and the
    keys that matched nothing."""
    models = adaptable_models(pipe)
    resolve = resolver_for(parsed.dialect)
    matched: dict[str, dict[str, ModuleAdapter]] = {}
    unmatched: list[str] = []
    for comp, mods in parsed.modules.items():
        model = models.get(comp)
        if model is None:
            unmatched += [k for f in mods for k in parsed.source_keys.get((comp, f), [f"{comp}.{f}"])]
            continue
        modules = base_modules(model)
        mapping = resolve(comp, list(mods), set(linear_conv_names(model)))
        for fname, ma in mods.items():
            if fname not in mapping:
                unmatched += parsed.source_keys.get((comp, fname), [f"{comp}.{fname}"])
                continue
            name = mapping[fname]
            check_fits(f"{type(pipe).__name__}.{comp}.{name}", modules[name], ma)
            matched.setdefault(comp, {})[name] = ma
    return matched, unmatched


def _new_adapter_name(pipe) -> str:
    taken = set(get_dora_adapters(pipe))
    i = 0
    while f"default_{i}" in taken:
        i += 1
    return f"default_{i}"


def _read(source, weight_name: str | None, **hub_kwargs) -> tuple[ParsedAdapter, Path | None]:
    """The parsed adapter and the file it came from (None for a state dict)."""
    if isinstance(source, dict):
        return parse_state_dict(dict(source), {}), None
    path = resolve_file(source, weight_name, **hub_kwargs)
    state_dict, metadata = read_safetensors(path)
    try:
        return parse_state_dict(state_dict, metadata), Path(path)
    except AdapterFileError as err:
        raise AdapterFileError(f"{path}: {err}") from None


def _file_identity(path: Path) -> tuple:
    """What makes two paths the same file with the same content: device, inode, size, modification time."""
    st = path.stat()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _sources(pipe) -> dict[str, tuple]:
    """Adapter name -> identity of the file it was loaded from (adapters loaded from a file only)."""
    if not hasattr(pipe, "_dora_sources"):
        pipe._dora_sources = {}
    return pipe._dora_sources


def _warn_if_loaded(pipe, path: Path | None) -> tuple | None:
    """Warn, naming the adapter, if the file at ``path`` is already loaded; return its identity."""
    if path is None:
        return None
    identity = _file_identity(path)
    loaded = get_dora_adapters(pipe)
    first = next((n for n, i in _sources(pipe).items() if i == identity and n in loaded), None)
    if first is not None:
        warnings.warn(
            f"{path} is already loaded as adapter {first!r}; loading it again runs it twice (their changes add up). "
            f"For a stronger effect use set_dora_adapters({first!r}, 2.0); to reload it, delete_dora_adapters({first!r}) first",
            UserWarning,
            stacklevel=3,
        )
    return identity


def load_dora_weights(
    pipe,
    pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor],
    weight_name: str | None = None,
    adapter_name: str | None = None,
    strict: bool = True,
    **hub_kwargs,
) -> str:
    """Load a DoRA or LoRA adapter (any supported dialect) into ``pipe`` and activate it at strength 1.

    ``pretrained_model_name_or_path_or_dict`` is a .safetensors file, a directory holding one, a Hub repo id,
    or a state dict. Adapters already active stay active (their deltas add up); use ``set_dora_adapters``
    to choose. With ``strict=False`` modules that match nothing are skipped with a warning. A failed load
    leaves ``pipe`` exactly as it was. Returns the adapter name (``default_N`` unless given).
    """
    if adapter_name is not None and not isinstance(adapter_name, str):
        raise ValueError(f"adapter_name must be a string, got {type(adapter_name).__name__} {adapter_name!r}")
    parsed, path = _read(pretrained_model_name_or_path_or_dict, weight_name, **hub_kwargs)
    if adapter_name is None:
        adapter_name = _new_adapter_name(pipe)
    elif adapter_name in get_dora_adapters(pipe):
        raise ValueError(
            f"adapter name {adapter_name!r} is already in use in {type(pipe).__name__}; "
            "pick another or call delete_dora_adapters() first"
        )
    if not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter name {adapter_name!r} must be non-empty and contain no '.'")
    if any(layer.fused for layer in _layers(pipe)):
        raise RuntimeError("adapters are fused into the weights; call unfuse_dora() before loading another")
    matched, unmatched = _match_modules(pipe, parsed)
    if parsed.comfyui_dora_scale:  # dora_scale = m (||W0|| + eps) / ||W0 + sBA||: m needs this pipeline's W0
        matched = from_comfyui_modules(matched, base_weights(pipe, matched))
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
    identity = _warn_if_loaded(pipe, path)
    models = adaptable_models(pipe)
    disabled = any(layer.disabled for layer in _layers(pipe))
    source = pretrained_model_name_or_path_or_dict
    emb = find_embeddings(source) if isinstance(source, (str, os.PathLike)) and Path(source).is_dir() else None
    attach_adapter(models, adapter_name, matched)
    try:
        if emb is not None:  # pivotal tuning: the new tokens' embeddings beside the adapter
            _embeddings(pipe)[adapter_name] = load_embeddings(pipe, emb)
    except BaseException:
        for model in models.values():
            remove_adapter(model, adapter_name)
        raise
    for layer in _layers(pipe):
        layer.disabled = disabled
    if identity is not None:
        _sources(pipe)[adapter_name] = identity
    return adapter_name


def _embeddings(pipe) -> dict[str, list[str]]:
    """Adapter name -> the tokens its embeddings file added (pivotal tuning)."""
    if not hasattr(pipe, "_dora_embeddings"):
        pipe._dora_embeddings = {}
    return pipe._dora_embeddings


def set_dora_adapters(
    pipe, adapter_names: str | list[str], adapter_weights: AdapterWeight | list[AdapterWeight] | None = None
) -> None:
    """Run exactly these adapters with these strengths (default 1.0); others are switched off.

    A strength k gives ``W0 + k (W' - W0)``: 0 is the base model, 1 the trained adapter. A weight may be a
    dict ``{"unet": 1.0, "text_encoder": 0.5, ...}`` to set components apart (missing ones: 1.0).
    """
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    known = get_dora_adapters(pipe)
    missing = [n for n in names if n not in known]
    if missing:
        raise ValueError(f"adapters {missing} are not loaded; loaded adapters: {known}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"adapters {repeated} are named more than once; give each adapter one strength")
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
    _refuse_if_fused(pipe, "set_dora_adapters")
    for comp, model in adaptable_models(pipe).items():
        per = {n: float(w.get(comp, 1.0) if isinstance(w, dict) else w) for n, w in zip(names, weights)}
        for layer in adapted_layers(model).values():
            layer.set_active(per)


def _refuse_if_fused(pipe, what: str) -> None:
    if any(layer.fused for layer in _layers(pipe)):
        raise RuntimeError(f"adapters are fused into the weights; call unfuse_dora() before {what}()")


def disable_dora(pipe) -> None:
    """Run the base model exactly, keeping the adapters loaded."""
    _refuse_if_fused(pipe, "disable_dora")
    for layer in _layers(pipe):
        layer.disabled = True


def enable_dora(pipe) -> None:
    """Undo ``disable_dora``."""
    for layer in _layers(pipe):
        layer.disabled = False


def fuse_dora(pipe, adapter_names: list[str] | None = None, lora_scale: float = 1.0) -> None:
    """Write ``W0 + sum_j k_j (W'_j - W0)`` into the base weights; inference then costs nothing extra.

    ``k_j`` is the strength set by ``set_dora_adapters`` times ``lora_scale``; by default the active
    adapters are fused. ``unfuse_dora`` restores the original weights bit for bit.
    """
    if adapter_names is not None:
        known = get_dora_adapters(pipe)
        missing = [n for n in adapter_names if n not in known]
        if missing:
            raise ValueError(f"adapters {missing} are not loaded; loaded adapters: {known}")
    if isinstance(lora_scale, bool) or not isinstance(lora_scale, numbers.Real) or not math.isfinite(lora_scale):
        raise ValueError(f"lora_scale must be a finite number, got {lora_scale!r}")
    _refuse_if_fused(pipe, "fuse_dora")
    if any(layer.disabled for layer in _layers(pipe)):
        raise RuntimeError("adapters are disabled (disable_dora()); call enable_dora() before fuse_dora()")
    try:
        for layer in _layers(pipe):
            names = list(layer.active) if adapter_names is None else adapter_names
            layer.fuse({n: layer.active.get(n, 1.0) * lora_scale for n in names if n in layer.adapters})
    except BaseException:
        unfuse_dora(pipe)
        raise


def unfuse_dora(pipe) -> None:
    """Restore the base weights saved by ``fuse_dora``."""
    for layer in _layers(pipe):
        layer.unfuse()


def delete_dora_adapters(pipe, adapter_names: str | list[str]) -> None:
    """Remove adapters from ``pipe``; modules left with none get their original object back."""
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    known = get_dora_adapters(pipe)
    missing = [n for n in names if n not in known]
    if missing:
        raise ValueError(f"adapters {missing} are not loaded; loaded adapters: {known}")
    _refuse_if_fused(pipe, "delete_dora_adapters")
    for model in adaptable_models(pipe).values():
        for name in names:
            remove_adapter(model, name)
    for name in names:
        _sources(pipe).pop(name, None)
        if name in _embeddings(pipe):
            unload_embeddings(pipe, _embeddings(pipe).pop(name))


def unload_dora_weights(pipe) -> None:
    """Unfuse and remove every adapter, putting the original modules back (and the tokens of their embeddings)."""
    for model in adaptable_models(pipe).values():
        remove_all(model)
    _sources(pipe).clear()
    for name in list(_embeddings(pipe)):
        unload_embeddings(pipe, _embeddings(pipe).pop(name))


def base_weights(pipe, modules: dict[str, dict[str, ModuleAdapter]]) -> dict[str, dict[str, torch.Tensor]]:
    """The base weights ``W0`` of ``pipe`` for these modules (names as in the pipeline or in SDXL base's layout).

    Adapters loaded into ``pipe`` do not change them (they are not fused: fused pipelines are refused). Raises
    ``AdapterFileError`` naming a module ``pipe`` lacks or whose shape does not fit.
    """
    _refuse_if_fused(pipe, "base_weights")
    models = adaptable_models(pipe)
    resolve = resolver_for("diffusers")  # exact names, with or without CLIP's `text_model.` wrapper
    out: dict[str, dict[str, torch.Tensor]] = {}
    for comp, mods in modules.items():
        found = base_modules(models[comp]) if comp in models else {}
        mapping = resolve(comp, list(mods), set(found))
        for name, ma in mods.items():
            if name not in mapping:
                raise AdapterFileError(
                    f"{type(pipe).__name__} has no module {comp}.{name}; "
                    "is it the base model this adapter was made for?"
                )
            module = found[mapping[name]]
            check_fits(f"{type(pipe).__name__}.{comp}.{mapping[name]}", module, ma)
            out.setdefault(comp, {})[name] = module.weight.detach()
    return out


def save_dora_weights(
    pipe,
    save_directory: str | os.PathLike,
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
    known = get_dora_adapters(pipe)
    if adapter_name is None:
        if len(known) != 1:
            raise ValueError(f"pass adapter_name=; loaded adapters: {known}")
        adapter_name = known[0]
    elif adapter_name not in known:
        raise ValueError(f"adapter {adapter_name!r} is not loaded; loaded adapters: {known}")
    if not is_main_process:
        return None
    return save_adapter(adaptable_models(pipe), save_directory, adapter_name, weight_name, format)


PIPELINE_METHODS = (
    load_dora_weights,
    set_dora_adapters,
    disable_dora,
    enable_dora,
    fuse_dora,
    unfuse_dora,
    unload_dora_weights,
    delete_dora_adapters,
    get_dora_adapters,
    get_active_dora_adapters,
    save_dora_weights,
)


def install_pipeline_methods() -> None:
    """Add the functions above as methods of ``diffusers.DiffusionPipeline`` (idempotent)."""
    from diffusers import DiffusionPipeline

    for fn in PIPELINE_METHODS:
        setattr(DiffusionPipeline, fn.__name__, fn)
