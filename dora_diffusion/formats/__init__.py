"""File dialects: the only place that knows them.

``read_file`` reads any dialect into one in-memory form (``ParsedAdapter``: ``ModuleAdapter`` tensors per component
and module); ``match`` maps its module names onto a model's; ``apply_base`` finishes a file whose magnitudes need
the base weights (ComfyUI's rule); ``write`` writes the in-memory form in a dialect. Detection is from keys and
shapes, never from the file name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from dora_diffusion.formats.base import COMPONENTS, ModuleAdapter, ParsedAdapter, build_module
from dora_diffusion.formats.diffusers import is_diffusers_key, parse_diffusers, to_diffusers
from dora_diffusion.formats.safefile import (
    DEFAULT_WEIGHT_NAME,
    AdapterFileError,
    check_tensors,
    read_metadata,
    read_safetensors,
    shown,
    write_safetensors,
)
from dora_diffusion.formats.triggers import trigger_words

__all__ = [
    "COMPONENTS",
    "DEFAULT_WEIGHT_NAME",
    "AdapterFileError",
    "ModuleAdapter",
    "ParsedAdapter",
    "build_module",
    "check_tensors",
    "detect_dialect",
    "parse_state_dict",
    "WRITE_FORMATS",
    "apply_base",
    "match",
    "needs_base",
    "read_file",
    "read_metadata",
    "read_safetensors",
    "trigger_words",
    "write",
    "resolver_for",
    "shown",
    "to_diffusers",
    "write_safetensors",
]

from dora_diffusion.formats.comfyui import is_comfyui_rule  # noqa: E402
from dora_diffusion.formats.kohya import PREFIXES as _KOHYA_PREFIX_MAP  # noqa: E402

_KOHYA_PREFIXES = tuple(_KOHYA_PREFIX_MAP)


def detect_dialect(state_dict: dict[str, torch.Tensor]) -> str:
    """``"diffusers"`` or ``"kohya"``, from the keys; raises if they fit neither."""
    keys = list(state_dict)
    if keys and all(k.startswith(_KOHYA_PREFIXES) for k in keys):
        return "kohya"
    if any(is_diffusers_key(k) for k in keys):
        return "diffusers"
    raise AdapterFileError(
        f"unrecognised adapter keys, e.g. {', '.join(shown(k) for k in keys[:3])}: neither diffusers/PEFT ('unet.….lora_A.weight') nor "
        "kohya/LyCORIS ('lora_unet_….lora_down.weight')"
    )


def parse_state_dict(state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> ParsedAdapter:
    """Validate the tensors and read them in whichever dialect they are written.

    A kohya file marked as written for ComfyUI's ``dora_scale`` rule comes back with ``comfyui_dora_scale`` set:
    its magnitudes are ``m`` only after ``formats.comfyui.from_comfyui_modules`` with the base weights.
    """
    check_tensors(state_dict)
    dialect = detect_dialect(state_dict)
    comfyui = is_comfyui_rule(metadata or {}, dialect)
    if dialect == "kohya":
        from dora_diffusion.formats.kohya import parse_kohya

        parsed = parse_kohya(state_dict, metadata or {})
    else:
        parsed = parse_diffusers(state_dict, metadata or {})
    parsed.comfyui_dora_scale = comfyui
    return parsed


def _resolve_diffusers(component: str, file_names: list[str], model_names: set[str]) -> dict[str, str]:
    """Exact names, tolerating the ``text_model.`` wrapper that transformers 5 removed from CLIPTextModel.

    Two file modules naming the same model module (``X`` and ``text_model.X``) are an error naming both.
    """
    out: dict[str, str] = {}
    owner: dict[str, str] = {}
    for name in file_names:
        for candidate in (name, name.removeprefix("text_model."), "text_model." + name):
            if candidate in model_names:
                if candidate in owner:
                    raise AdapterFileError(
                        f"adapter modules {component}.{owner[candidate]} and {component}.{name} both name "
                        f"{component}.{candidate}; the file is ambiguous"
                    )
                owner[candidate] = name
                out[name] = candidate
                break
    return out


def resolver_for(dialect: str) -> Callable[[str, list[str], set[str]], dict[str, str]]:
    """``resolve(component, file module names, model module names) -> {file name: model name}``."""
    if dialect == "kohya":
        from dora_diffusion.formats.kohya import resolve_kohya

        return resolve_kohya
    return _resolve_diffusers


def read_file(path: str | Path) -> ParsedAdapter:
    """Read the safetensors adapter file at ``path`` in whichever dialect it is written; errors name the file."""
    state_dict, metadata = read_safetensors(path)
    try:
        return parse_state_dict(state_dict, metadata)
    except AdapterFileError as err:
        raise AdapterFileError(f"{path}: {err}") from None


def match(
    parsed: ParsedAdapter, model_names: Mapping[str, Iterable[str]]
) -> tuple[dict[str, dict[str, ModuleAdapter]], list[str]]:
    """Map every module of ``parsed`` onto a module of the models: ``model_names`` is ``{component: names of its
    Linear and Conv2d modules}``. Returns ``{component: {model module name: ModuleAdapter}}`` and the file keys
    that match nothing (a component the models lack included)."""
    resolve = resolver_for(parsed.dialect)
    matched: dict[str, dict[str, ModuleAdapter]] = {}
    unmatched: list[str] = []
    for comp, mods in parsed.modules.items():
        names = model_names.get(comp)
        mapping = {} if names is None else resolve(comp, list(mods), set(names))
        for fname, ma in mods.items():
            if fname in mapping:
                matched.setdefault(comp, {})[mapping[fname]] = ma
            else:
                unmatched += parsed.source_keys.get((comp, fname), [f"{comp}.{fname}"])
    return matched, unmatched


def needs_base(parsed: ParsedAdapter, to: str | None = None) -> bool:
    """True if reading ``parsed`` (or writing it ``to`` a dialect) needs the base weights ``W0``: per-output DoRA
    modules read from, or written for, ComfyUI's ``dora_scale`` rule."""
    dora_out = any(m.use_dora and m.norm_axis == "out" for mods in parsed.modules.values() for m in mods.values())
    return dora_out and (to == "comfyui" or parsed.comfyui_dora_scale)


def apply_base(
    parsed: ParsedAdapter,
    modules: dict[str, dict[str, ModuleAdapter]],
    base_weights: Callable[[dict[str, dict[str, ModuleAdapter]]], Mapping[str, Mapping[str, torch.Tensor]]],
) -> dict[str, dict[str, ModuleAdapter]]:
    """``modules`` of ``parsed`` with their true magnitudes ``m``: unchanged, unless the file was written for
    ComfyUI's rule (``dora_scale = m (||W0|| + eps) / ||W0 + s B A||``), which ``base_weights(modules)`` (``{component:
    {module name: W0}}``) undoes."""
    if not parsed.comfyui_dora_scale:
        return modules
    from dora_diffusion.formats.comfyui import from_comfyui_modules

    return from_comfyui_modules(modules, base_weights(modules))


WRITE_FORMATS = ("diffusers", "kohya", "comfyui")
"""The dialects ``write`` writes: diffusers/PEFT, kohya (LyCORIS), and kohya with ComfyUI's ``dora_scale`` rule."""


def write(
    modules: dict[str, dict[str, ModuleAdapter]],
    format: str,
    info: dict,
    unet_sgm: Mapping[str, str] | None = None,
    base: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict and header of ``modules`` in ``format`` (one of ``WRITE_FORMATS``).

    ``unet_sgm``: the UNet's module names in SGM form (``kohya.sgm_names``), for kohya files written from a model
    whose block layout is not SDXL base's; ``base``: the base weights ``{component: {module name: W0}}``, needed by
    ``"comfyui"`` for per-output DoRA modules.
    """
    if format not in WRITE_FORMATS:
        raise ValueError(f"format must be one of {', '.join(map(repr, WRITE_FORMATS))}, got {format!r}")
    if format == "diffusers":
        return to_diffusers(modules, info)
    from dora_diffusion.formats.comfyui import to_comfyui
    from dora_diffusion.formats.kohya import to_kohya

    if format == "kohya":
        return to_kohya(modules, info, unet_sgm)
    return to_comfyui(modules, base or {}, info, unet_sgm)
