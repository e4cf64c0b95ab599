"""File dialects: detection from keys and shapes (never from the file name), parsing, name resolution."""

from __future__ import annotations

from collections.abc import Callable

import torch

from dora_diffusion.formats.base import COMPONENTS, ModuleAdapter, ParsedAdapter, build_module
from dora_diffusion.formats.diffusers import is_diffusers_key, parse_diffusers, to_diffusers
from dora_diffusion.formats.safefile import (
    DEFAULT_WEIGHT_NAME,
    AdapterFileError,
    check_tensors,
    read_safetensors,
    resolve_file,
    shown,
    write_safetensors,
)

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
    "read_safetensors",
    "resolve_file",
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
