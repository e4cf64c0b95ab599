"""Adapters side by side at fixed seeds: seeds, grid plans, captions, infotext, the grid PNG, rendering.

A grid has one row per seed and one column per adapter (and, optionally, one for the base model). Every cell
uses the same prompt, settings and seed, so the adapter and its strength are the only difference between
columns. Adapters are loaded once (``Comparer.add_adapter``); a cell only switches between them with
``set_dora_adapters`` (strength ``k`` gives ``W0 + k (W' - W0)``), or runs the base model with
``disable_dora``. Each cell draws its noise from ``torch.Generator(device).manual_seed(seed)``.

Generation parameters are written the way AUTOMATIC1111 writes a PNG's ``parameters`` text chunk::

    a photo of TOK toy
    Negative prompt: blurry
    Steps: 25, Sampler: Euler, CFG scale: 5, Seed: 42, Size: 1024x1024, Model: stabilityai/..., Adapter: dora,
    Adapter strength: 1, Adapter source: out/dora, Version: dora-diffusion 0.1.0

(the last line is one line), so ``parse_infotext`` (and A1111's "PNG Info") read them back.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from . import __version__
from .inject import adapted_layers
from .pipeline import components, disable_dora, enable_dora, get_dora_adapters, load_dora_weights, set_dora_adapters

MAX_SEED = 2**64 - 1
"""Largest seed ``torch.Generator.manual_seed`` accepts."""
DEFAULT_MAX_CELLS = 64
"""Most images one grid may hold unless the app is started with another limit."""
MAX_STRENGTH = 2.0
MAX_STEPS = 150
MAX_GUIDANCE = 30.0
MIN_SIDE, MAX_SIDE = 64, 2048
GRID_MIN_SIDE = 256
"""Smaller images are zoomed (nearest neighbour, a whole factor) to at least this size in the grid PNG."""
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
"""A1111 sampler name -> (diffusers scheduler class, config overrides); ``Default`` keeps the model's own."""

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
    spans: list[tuple[int, int]] = []
    for item in items:
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


def plan_grid(
    settings: GenerationSettings,
    seeds: Sequence[int],
    adapters: Mapping[str, float],
    include_base: bool,
    loaded: Sequence[str],
    max_cells: int = DEFAULT_MAX_CELLS,
) -> GridPlan:
    """Plan a grid: the base column first (if asked), then the chosen adapters in load order.

    ``adapters`` maps the chosen adapters to strengths in ``[0, MAX_STRENGTH]``; ``loaded`` lists the loaded
    adapters in load order. Raises ``CompareError`` for an unknown adapter, a strength out of range, no
    column, no seed, or more than ``max_cells`` images.
    """
    unknown = [n for n in adapters if n not in loaded]
    if unknown:
        raise CompareError(f"adapters {unknown} are not loaded; loaded adapters: {list(loaded)}")
    for name, k in adapters.items():
        if not isinstance(k, (int, float)) or not 0.0 <= float(k) <= MAX_STRENGTH:
            raise CompareError(f"strength of {name!r} must be a number from 0 to {MAX_STRENGTH:g}, got {k!r}")
    columns = [Column(None)] if include_base else []
    columns += [Column(n, float(adapters[n])) for n in loaded if n in adapters]
    if not columns:
        raise CompareError("nothing to compare: tick at least one adapter or the base model")
    if not seeds:
        raise CompareError("enter at least one seed, e.g. '0, 7, 42' or a range '0-3'")
    n = len(seeds) * len(columns)
    if n > max_cells:
        raise CompareError(
            f"{len(seeds)} seeds x {len(columns)} columns = {n} images, more than the limit of {max_cells}; "
            "use fewer seeds or columns"
        )
    return GridPlan(settings, tuple(seeds), tuple(columns))


# ----------------------------------------------------------------------------------------------- text


def format_strength(k: float) -> str:
    """``1.0`` -> ``"1.00"``: two decimals, as the strength sliders step."""
    return f"{k:.2f}"


def caption(cell: Cell) -> str:
    """``"adapter · strength · seed"``, e.g. ``"dora · 1.00 · seed 42"``; the base model has no strength."""
    strength = "—" if cell.column.adapter is None else format_strength(cell.column.strength)
    return f"{cell.column.label} · {strength} · seed {cell.seed}"


def column_legend(column: Column) -> list[str]:
    """The lines above a grid column: ``["dora", "strength 1.00"]``, or ``["base model"]``."""
    if column.adapter is None:
        return ["base model"]
    return [column.adapter, f"strength {format_strength(column.strength)}"]


def row_legend(seed: int) -> str:
    return f"seed {seed}"


def _quote(value: str) -> str:
    """A1111's quoting: values holding ``,``, ``:`` or a newline are written as JSON strings."""
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ',:\n"') else value


def _infotext(settings: GenerationSettings, fields: dict[str, object]) -> str:
    lines = [settings.prompt]
    if settings.negative_prompt:
        lines.append(f"Negative prompt: {settings.negative_prompt}")
    params = {
        "Steps": settings.num_inference_steps,
        "Sampler": settings.scheduler,
        "CFG scale": f"{settings.guidance_scale:g}",
        **fields,
        "Version": f"dora-diffusion {__version__}",
    }
    lines.append(", ".join(f"{k}: {_quote(str(v))}" for k, v in params.items() if v is not None))
    return "\n".join(lines)


def infotext(settings: GenerationSettings, cell: Cell, model: str, adapter_source: str | None = None) -> str:
    """The A1111-style ``parameters`` text of one cell, plus ``Adapter``, ``Adapter strength``, ``Adapter source``."""
    column = cell.column
    fields: dict[str, object] = {"Seed": cell.seed, "Size": f"{settings.width}x{settings.height}", "Model": model}
    if column.adapter is not None:
        fields |= {
            "Adapter": column.adapter,
            "Adapter strength": f"{column.strength:g}",
            "Adapter source": adapter_source,
        }
    return _infotext(settings, fields)


def grid_infotext(plan: GridPlan, model: str) -> str:
    """The ``parameters`` text of a whole grid: shared settings plus ``Seeds`` and ``Columns``."""
    columns = ", ".join(BASE_LABEL if c.adapter is None else f"{c.adapter} {c.strength:g}" for c in plan.columns)
    fields = {
        "Seeds": ", ".join(map(str, plan.seeds)),
        "Size": f"{plan.settings.width}x{plan.settings.height}",
        "Model": model,
        "Columns": columns,
    }
    return _infotext(plan.settings, fields)


_PARAM = re.compile(r'\s*([\w][\w \-/+]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> dict[str, str]:
    """Read a ``parameters`` text back: ``{"Prompt": ..., "Negative prompt": ..., "Steps": "25", ...}``."""
    lines = text.strip().split("\n")
    params: dict[str, str] = {}
    last = lines[-1] if lines else ""
    if len(_PARAM.findall(last)) >= 3:
        for key, value in _PARAM.findall(last):
            value = value.strip()
            params[key.strip()] = json.loads(value) if value.startswith('"') else value
        lines = lines[:-1]
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    return {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative), **params}


@dataclass(frozen=True)
class RestoredCell:
    """What a cell's ``parameters`` text says: the settings, the seed, the adapter (None: base) and strength."""

    settings: GenerationSettings
    seed: int
    adapter: str | None
    strength: float
    model: str | None


def restore_cell(text: str) -> RestoredCell:
    """The settings of a cell from its ``parameters`` text; raises ``CompareError`` if fields are missing."""
    p = parse_infotext(text)
    missing = [k for k in ("Steps", "CFG scale", "Seed", "Size") if k not in p]
    if missing:
        raise CompareError(f"these generation parameters have no {', '.join(missing)}")
    try:
        width, height = (int(v) for v in p["Size"].split("x"))
        steps, guidance, seed = int(p["Steps"]), float(p["CFG scale"]), int(p["Seed"])
        strength = float(p.get("Adapter strength", 1.0))
    except ValueError as err:
        raise CompareError(f"unreadable generation parameters ({err})") from None
    sampler = p.get("Sampler", "Default")
    settings = GenerationSettings(
        p["Prompt"],
        p["Negative prompt"],
        steps,
        guidance,
        width,
        height,
        sampler if sampler in SCHEDULERS else "Default",
    )
    return RestoredCell(settings, seed, p.get("Adapter"), strength, p.get("Model"))


def reproduce_snippet(
    settings: GenerationSettings,
    cell: Cell,
    model: str,
    adapter_source: str | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    variant: str | None = None,
) -> str:
    """Python that renders ``cell`` again with diffusers and ``dora_diffusion`` alone (same pixels, same device)."""
    scheduler_cls, overrides = SCHEDULERS[settings.scheduler]
    imports = "from diffusers import StableDiffusionXLPipeline"
    if scheduler_cls:
        imports += f", {scheduler_cls}"
    load_kwargs = f", {dtype_keyword()}={dtype}" + (f", variant={variant!r}" if variant else "")
    lines = ["import torch", imports, ""]
    if cell.column.adapter is not None:
        lines += ["import dora_diffusion  # adds load_dora_weights / set_dora_adapters to diffusers pipelines", ""]
    lines.append(f"pipe = StableDiffusionXLPipeline.from_pretrained({model!r}{load_kwargs}).to({device!r})")
    if scheduler_cls:
        extra = "".join(f", {k}={v!r}" for k, v in overrides.items())
        lines.append(f"pipe.scheduler = {scheduler_cls}.from_config(pipe.scheduler.config{extra})")
    column = cell.column
    if column.adapter is not None:
        lines += [
            f"pipe.load_dora_weights({adapter_source!r}, adapter_name={column.adapter!r})",
            f"pipe.set_dora_adapters({column.adapter!r}, adapter_weights={column.strength!r})",
        ]
    call = [f"    {settings.prompt!r},"]
    if settings.negative_prompt:
        call.append(f"    negative_prompt={settings.negative_prompt!r},")
    call += [
        f"    num_inference_steps={settings.num_inference_steps},",
        f"    guidance_scale={settings.guidance_scale!r},",
        f"    width={settings.width},",
        f"    height={settings.height},",
        f"    generator=torch.Generator({device!r}).manual_seed({cell.seed}),",
    ]
    lines += ["image = pipe(", *call, ").images[0]", f"image.save({f'{column.label}_seed{cell.seed}.png'!r})"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- images


def png_info(parameters: str) -> PngInfo:
    """A PNG text chunk ``parameters`` (A1111's key) holding ``parameters``."""
    info = PngInfo()
    info.add_text("parameters", parameters)
    return info


def save_png(image: Image.Image, path: str | Path, parameters: str) -> Path:
    """Write ``image`` as a PNG carrying ``parameters``; return the path."""
    path = Path(path)
    image.save(path, format="PNG", pnginfo=png_info(parameters))
    return path


def read_parameters(path: str | Path) -> str:
    """The ``parameters`` text of an image file; raises ``CompareError`` for a non-image or an image without one."""
    try:
        with Image.open(path) as image:
            image.load()
            text = image.info.get("parameters")
    except (OSError, SyntaxError, ValueError) as err:  # PIL raises UnidentifiedImageError (an OSError) for non-images
        raise CompareError(f"{Path(path).name} is not an image PIL can read ({err})") from None
    if not text:
        raise CompareError(f"{Path(path).name} carries no generation parameters (no PNG 'parameters' text)")
    return text


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """Greedy word wrap of ``text`` into lines at most ``width`` pixels wide (a long word stays whole)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            trial = f"{line} {word}" if line else word
            if line and draw.textlength(trial, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return lines


def compose_grid(
    images: Sequence[Sequence[Image.Image]],
    row_labels: Sequence[str],
    column_labels: Sequence[Sequence[str]],
    title: str | None = None,
    zoom: int = 1,
) -> Image.Image:
    """One RGB image: ``images[row][col]`` in a grid, column legends above, row legends on the left.

    All images have one size. A column is as wide as the wider of its image and its legend, with the image
    centred; a ``title`` (the prompt) is wrapped above the legends. Pixels are copied as they are, each
    repeated ``zoom`` x ``zoom`` times (nearest neighbour) to make small images legible.
    """
    if not images or not images[0]:
        raise ValueError("compose_grid needs at least one image")
    n_rows, n_cols = len(images), len(images[0])
    if len(row_labels) != n_rows or len(column_labels) != n_cols or any(len(r) != n_cols for r in images):
        raise ValueError(f"{n_rows}x{n_cols} images need {n_rows} row labels and {n_cols} column labels")
    size = images[0][0].size
    w, h = size[0] * zoom, size[1] * zoom
    font = _font(max(12, min(32, min(w, h) // 16)))
    pad, gap = font.size // 2, max(2, min(w, h) // 64)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = font.size + pad // 2

    col_w = [max(w, *(int(probe.textlength(t, font=font)) + 2 * pad for t in lines)) for lines in column_labels]
    legend_w = max(int(probe.textlength(t, font=font)) for t in row_labels) + 2 * pad
    header_h = max(len(lines) for lines in column_labels) * line_h + 2 * pad
    grid_w = legend_w + sum(col_w) + gap * (n_cols - 1)
    title_lines = _wrap(probe, title, font, grid_w - 2 * pad) if title else []
    title_h = len(title_lines) * line_h + (pad if title_lines else 0)
    grid_h = title_h + header_h + n_rows * h + gap * (n_rows - 1)

    canvas = Image.new("RGB", (grid_w, grid_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(title_lines):
        draw.text((pad, pad + i * line_h), line, fill="black", font=font)
    x = legend_w
    for c, lines in enumerate(column_labels):
        for i, line in enumerate(lines):
            tw = draw.textlength(line, font=font)
            draw.text((x + (col_w[c] - tw) / 2, title_h + pad + i * line_h), line, fill="black", font=font)
        x += col_w[c] + gap
    for r, row in enumerate(images):
        y = title_h + header_h + r * (h + gap)
        draw.text((pad, y + (h - font.size) / 2), row_labels[r], fill="black", font=font)
        x = legend_w
        for c, image in enumerate(row):
            if image.size != size:
                raise ValueError(
                    f"image [{r}][{c}] is {image.size[0]}x{image.size[1]}, the first is {size[0]}x{size[1]}"
                )
            if zoom != 1:
                image = image.resize((w, h), Image.Resampling.NEAREST)
            canvas.paste(image.convert("RGB"), (x + (col_w[c] - w) // 2, y))
            x += col_w[c] + gap
    return canvas


# ----------------------------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class AdapterInfo:
    """A loaded adapter: its column name, where it came from, and what it is."""

    name: str
    source: str
    kind: str  # "DoRA", "LoRA", or "DoRA + LoRA" when some modules have a magnitude and some not
    ranks: tuple[int, ...]
    modules: int

    @property
    def summary(self) -> str:
        ranks = "/".join(map(str, self.ranks))
        return f"{self.kind} · rank {ranks} · {self.modules} modules"


@dataclass(frozen=True)
class CellResult:
    cell: Cell
    image: Image.Image
    infotext: str
    caption: str


class Comparer:
    """A pipeline with adapters loaded once, rendering grids cell by cell.

    One lock guards the pipeline: a cell, or the loading of an adapter, runs alone.
    """

    def __init__(self, pipe, model: str, max_cells: int = DEFAULT_MAX_CELLS, variant: str | None = None) -> None:
        self.pipe = pipe
        self.model = model
        self.max_cells = max_cells
        self.variant = variant
        self.device = pipe.device
        self.dtype = pipe.unet.dtype
        self._scheduler_cls = type(pipe.scheduler)
        self._scheduler_config = pipe.scheduler.config
        self._adapters: dict[str, AdapterInfo] = {}
        self._lock = threading.Lock()
        pipe.set_progress_bar_config(disable=True)
        for name in get_dora_adapters(pipe):
            self._adapters[name] = self._describe(name, "(loaded before the app started)")

    @property
    def lock(self) -> threading.Lock:
        """Held while the pipeline renders or adapters are added; hold it to read the weights safely."""
        return self._lock

    @property
    def default_size(self) -> int:
        """The base model's native image side: UNet sample size times the VAE factor (1024 for SDXL)."""
        return int(self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor)

    @property
    def adapters(self) -> list[AdapterInfo]:
        """Loaded adapters in load order."""
        return list(self._adapters.values())

    def add_adapter(self, source: str, name: str | None = None) -> AdapterInfo:
        """Load an adapter (a file, a directory holding one, or a Hub repo id) under a column name.

        Raises ``CompareError`` for a bad name, ``AdapterFileError`` if the file is missing, unreadable or does
        not fit the base model (the pipeline is then left as it was).
        """
        source = str(source).strip()
        if not source:
            raise CompareError("enter a path, a Hub repo id, or upload a .safetensors file")
        taken = list(self._adapters)
        name = check_adapter_name(name.strip(), taken) if name and name.strip() else default_adapter_name(source, taken)
        with self._lock:
            load_dora_weights(self.pipe, source, adapter_name=name)
        info = self._describe(name, source)
        self._adapters[name] = info
        return info

    def _describe(self, name: str, source: str) -> AdapterInfo:
        specs = [
            layer.specs[name]
            for model in components(self.pipe).values()
            for layer in adapted_layers(model).values()
            if name in layer.specs
        ]
        dora = {s.use_dora for s in specs}
        kind = "DoRA + LoRA" if len(dora) == 2 else ("DoRA" if True in dora else "LoRA")
        return AdapterInfo(name, source, kind, tuple(sorted({s.rank for s in specs})), len(specs))

    def plan(
        self,
        settings: GenerationSettings,
        seeds: str | Sequence[int],
        adapters: Mapping[str, float],
        include_base: bool,
    ) -> GridPlan:
        """Check the request and plan its grid (see ``plan_grid``); seeds may be text like ``"0-3"``."""
        if isinstance(seeds, str):
            seeds = parse_seeds(seeds, self.max_cells)
        return plan_grid(settings, seeds, adapters, include_base, list(self._adapters), self.max_cells)

    def source(self, column: Column) -> str | None:
        return None if column.adapter is None else self._adapters[column.adapter].source

    def infotext(self, plan: GridPlan, cell: Cell) -> str:
        return infotext(plan.settings, cell, self.model, self.source(cell.column))

    def snippet(self, plan: GridPlan, cell: Cell) -> str:
        return reproduce_snippet(
            plan.settings, cell, self.model, self.source(cell.column), self.device.type, self.dtype, self.variant
        )

    def _scheduler(self, name: str):
        cls_name, overrides = SCHEDULERS[name]
        if cls_name is None:
            return self._scheduler_cls.from_config(self._scheduler_config)
        import diffusers

        return getattr(diffusers, cls_name).from_config(self._scheduler_config, **overrides)

    def render_cell(
        self,
        settings: GenerationSettings,
        cell: Cell,
        on_step: Callable[[int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Image.Image | None:
        """One image: the cell's column switched on, a fresh scheduler, noise from the cell's seed.

        Returns None if ``should_stop`` turned true during the denoising steps.
        """
        pipe = self.pipe
        stopped = False

        def step_end(pipe, step: int, timestep, kwargs: dict) -> dict:
            nonlocal stopped
            if on_step is not None:
                on_step(step + 1)
            if should_stop is not None and should_stop():
                stopped = True
                pipe._interrupt = True  # diffusers skips the remaining steps
            return {}

        with self._lock:
            pipe.scheduler = self._scheduler(settings.scheduler)
            if cell.column.adapter is None:
                disable_dora(pipe)
            else:
                enable_dora(pipe)
                set_dora_adapters(pipe, cell.column.adapter, cell.column.strength)
            image = pipe(
                prompt=settings.prompt,
                negative_prompt=settings.negative_prompt or None,
                num_inference_steps=settings.num_inference_steps,
                guidance_scale=settings.guidance_scale,
                width=settings.width,
                height=settings.height,
                generator=torch.Generator(self.device).manual_seed(cell.seed),
                callback_on_step_end=step_end,
            ).images[0]
        return None if stopped else image

    def render(
        self,
        plan: GridPlan,
        on_step: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[CellResult]:
        """Render ``plan`` cell by cell in gallery order; ``on_step(cell_index, step)`` reports progress.

        Stops early, without yielding the interrupted cell, once ``should_stop()`` is true.
        """
        for k, cell in enumerate(plan.cells):
            if should_stop is not None and should_stop():
                return
            step_cb = None if on_step is None else (lambda step, k=k: on_step(k, step))
            image = self.render_cell(plan.settings, cell, step_cb, should_stop)
            if image is None:
                return
            yield CellResult(cell, image, self.infotext(plan, cell), caption(cell))

    def grid(self, plan: GridPlan, results: Sequence[CellResult]) -> Image.Image:
        """The composite grid image of a finished plan, with legends and the prompt as title.

        Images under 256 px are zoomed by a whole factor (nearest neighbour) to at least 256 px.
        """
        if len(results) != len(plan):
            raise ValueError(f"the grid needs all {len(plan)} cells, got {len(results)}")
        n = len(plan.columns)
        rows = [[r.image for r in results[i : i + n]] for i in range(0, len(results), n)]
        return compose_grid(
            rows,
            [row_legend(s) for s in plan.seeds],
            [column_legend(c) for c in plan.columns],
            plan.settings.prompt,
            zoom=max(1, GRID_MIN_SIDE // max(plan.settings.width, plan.settings.height)),
        )


def dtype_keyword() -> str:
    """``dtype``, the name diffusers >= 0.37 uses in ``from_pretrained``, or ``torch_dtype`` for older releases."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"


def load_base_pipeline(model: str, device: str | None = None, dtype: str = "auto", variant: str | None = None):
    """``StableDiffusionXLPipeline.from_pretrained(model)`` on ``device`` (default: cuda if present, else cpu).

    ``dtype="auto"`` is float16 on a GPU and float32 on the CPU.
    """
    from diffusers import StableDiffusionXLPipeline

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        dtype = "float32" if device == "cpu" else "float16"
    torch_dtype = getattr(torch, dtype)
    pipe = StableDiffusionXLPipeline.from_pretrained(model, variant=variant, **{dtype_keyword(): torch_dtype})
    return pipe.to(device)
