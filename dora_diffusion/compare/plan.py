"""What a grid is before anything renders: limits, seeds, strengths, column names, settings and the plan.

A grid has one row per seed and one column per (adapter, strength), plus optionally one for the base model.
Every cell shares the prompt and settings, so the adapter and its strength are the only difference between
columns. An adapter with several strengths (``{"dora": [0, 0.5, 1]}``) gets one column per strength: a sweep,
like the X/Y plots of A1111 and ComfyUI.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

MAX_SEED = 2**64 - 1
"""Largest seed ``torch.Generator.manual_seed`` accepts."""
DEFAULT_MAX_CELLS = 64
"""Most images one grid may hold unless the app is started with another limit."""
MAX_STRENGTH = 2.0
MAX_STEPS = 150
MAX_GUIDANCE = 30.0
MIN_SIDE, MAX_SIDE = 64, 2048
MAX_PROMPT_LENGTH = 2000
"""Longest prompt or negative prompt, in characters (CLIP reads the first 77 tokens, about 300 characters)."""
BASE_LABEL = "base"
"""Column label of the base model; no adapter may take this name."""

SCHEDULERS: dict[str, tuple[str | None, dict]] = {
    "Default": (None, {}),
    "Euler": ("EulerDiscreteScheduler", {"use_karras_sigmas": False}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "DPM++ 2M SDE Karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
}
"""Sampler name (A1111's older single-name form) -> (diffusers scheduler class, config overrides);
``Default`` keeps the model's own."""

_NAME = re.compile(r"[\w-]{1,64}")
_INT = re.compile(r"[0-9]+")
_RANGE = re.compile(r"([0-9]+)-([0-9]+)")


class CompareError(ValueError):
    """Bad input to a comparison (seeds, settings, adapter choice); the message says what to change."""


# ----------------------------------------------------------------------------------------------- parsing


def parse_seeds(text: str, max_count: int | None = None) -> list[int]:
    """Seeds from ``"0, 7, 42"``, a range ``"0-3"`` (both ends included), or a mix (``"0-3, 10"``).

    Items are separated by commas or spaces. Raises ``CompareError`` for anything else, for a seed outside
    ``0..MAX_SEED``, a seed listed twice, or more than ``max_count`` seeds (counted before a range is expanded).
    """
    text = re.sub(r"\s*-\s*", "-", str(text).strip())
    items = [t for t in re.split(r"[,\s]+", text) if t]
    if not items:
        raise CompareError("enter at least one seed, e.g. '0, 7, 42' or a range '0-3'")
    if max_count is not None and len(items) > max_count:  # before reading them one by one
        raise CompareError(f"{len(items)} seeds are more than the limit of {max_count}; list fewer seeds")
    spans: list[tuple[int, int]] = []
    for item in items:
        if len(max(re.findall("[1-9][0-9]*", item), key=len, default="")) > len(str(MAX_SEED)):
            raise CompareError(f"a seed in '{item[:40]}…' is larger than {MAX_SEED}, the largest seed torch accepts")
        if _INT.fullmatch(item):
            lo = hi = int(item)
        elif m := _RANGE.fullmatch(item):
            lo, hi = int(m[1]), int(m[2])
            if hi < lo:
                raise CompareError(f"seed range '{item}' counts down; write '{hi}-{lo}'")
        else:
            raise CompareError(
                f"'{item}' is not a seed: use whole numbers from 0 to {MAX_SEED}, separated by commas "
                "('0, 7, 42'), or a range ('0-3')"
            )
        if hi > MAX_SEED:
            raise CompareError(f"seed {hi} is larger than {MAX_SEED}, the largest seed torch accepts")
        spans.append((lo, hi))
    count = sum(hi - lo + 1 for lo, hi in spans)
    if max_count is not None and count > max_count:
        raise CompareError(f"{count} seeds are more than the limit of {max_count}; list fewer seeds")
    seeds: list[int] = []
    seen: set[int] = set()
    for lo, hi in spans:
        for seed in range(lo, hi + 1):
            if seed in seen:
                raise CompareError(f"seed {seed} is listed twice; each seed is one row of the grid")
            seen.add(seed)
            seeds.append(seed)
    return seeds


def check_strength(name: str, k: object) -> float:
    """``k`` as a float if it is a number from 0 to ``MAX_STRENGTH``; else a ``CompareError`` naming ``name``."""
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0.0 <= float(k) <= MAX_STRENGTH:
        raise CompareError(f"strength of {name!r} must be a number from 0 to {MAX_STRENGTH:g}, got {k!r}")
    return float(k)


def parse_strengths(text: str, name: str = "adapter") -> list[float]:
    """Strengths of a sweep from ``"0, 0.5, 1, 1.5"`` (commas or spaces), each from 0 to ``MAX_STRENGTH``, once.

    An empty text gives ``[]`` (no sweep: the slider's single strength is used).
    """
    values: list[float] = []
    seen: set[float] = set()
    for item in (t for t in re.split(r"[,\s]+", str(text).strip()) if t):
        try:
            k = float(item)
        except ValueError:
            raise CompareError(
                f"{item!r} in the strengths of {name!r} is not a number; write e.g. '0, 0.5, 1, 1.5'"
            ) from None
        k = check_strength(name, k)
        if k in seen:
            raise CompareError(f"strength {k:g} of {name!r} is listed twice; each strength is one column")
        seen.add(k)
        values.append(k)
    return values


def check_adapter_name(name: str, taken: Sequence[str] = ()) -> str:
    """Return ``name`` if it can name a column: 1-64 letters, digits, ``_`` or ``-``, not ``base``, not taken."""
    if not _NAME.fullmatch(name):
        raise CompareError(
            f"adapter name {name!r} must be 1 to 64 letters, digits, '_' or '-' (no spaces, dots, commas or '=')"
        )
    if name == BASE_LABEL:
        raise CompareError(f"adapter name {BASE_LABEL!r} is reserved for the base-model column; pick another")
    if name in taken:
        raise CompareError(f"an adapter named {name!r} is already loaded; pick another name")
    return name


def default_adapter_name(source: str, taken: Sequence[str] = ()) -> str:
    """A free column name derived from a path or Hub id: ``runs/my_dora/`` -> ``my_dora``, then ``my_dora_2``..."""
    path = Path(str(source).rstrip("/\\"))
    stem = path.stem if path.suffix == ".safetensors" else path.name
    if stem == "pytorch_lora_weights" and path.parent.name:
        stem = path.parent.name  # diffusers' default file name: the folder names the adapter
    stem = re.sub(r"[^\w-]+", "_", stem).strip("_")[:56] or "adapter"
    if stem == BASE_LABEL:
        stem = "adapter"
    name, i = stem, 2
    while name in taken:
        name, i = f"{stem}_{i}", i + 1
    return name


def parse_adapter_arg(text: str) -> tuple[str | None, str]:
    """``"NAME=PATH"`` -> ``(NAME, PATH)``; a bare ``PATH`` (or one whose own text holds ``=``) -> ``(None, PATH)``."""
    name, sep, source = text.partition("=")
    if not sep or (not _NAME.fullmatch(name) and Path(text).exists()):
        return None, text
    if not source:
        raise CompareError(f"--adapter {text!r} has no path after '='; write NAME=PATH")
    return check_adapter_name(name), source


# ----------------------------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class GenerationSettings:
    """What every cell of a grid shares."""

    prompt: str
    negative_prompt: str = ""
    num_inference_steps: int = 25
    guidance_scale: float = 5.0
    width: int = 1024
    height: int = 1024
    scheduler: str = "Default"

    def __post_init__(self) -> None:
        for label, text in (("prompt", self.prompt), ("negative prompt", self.negative_prompt)):
            if not isinstance(text, str):
                raise CompareError(f"the {label} must be text, got {type(text).__name__}")
            if len(text) > MAX_PROMPT_LENGTH:
                raise CompareError(
                    f"the {label} is {len(text)} characters long, more than the limit of {MAX_PROMPT_LENGTH} (CLIP "
                    "reads only its first 77 tokens, about 300 characters); shorten it"
                )
        steps, width, height = self.num_inference_steps, self.width, self.height
        numbers = (("steps", steps), ("width", width), ("height", height), ("guidance scale", self.guidance_scale))
        for label, value in numbers:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:  # NaN != NaN
                raise CompareError(f"{label} must be a number, got {value!r}")
        for label, value in numbers[:3]:
            if float(value) != int(value):
                raise CompareError(f"{label} must be a whole number, got {value}")
        object.__setattr__(self, "num_inference_steps", int(steps))
        object.__setattr__(self, "width", int(width))
        object.__setattr__(self, "height", int(height))
        object.__setattr__(self, "guidance_scale", float(self.guidance_scale))
        if not 1 <= self.num_inference_steps <= MAX_STEPS:
            raise CompareError(f"steps must be from 1 to {MAX_STEPS}, got {self.num_inference_steps}")
        if not 0.0 <= self.guidance_scale <= MAX_GUIDANCE:
            raise CompareError(f"guidance scale must be from 0 to {MAX_GUIDANCE:g}, got {self.guidance_scale:g}")
        for label, side in (("width", self.width), ("height", self.height)):
            if not MIN_SIDE <= side <= MAX_SIDE or side % 8:
                raise CompareError(f"{label} must be a multiple of 8 from {MIN_SIDE} to {MAX_SIDE} pixels, got {side}")
        if self.scheduler not in SCHEDULERS:
            raise CompareError(f"unknown scheduler {self.scheduler!r}; choose one of {list(SCHEDULERS)}")


@dataclass(frozen=True)
class Column:
    """One column: an adapter at a strength, or the base model (``adapter=None``)."""

    adapter: str | None
    strength: float = 0.0

    @property
    def label(self) -> str:
        return BASE_LABEL if self.adapter is None else self.adapter


@dataclass(frozen=True)
class Cell:
    """One image of a grid: row ``row`` (its seed), column ``col``."""

    row: int
    col: int
    seed: int
    column: Column


@dataclass(frozen=True)
class GridPlan:
    """Seeds x columns with shared settings; ``cells`` are in row-major order (the gallery order)."""

    settings: GenerationSettings
    seeds: tuple[int, ...]
    columns: tuple[Column, ...]

    @property
    def cells(self) -> list[Cell]:
        return [Cell(r, c, s, col) for r, s in enumerate(self.seeds) for c, col in enumerate(self.columns)]

    def __len__(self) -> int:
        return len(self.seeds) * len(self.columns)


def _strength_list(name: str, value: object) -> list[float]:
    """One strength or a sweep (a list, or text like ``"0, 0.5, 1"``) as a list of checked strengths."""
    if isinstance(value, str):
        strengths = parse_strengths(value, name)
    elif isinstance(value, (list, tuple)):
        strengths = [check_strength(name, k) for k in value]
        if len(set(strengths)) != len(strengths):
            raise CompareError(f"a strength of {name!r} is listed twice; each strength is one column")
    else:
        strengths = [check_strength(name, value)]
    if not strengths:
        raise CompareError(f"give {name!r} at least one strength, e.g. 1 or '0, 0.5, 1'")
    return strengths


def plan_grid(
    settings: GenerationSettings,
    seeds: Sequence[int],
    adapters: Mapping[str, float | Sequence[float] | str],
    include_base: bool,
    loaded: Sequence[str],
    max_cells: int = DEFAULT_MAX_CELLS,
) -> GridPlan:
    """Plan a grid: the base column first (if asked), then the chosen adapters in load order.

    ``adapters`` maps each chosen adapter to a strength in ``[0, MAX_STRENGTH]`` or to a sweep of them (a list,
    or text ``"0, 0.5, 1"``): one column per strength, in the order given. ``loaded`` lists the loaded adapters
    in load order. Raises ``CompareError`` for an unknown adapter, a strength out of range or listed twice,
    no column, no seed, or more than ``max_cells`` images.
    """
    unknown = [n for n in adapters if n not in loaded]
    if unknown:
        raise CompareError(f"adapters {unknown} are not loaded; loaded adapters: {list(loaded)}")
    strengths = {name: _strength_list(name, value) for name, value in adapters.items()}
    columns = [Column(None)] if include_base else []
    columns += [Column(n, k) for n in loaded if n in strengths for k in strengths[n]]
    if not columns:
        raise CompareError("nothing to compare: tick at least one adapter or the base model")
    if not seeds:
        raise CompareError("enter at least one seed, e.g. '0, 7, 42' or a range '0-3'")
    n = len(seeds) * len(columns)
    if n > max_cells:
        raise CompareError(
            f"{len(seeds)} seeds x {len(columns)} columns = {n} images, more than the limit of {max_cells}; "
            "use fewer seeds, columns or strengths"
        )
    return GridPlan(settings, tuple(seeds), tuple(columns))
