"""Put adapter layers into a UNet or CLIP text encoder, and take them out again.

Targets are a preset name, a list of module names (a name matches a module whose full name equals it
or ends with ``"." + name``), or a regular expression that must match a full module name.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

from dora_diffusion.core.config import AdapterConfig
from dora_diffusion.core.layers import AdaptedLayer, AdapterSpec, wrap

UNET_PRESETS: dict[str, list[str]] = {
    "attn": ["to_q", "to_k", "to_v", "to_out.0"],
}
UNET_PRESETS["attn_ff"] = UNET_PRESETS["attn"] + ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
UNET_PRESETS["all"] = UNET_PRESETS["attn_ff"] + [
    "conv1",
    "conv2",
    "conv_shortcut",
    "time_emb_proj",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
]
TEXT_ENCODER_PRESETS: dict[str, list[str]] = {
    "attn": ["q_proj", "k_proj", "v_proj", "out_proj"],
}
TEXT_ENCODER_PRESETS["all"] = TEXT_ENCODER_PRESETS["attn"] + ["fc1", "fc2"]

RECOMPUTE_SUFFIXES: tuple[str, ...] = (
    "to_out.0", "proj_out", "ff.net.2", "out_proj", "fc2", "conv2", "conv_shortcut", "upsamplers.0.conv"
)
"""Layers whose output in diffusers/transformers only feeds a residual add (or, for ``upsamplers.0.conv``, a
concatenation), which keeps nothing for its backward. Every other layer's output is kept by the next op
anyway (attention keeps q/k/v, GEGLU and GELU keep their input, LayerNorm keeps ``proj_in``'s output,
GroupNorm keeps ``conv1``'s, and a downsampler's output is a skip connection)."""

RecomputeMode = Literal["none", "cheap", "all"]


def _recomputes(name: str, layer: AdaptedLayer, mode: RecomputeMode) -> bool:
    unshared = any(name == s or name.endswith("." + s) for s in RECOMPUTE_SUFFIXES)
    return unshared and (mode == "all" or (mode == "cheap" and layer.in_features <= layer.out_features))


def set_recompute(model: nn.Module, mode: RecomputeMode = "cheap") -> None:
    """Choose what the DoRA training step on each adapted layer keeps for ``dL/dm``.

    ``dL/dm`` needs ``sum_N dL/dy * (W0 x + s B h)``. Keeping the output ``y`` costs an ``N x d_out``
    activation unless the next op keeps it anyway; recomputing ``W0 x`` from the input (kept anyway for
    ``dL/dA``) costs one more base matmul (or conv) in the backward and no kept activation. Only the layers
    in ``RECOMPUTE_SUFFIXES`` are candidates.

    - ``none``: keep ``y`` everywhere (fastest; right with gradient checkpointing, where activations
      live for one block only).
    - ``cheap`` (default): recompute where ``d_in <= d_out`` (SDXL: ``to_out.0``, ``proj_out``, ``conv2``,
      the up-samplers' conv and the down blocks' ``conv_shortcut``), where the kept ``y`` would be at least
      as large as the input.
    - ``all``: recompute on every candidate (also ``ff.net.2``, ``fc2``): least memory.
    """
    if mode not in ("none", "cheap", "all"):
        raise ValueError(f"recompute mode must be 'none', 'cheap' or 'all', got {mode!r}")
    for name, layer in adapted_layers(model).items():
        layer.recompute_output = _recomputes(name, layer, mode)


_GENERATION: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()


def generation(model: nn.Module) -> int:
    """How many times adapters were added to or removed from ``model`` through this module: a registry that knows
    the count it saw knows, without walking the model, whether its list of wrappers is still true."""
    return _GENERATION.get(model, 0)


def _changed(model: nn.Module) -> None:
    _GENERATION[model] = generation(model) + 1


def is_text_encoder(model: nn.Module) -> bool:
    """True for the CLIP text encoders (presets use their module names)."""
    return type(model).__name__.startswith("CLIPText")


def presets_for(model: nn.Module) -> dict[str, list[str]]:
    """The preset table that applies to ``model``."""
    return TEXT_ENCODER_PRESETS if is_text_encoder(model) else UNET_PRESETS


def walk(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, AdaptedLayer]]:
    """One walk of ``model``: every module by full name seen through adapter wrappers (a wrapper stands for its
    base), and the wrappers by the name of the module each wraps."""
    out: dict[str, nn.Module] = {}
    layers: dict[str, AdaptedLayer] = {}
    inside: set[str] = set()
    for name, module in model.named_modules():
        parent = name.rpartition(".")[0]
        if name and parent in inside:
            inside.add(name)  # inside a wrapper: skip it, and so its children too
            continue
        if isinstance(module, AdaptedLayer):
            out[name] = module.base_layer
            layers[name] = module
            inside.add(name)
        else:
            out[name] = module
    return out, layers


def base_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module of ``model`` by full name, seen through adapter wrappers (a wrapper stands for its base)."""
    return walk(model)[0]


def linear_conv_names(model: nn.Module | dict[str, nn.Module]) -> list[str]:
    """Names of the Linear and Conv2d modules of ``model`` (base modules, seen through adapter wrappers; or a
    ``base_modules`` dict already made)."""
    modules = model if isinstance(model, dict) else base_modules(model)
    return [n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv2d))]


def find_targets(model: nn.Module, targets: str | Iterable[str]) -> list[str]:
    """Full names of the Linear/Conv2d modules of ``model`` selected by ``targets``.

    Raises ``ValueError`` if nothing matches, or if an explicit name matches a module that is neither
    ``nn.Linear`` nor ``nn.Conv2d``.
    """
    presets = presets_for(model)
    modules = base_modules(model)
    if isinstance(targets, str) and targets in presets:
        suffixes, explicit = presets[targets], False
    elif isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as err:
            raise ValueError(f"targets {targets!r} is neither a preset {sorted(presets)} nor a valid regex: {err}")
        names = [n for n, m in modules.items() if n and pattern.fullmatch(n) and isinstance(m, (nn.Linear, nn.Conv2d))]
        if not names:
            raise ValueError(
                f"regex {targets!r} matches no nn.Linear/nn.Conv2d module of {type(model).__name__}; "
                f"presets are {sorted(presets)}"
            )
        return names
    else:
        suffixes, explicit = list(targets), True
    names = []
    for name, module in modules.items():
        if not any(name == s or name.endswith("." + s) for s in suffixes):
            continue
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            names.append(name)
        elif explicit:
            raise ValueError(f"target {name!r} is a {type(module).__name__}; only nn.Linear and nn.Conv2d can be adapted")
    if not names:
        raise ValueError(f"targets {targets!r} match no module of {type(model).__name__}; presets are {sorted(presets)}")
    return names


def uncompiled(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (its ``OptimizedModule`` names every parameter ``_orig_mod.*``), or
    ``model`` itself when it is not compiled."""
    inner = getattr(model, "_orig_mod", None)
    return uncompiled(inner) if isinstance(inner, nn.Module) else model


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLayer]:
    """Every adapter wrapper in ``model``, by the full name of the module it wraps."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLayer)}


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def add_adapter_to_modules(
    model: nn.Module,
    adapter_name: str,
    specs: dict[str, AdapterSpec],
    dropout: float = 0.0,
    dtype: torch.dtype = torch.float32,
    init: bool = True,
    layers: dict[str, AdaptedLayer] | None = None,
) -> list[AdaptedLayer]:
    """Add ``adapter_name`` with one ``AdapterSpec`` per module name; wraps modules as needed.

    ``init=False`` leaves the tensors unset, for a caller that fills them (loading a file). ``layers``: the
    model's wrappers by name, if the caller keeps them (``adapted_layers``); they are kept in step, and the
    model is not walked. All-or-nothing: on any error the adapter is removed again and new wrappers are undone.
    """
    layers = adapted_layers(model) if layers is None else layers
    if adapter_name in ordered_adapter_names(layers.values()):
        raise ValueError(f"adapter {adapter_name!r} already exists in {type(model).__name__}")
    done: list[AdaptedLayer] = []
    _changed(model)
    try:
        for name, spec in specs.items():
            module = layers[name] if name in layers else model.get_submodule(name)
            if not isinstance(module, AdaptedLayer):
                module = wrap(module)
                module.recompute_output = _recomputes(name, module, "cheap")
                _set_submodule(model, name, module)
                layers[name] = module
            module.new_adapter(adapter_name, spec, dropout, dtype, init)
            done.append(module)
    except BaseException:
        remove_adapter(model, adapter_name, layers)
        raise
    return done


def add_adapter(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> list[str]:
    """Add a fresh (untrained) adapter to the modules of ``model`` selected by ``config.targets``.

    Like PEFT's injection, every parameter of ``model`` that is not an adapter parameter is frozen
    (``requires_grad=False``). Returns the adapted module names. The model's output is unchanged until
    the adapter is trained.
    """
    names = find_targets(model, config.targets)
    specs = {
        n: AdapterSpec(config.rank_for(n), config.alpha_for(n), config.use_dora, config.norm_axis, config.use_rslora)
        for n in names
    }
    add_adapter_to_modules(model, adapter_name, specs, dropout=config.dropout)
    adapter_params = {id(p) for layer in adapted_layers(model).values() for p in _adapter_params(layer)}
    for p in model.parameters():
        if id(p) not in adapter_params:
            p.requires_grad_(False)
    return names


def ordered_adapter_names(layers: Iterable[AdaptedLayer]) -> list[str]:
    """Names of the adapters on ``layers``, in the order they were first added."""
    first: dict[str, int] = {}
    for layer in layers:
        for name, adapter in layer.adapters.items():
            first[name] = min(adapter.order, first.get(name, adapter.order))
    return sorted(first, key=first.__getitem__)


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters present anywhere in ``model``, in the order they were added."""
    return ordered_adapter_names(adapted_layers(model).values())


def remove_adapter(model: nn.Module, adapter_name: str, layers: dict[str, AdaptedLayer] | None = None) -> None:
    """Delete one adapter; layers left with no adapter are replaced by their original module. ``layers`` as in
    ``add_adapter_to_modules``: kept in step when given."""
    layers = adapted_layers(model) if layers is None else layers
    _changed(model)
    for name, layer in list(layers.items()):
        if adapter_name in layer.adapters:
            layer.delete_adapter(adapter_name)
        if not layer.adapters:
            _set_submodule(model, name, layer.base_layer)
            del layers[name]


def remove_all(model: nn.Module, layers: dict[str, AdaptedLayer] | None = None) -> None:
    """Unfuse and delete every adapter, restoring the original module objects. ``layers`` as in
    ``add_adapter_to_modules``: emptied when given."""
    layers = adapted_layers(model) if layers is None else layers
    _changed(model)
    for name, layer in list(layers.items()):
        layer.unfuse()
        _set_submodule(model, name, layer.base_layer)
        del layers[name]


def _adapter_params(layer: AdaptedLayer) -> list[nn.Parameter]:
    return [p for adapter in layer.adapters.values() for p in adapter.parameters()]


def trainable_parameters(model: nn.Module, adapter_name: str) -> list[nn.Parameter]:
    """The A, B and magnitude parameters of ``adapter_name`` (what an optimizer should see)."""
    params = []
    for layer in adapted_layers(model).values():
        if adapter_name in layer.adapters:
            params += layer.adapters[adapter_name].parameters()
    return params
