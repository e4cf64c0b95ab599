"""The ``lora_adapter_metadata`` header of diffusers/PEFT files: per-component LoraConfig fields, checked.

A header comes from a file, so every value is checked for type and range before it is used, and every
error names the header key. PEFT's ``rank_pattern``/``alpha_pattern`` keys are regular expressions
in PEFT (``re.match(rf"(.*\\.)?({key})$", module)``); a regular expression taken from a file can take
exponential time, so no regular expression from a file is ever compiled here. What diffusers and PEFT
write, a module name or a dotted suffix of one (optionally anchored with ``^``), is matched by string
comparison, giving PEFT's result; any other key is refused with an error naming it.
"""

from __future__ import annotations

import json
import math
import re

from dora_diffusion.formats.base import COMPONENTS, MAX_ALPHA
from dora_diffusion.formats.safefile import AdapterFileError, shown

METADATA_KEY = "lora_adapter_metadata"

_NAME_KEY = re.compile(r"\^?[A-Za-z0-9_.-]+\$?")
"""A pattern key that is a module name or a dotted suffix of one (this regex is ours, never the file's)."""


def _number(where: str, value: object) -> float:
    """A finite number within +-MAX_ALPHA; bools and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AdapterFileError(f"header {where} is {shown(value)}; expected a number")
    if not (isinstance(value, int) or math.isfinite(value)) or abs(value) > MAX_ALPHA:
        raise AdapterFileError(f"header {where} is {shown(value)}; expected a finite number within +-{MAX_ALPHA:g}")
    return float(value)


def _bool(where: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise AdapterFileError(f"header {where} is {shown(value)}; expected true or false")
    return value


class PatternTable:
    """PEFT's pattern lookup for one ``alpha_pattern``: the first key, in file order, that equals the module
    name or a dotted suffix of it (``^key``: the whole name only)."""

    def __init__(self, where: str, patterns: object) -> None:
        if patterns is None:
            patterns = {}
        if not isinstance(patterns, dict):
            raise AdapterFileError(f"header {where} is a {type(patterns).__name__}; expected an object {{module: value}}")
        self._entries: dict[str, tuple[int, float]] = {}
        for order, (key, value) in enumerate(patterns.items()):
            if not _NAME_KEY.fullmatch(key):
                raise AdapterFileError(
                    f"header {where} key {shown(key)} is not a module name or a dotted suffix of one. PEFT reads "
                    "pattern keys as regular expressions; dora-diffusion never runs a regular expression from a "
                    "file (it could hang the loader). Rewrite the key as the module names it stands for"
                )
            anchored = key.startswith("^")
            name = key.removeprefix("^").removesuffix("$")
            lookup = f"^{name}" if anchored else name
            self._entries.setdefault(lookup, (order, _number(f"{where}[{shown(key)}]", value)))

    def __call__(self, module: str) -> float | None:
        """The value for ``module``, or None if no key matches."""
        if not self._entries:
            return None
        parts = module.split(".")
        candidates = [f"^{module}"] + [".".join(parts[i:]) for i in range(len(parts))]
        hits = [self._entries[c] for c in candidates if c in self._entries]
        return min(hits)[1] if hits else None


class ComponentConfig:
    """The checked fields of one component's LoraConfig that a parse uses."""

    def __init__(self, where: str, fields: dict) -> None:
        alpha = fields.get("lora_alpha")
        self.lora_alpha = None if alpha is None else _number(f"{where}lora_alpha", alpha)
        rslora = fields.get("use_rslora")
        self.use_rslora = False if rslora is None else _bool(f"{where}use_rslora", rslora)
        if fields.get("use_dora") is not None:
            _bool(f"{where}use_dora", fields["use_dora"])
        r = fields.get("r")
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
            raise AdapterFileError(f"header {where}r is {shown(r)}; expected a positive integer")
        rank_pattern = fields.get("rank_pattern")
        if rank_pattern is not None and not isinstance(rank_pattern, dict):
            raise AdapterFileError(f"header {where}rank_pattern is a {type(rank_pattern).__name__}; expected an object")
        self.alpha_pattern = PatternTable(f"{where}alpha_pattern", fields.get("alpha_pattern"))

    def alpha_for(self, module: str) -> float | None:
        """``alpha_pattern`` wins over ``lora_alpha``; None means alpha = rank."""
        value = self.alpha_pattern(module)
        return self.lora_alpha if value is None else value


def component_configs(metadata: dict[str, str]) -> dict[str, ComponentConfig]:
    """Checked per-component configs from the ``lora_adapter_metadata`` header (``"*"``: unprefixed fields)."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except ValueError as err:  # JSONDecodeError, or an integer of more than 4300 digits
        raise AdapterFileError(f"header {METADATA_KEY!r} is not valid JSON: {err}") from None
    except RecursionError:
        raise AdapterFileError(f"header {METADATA_KEY!r} is nested too deeply to be a LoraConfig") from None
    if not isinstance(flat, dict):
        raise AdapterFileError(f"header {METADATA_KEY!r} is not a JSON object")
    grouped: dict[str, dict] = {}
    for key, value in flat.items():
        comp, _, field = key.partition(".")
        if comp in COMPONENTS and field:
            grouped.setdefault(comp, {})[field] = value
        else:
            grouped.setdefault("*", {})[key] = value
    return {
        comp: ComponentConfig(f"{METADATA_KEY!r} " + ("" if comp == "*" else f"{comp}."), fields)
        for comp, fields in grouped.items()
    }
