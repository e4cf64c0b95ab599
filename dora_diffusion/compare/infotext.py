"""Generation parameters as text: captions, A1111-style ``parameters`` infotext, reading it back, PNG text chunks.

A cell's parameters are written the way AUTOMATIC1111 writes a PNG's ``parameters`` text chunk::

    a photo of TOK toy
    Negative prompt: blurry
    Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5, Seed: 42, Size: 1024x1024,
    Model: stabilityai/..., Adapter: dora, Adapter strength: 1, Adapter source: out/dora, Version: dora-diffusion 0.1.0

(the last line is one line), so ``parse_infotext`` (and A1111's "PNG Info") read them back. Samplers are named as
A1111 (1.9 and later) names them: the sampler, plus ``Schedule type: Karras`` for the Karras variants. A grid PNG
carries the shared settings plus ``Seeds`` and ``Columns`` (``base, dora 0, dora 0.5, lora 1``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from dora_diffusion._version import __version__
from dora_diffusion.compare.plan import (
    BASE_LABEL,
    SCHEDULERS,
    Cell,
    Column,
    CompareError,
    GenerationSettings,
    GridPlan,
    check_adapter_name,
    check_strength,
    parse_seeds,
)
from dora_diffusion.compare.png_text import read_png_text

_KARRAS = " Karras"


def a1111_sampler(scheduler: str) -> tuple[str, str | None]:
    """``"DPM++ 2M Karras"`` -> ``("DPM++ 2M", "Karras")``: A1111's ``Sampler`` and ``Schedule type`` fields."""
    if scheduler.endswith(_KARRAS):
        return scheduler[: -len(_KARRAS)], "Karras"
    return scheduler, None


def scheduler_from_a1111(sampler: str | None, schedule_type: str | None = None) -> str:
    """The scheduler of this page that A1111's ``Sampler`` (and ``Schedule type``) name; ``Default`` if none does.

    Reads both A1111's current form (``DPM++ 2M`` + ``Karras``) and its older single name (``DPM++ 2M Karras``).
    """
    if not sampler:
        return "Default"
    karras = (schedule_type or "").lower() == "karras" and not sampler.endswith(_KARRAS)
    name = f"{sampler}{_KARRAS}" if karras else sampler
    return name if name in SCHEDULERS else "Default"


def format_strength(k: float) -> str:
    """``1.0`` -> ``"1.00"``: two decimals, as the strength sliders step."""
    return f"{k:.2f}"


def column_name(column: Column) -> str:
    """A column in a few words: ``"base"`` or ``"dora 0.50"``."""
    return BASE_LABEL if column.adapter is None else f"{column.adapter} {format_strength(column.strength)}"


def caption(cell: Cell) -> str:
    """``"adapter · strength · seed"``, e.g. ``"dora · 1.00 · seed 42"``; the base model has no strength."""
    strength = "—" if cell.column.adapter is None else format_strength(cell.column.strength)
    return f"{cell.column.label} · {strength} · seed {cell.seed}"


def _quote(value: str) -> str:
    """A1111's quoting: values holding ``,``, ``:``, ``"`` or a newline are written as JSON strings."""
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ',:\n"') else value


def _infotext(settings: GenerationSettings, fields: dict[str, object], default_sampler: str) -> str:
    lines = [settings.prompt]
    if settings.negative_prompt:
        lines.append(f"Negative prompt: {settings.negative_prompt}")
    sampler, schedule_type = a1111_sampler(default_sampler if settings.scheduler == "Default" else settings.scheduler)
    params = {
        "Steps": settings.num_inference_steps,
        "Sampler": sampler,
        "Schedule type": schedule_type,
        "CFG scale": f"{settings.guidance_scale:g}",
        **fields,
        "Version": f"dora-diffusion {__version__}",
    }
    lines.append(", ".join(f"{k}: {_quote(str(v))}" for k, v in params.items() if v is not None))
    return "\n".join(lines)


def infotext(
    settings: GenerationSettings,
    cell: Cell,
    model: str,
    adapter_source: str | None = None,
    default_sampler: str = "Default",
) -> str:
    """The A1111-style ``parameters`` text of one cell, plus ``Adapter``, ``Adapter strength``, ``Adapter source``.

    ``default_sampler`` names the model's own scheduler (the ``Default`` choice), e.g. ``"Euler"``.
    """
    column = cell.column
    fields: dict[str, object] = {"Seed": cell.seed, "Size": f"{settings.width}x{settings.height}", "Model": model}
    if column.adapter is not None:
        fields |= {
            "Adapter": column.adapter,
            "Adapter strength": f"{column.strength:g}",
            "Adapter source": adapter_source,
        }
    return _infotext(settings, fields, default_sampler)


def column_text(column: Column) -> str:
    """A column in a grid's ``Columns`` field: ``base`` or ``dora 0.5``."""
    return BASE_LABEL if column.adapter is None else f"{column.adapter} {column.strength:g}"


def grid_infotext(plan: GridPlan, model: str, default_sampler: str = "Default") -> str:
    """The ``parameters`` text of a whole grid: shared settings plus ``Seeds`` and ``Columns``."""
    fields = {
        "Seeds": ", ".join(map(str, plan.seeds)),
        "Size": f"{plan.settings.width}x{plan.settings.height}",
        "Model": model,
        "Columns": ", ".join(column_text(c) for c in plan.columns),
    }
    return _infotext(plan.settings, fields, default_sampler)


MAX_PARAMETERS_LENGTH = 65_536
"""Longest ``parameters`` text read back (characters; bytes in a PNG): a cell's text is a few hundred."""
_KEY_PUNCTUATION = frozenset(" -/+")


def _is_key_char(c: str) -> bool:
    return c.isalnum() or c == "_" or c in _KEY_PUNCTUATION


def _quoted_end(line: str, start: int) -> int | None:
    """The index of the quote closing the JSON string that opens at ``line[start]``, or None."""
    i, n = start + 1, len(line)
    while i < n:
        if line[i] == "\\":
            i += 2
        elif line[i] == '"':
            return i
        else:
            i += 1
    return None


def _fields(line: str) -> list[tuple[str, str, bool]]:
    """``Key: value, Key: "quoted, value"`` -> ``[(key, value, quoted)]`` in one pass over ``line``.

    Reads what A1111's regular expression for this line reads (a key of word characters, spaces, ``-``, ``/``
    or ``+``; a value up to the next comma, or a JSON string followed by a comma or the end), in time linear
    in the line: a run of key characters not followed by ``:`` is skipped whole instead of being retried at
    each of its characters, which made the regular expression quadratic in the length of such a run.
    """
    out: list[tuple[str, str, bool]] = []
    i, n = 0, len(line)
    while i < n:
        j = i
        while j < n and line[j].isspace():
            j += 1
        if j >= n:
            break
        if not (line[j].isalnum() or line[j] == "_"):
            i = j + 1
            continue
        k = j
        while k < n and _is_key_char(line[k]):
            k += 1
        if k >= n or line[k] != ":":
            i = k  # every start inside the run ends at the same character: skip it whole
            continue
        key, v = line[j:k], k + 1
        while v < n and line[v].isspace():
            v += 1
        if v < n and line[v] == '"':
            end = _quoted_end(line, v)
            if end is not None and (end + 1 == n or line[end + 1] == ","):
                out.append((key, line[v : end + 1], True))
                i = end + 2
                continue
        comma = line.find(",", v)
        comma = n if comma < 0 else comma
        out.append((key, line[v:comma], False))
        i = comma + 1
    return out


def parse_infotext(text: str) -> dict[str, str]:
    """Read a ``parameters`` text back: ``{"Prompt": ..., "Negative prompt": ..., "Steps": "25", ...}``.

    Takes time linear in the text; raises ``CompareError`` for a text over ``MAX_PARAMETERS_LENGTH``
    characters or a quoted value that is not a JSON string.
    """
    if len(text) > MAX_PARAMETERS_LENGTH:
        raise CompareError(
            f"the generation parameters are {len(text)} characters long, more than {MAX_PARAMETERS_LENGTH}, the "
            "most this page reads"
        )
    lines = text.strip().split("\n")
    params: dict[str, str] = {}
    fields = _fields(lines[-1]) if lines else []
    if len(fields) >= 3:
        for key, value, quoted in fields:
            value = value.strip()
            if quoted:
                try:
                    value = json.loads(value)
                except ValueError as err:
                    raise CompareError(f"the value of {key.strip()!r} is not a readable quoted string ({err})") from None
            params[key.strip()] = value
        lines = lines[:-1]
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    return {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative), **params}


@dataclass(frozen=True)
class RestoredForm:
    """What a cell's or a grid's ``parameters`` text says, as the form holds it.

    ``strengths`` maps each adapter column to its strengths (one for a cell; a sweep has several);
    ``whole_grid`` is True for a grid PNG, whose columns replace the form's, and False for a cell, whose
    column is ticked beside the others.
    """

    settings: GenerationSettings
    seeds: tuple[int, ...]
    include_base: bool
    strengths: dict[str, list[float]]
    model: str | None
    whole_grid: bool


MAX_RESTORED_SEEDS = 1024
"""Most seeds a restored grid may list."""


def _columns(text: str) -> tuple[bool, dict[str, list[float]]]:
    """``"base, dora 0, dora 1"`` -> ``(True, {"dora": [0.0, 1.0]})``."""
    include_base, strengths = False, {}
    for item in (t.strip() for t in text.split(",") if t.strip()):
        if item == BASE_LABEL:
            include_base = True
            continue
        name, _, k = item.rpartition(" ")
        strengths.setdefault(check_adapter_name(name), []).append(check_strength(name, float(k)))
    return include_base, strengths


def restore_form(text: str) -> RestoredForm:
    """The form of a cell (``Seed``) or a whole grid (``Seeds`` and ``Columns``) from its ``parameters`` text.

    Raises ``CompareError`` if fields are missing, unreadable or out of range (every number is checked as the
    form checks it; a grid lists at most ``MAX_RESTORED_SEEDS`` seeds, counted before a range is expanded).
    """
    p = parse_infotext(text)
    whole_grid = "Seeds" in p and "Columns" in p
    missing = [k for k in ("Steps", "CFG scale", "Seed", "Size") if k not in p and not (k == "Seed" and whole_grid)]
    if missing:
        raise CompareError(f"these generation parameters have no {', '.join(missing)}")
    try:
        width, height = (int(v) for v in p["Size"].split("x"))
        steps, guidance = int(p["Steps"]), float(p["CFG scale"])
        if whole_grid:
            seeds = tuple(parse_seeds(p["Seeds"], MAX_RESTORED_SEEDS))
            include_base, strengths = _columns(p["Columns"])
        else:
            seeds = tuple(parse_seeds(p["Seed"], 1))
            adapter = p.get("Adapter")
            include_base, strengths = adapter is None, {}
            if adapter is not None:
                strengths = {check_adapter_name(adapter): [check_strength(adapter, float(p.get("Adapter strength", 1.0)))]}
    except (ValueError, CompareError) as err:
        raise CompareError(f"unreadable generation parameters ({err})") from None
    scheduler = scheduler_from_a1111(p.get("Sampler"), p.get("Schedule type"))
    settings = GenerationSettings(p["Prompt"], p["Negative prompt"], steps, guidance, width, height, scheduler)
    return RestoredForm(settings, seeds, include_base, strengths, p.get("Model"), whole_grid)


# ----------------------------------------------------------------------------------------------- PNG text


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
    """The ``parameters`` text of a PNG file, read without decoding its pixels (``png_text.read_png_text``).

    Raises ``CompareError`` for a file that is not a PNG, a damaged or duplicated ``parameters`` chunk, a text
    over ``MAX_PARAMETERS_LENGTH`` bytes, or a PNG without one.
    """
    try:
        text = read_png_text(path, "parameters", MAX_PARAMETERS_LENGTH)
    except OSError as err:
        raise CompareError(f"{Path(path).name} cannot be read ({err.strerror or err})") from None
    if not text:
        raise CompareError(f"{Path(path).name} carries no generation parameters (no PNG 'parameters' text)")
    return text
