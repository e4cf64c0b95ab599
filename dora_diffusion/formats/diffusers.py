"""The diffusers / PEFT dialect: ``unet.<module>.lora_A.weight``, ``lora_magnitude_vector`` and friends."""

from __future__ import annotations

import json
import re
from collections import Counter

import torch

from dora_diffusion.formats.base import COMPONENTS, ModuleAdapter, ParsedAdapter, build_module
from dora_diffusion.formats.peft_config import METADATA_KEY, ComponentConfig, component_configs
from dora_diffusion.formats.safefile import AdapterFileError, shown
OWN_METADATA_KEY = "dora_diffusion"

# (key suffix, role): role A = down, B = up, M = magnitude, alpha = scalar alpha.
_SUFFIXES: list[tuple[str, str]] = [
    (".lora_A.default.weight", "A"),
    (".lora_B.default.weight", "B"),
    (".lora_A.weight", "A"),
    (".lora_B.weight", "B"),
    (".lora_linear_layer.down.weight", "A"),
    (".lora_linear_layer.up.weight", "B"),
    (".lora.down.weight", "A"),
    (".lora.up.weight", "B"),
    (".lora_magnitude_vector.default.weight", "M"),
    (".lora_magnitude_vector.default", "M"),
    (".lora_magnitude_vector.weight", "M"),
    (".lora_magnitude_vector", "M"),
    (".alpha", "alpha"),
]
# diffusers' old attention-processor layout: `attn1.processor.to_q_lora.down.weight`.
_PROCESSOR = re.compile(r"^(?P<mod>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<dir>down|up)\.weight$")
_PEFT_PREFIX = "base_model.model."


def is_diffusers_key(key: str) -> bool:
    """True if ``key`` has one of this dialect's suffixes."""
    return any(key.endswith(s) for s, role in _SUFFIXES if role != "alpha") or bool(_PROCESSOR.match(key))


def split_key(key: str) -> tuple[str, str, str] | None:
    """``(component, module name, role)`` of a diffusers/PEFT key, or None if the suffix is unknown."""
    if key.startswith(_PEFT_PREFIX):
        key = key[len(_PEFT_PREFIX) :]
    component = "unet"
    for comp in sorted(COMPONENTS, key=len, reverse=True):
        if key.startswith(comp + "."):
            component, key = comp, key[len(comp) + 1 :]
            break
    m = _PROCESSOR.match(key)
    if m:
        proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
        return component, f"{m['mod']}.{proj}", "A" if m["dir"] == "down" else "B"
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            return component, key[: -len(suffix)], role
    return None


def parse_diffusers(state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> ParsedAdapter:
    """Read a diffusers/PEFT state dict; unknown keys are an error naming them."""
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    keys: dict[tuple[str, str], list[str]] = {}
    unknown = []
    for key, tensor in state_dict.items():
        parts = split_key(key)
        if parts is None:
            unknown.append(key)
            continue
        comp, module, role = parts
        slot = groups.setdefault((comp, module), {})
        if role in slot:
            raise AdapterFileError(f"adapter module {comp}.{module} has two {role} tensors (e.g. {shown(key)})")
        slot[role] = tensor
        keys.setdefault((comp, module), []).append(key)
    if unknown:
        raise AdapterFileError(
            f"{len(unknown)} adapter keys have no known suffix, e.g. {', '.join(shown(k) for k in unknown[:3])}; expected "
            "'.lora_A.weight'/'.lora_B.weight', '.lora.down/up.weight', '.lora_linear_layer.down/up.weight' or "
            "'.lora_magnitude_vector'"
        )
    configs = component_configs(metadata)
    default = configs.get("*", ComponentConfig("", {}))
    parsed = ParsedAdapter("diffusers", metadata=metadata, source_keys=keys)
    for (comp, module), slot in groups.items():
        cfg = configs.get(comp, default)
        if "alpha" in slot:
            if slot["alpha"].numel() != 1:
                raise AdapterFileError(f"adapter module {comp}.{module}: alpha has shape {tuple(slot['alpha'].shape)}; expected a single number")
            alpha = slot["alpha"].item()
        else:
            alpha = cfg.alpha_for(module)
        parsed.modules.setdefault(comp, {})[module] = build_module(
            f"{comp}.{module}",
            slot.get("A"),
            slot.get("B"),
            slot.get("M"),
            alpha,
            "out",
            cfg.use_rslora,
        )
    return parsed


def _most_common(values: list) -> object:
    return Counter(values).most_common(1)[0][0]


def to_diffusers(
    modules: dict[str, dict[str, ModuleAdapter]], extra_metadata: dict | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict and header in diffusers layout, readable by diffusers' own ``load_lora_weights``.

    Magnitudes are stored as PEFT does: (out,) for Linear, (1, out, 1, 1) for Conv2d.
    """
    state_dict: dict[str, torch.Tensor] = {}
    packed: dict[str, object] = {}
    for comp, mods in modules.items():
        if not mods:
            continue
        dense = sorted({m.kind for m in mods.values()} - {"lowrank"})
        if dense:
            raise ValueError(
                f"{comp} has {', '.join(dense)} modules (LyCORIS LoHa/LoKr/Tucker/full), which diffusers/PEFT files "
                "cannot hold; save with format='kohya'"
            )
        kinds = {m.use_dora for m in mods.values()}
        if len(kinds) > 1:
            raise ValueError(
                f"{comp} mixes DoRA and LoRA modules, which diffusers metadata cannot express; save with format='kohya'"
            )
        if any(m.norm_axis != "out" for m in mods.values()):
            raise ValueError(
                "per-input (legacy LyCORIS) DoRA has no lossless diffusers/PEFT form; save with format='kohya'"
            )
        for name, m in mods.items():
            prefix = f"{comp}.{name}"
            state_dict[f"{prefix}.lora_A.weight"] = m.a
            state_dict[f"{prefix}.lora_B.weight"] = m.b
            if m.magnitude is not None:
                mag = m.magnitude.reshape(1, -1, 1, 1) if m.is_conv else m.magnitude.reshape(-1)
                state_dict[f"{prefix}.lora_magnitude_vector"] = mag
        r = int(_most_common([m.rank for m in mods.values()]))
        alpha = float(_most_common([m.alpha for m in mods.values()]))
        config = {
            "r": r,
            "lora_alpha": alpha,
            "use_dora": kinds.pop(),
            "use_rslora": any(m.use_rslora for m in mods.values()),
            "target_modules": sorted(mods),
            "rank_pattern": {n: m.rank for n, m in mods.items() if m.rank != r},
            "alpha_pattern": {n: m.alpha for n, m in mods.items() if m.alpha != alpha},
            "init_lora_weights": True,
        }
        packed.update({f"{comp}.{k}": v for k, v in config.items()})
    metadata = {"format": "pt", METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}
    if extra_metadata:
        metadata[OWN_METADATA_KEY] = json.dumps(extra_metadata, sort_keys=True)
    return state_dict, metadata
