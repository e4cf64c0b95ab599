"""The Compare tab's form: its components, and its values carried as one small dataclass.

``Form`` holds the components (the shared settings and one ``Slot`` per adapter: a checkbox, a strength slider
and an optional sweep of strengths). ``FormValues`` holds what a person entered, read from Gradio's
``{component: value}`` dict; ``FormValues.adapters()`` turns the ticked slots into the ``{name: strength or
[strengths]}`` mapping that ``Comparer.plan_grid`` and ``/generate`` take.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import gradio as gr

from dora_diffusion.compare import (
    MAX_GUIDANCE,
    MAX_SIDE,
    MAX_STEPS,
    MAX_STRENGTH,
    MIN_SIDE,
    SCHEDULERS,
    AdapterInfo,
    GenerationSettings,
    RestoredForm,
    parse_strengths,
)

MAX_SLOTS = 12
"""Most adapters the page shows (a checkbox, a strength slider and a sweep box each)."""


def slot_info(info: AdapterInfo) -> str:
    """The line under an adapter's checkbox: what it is and (the end of) where it came from."""
    source = info.source if len(info.source) <= 48 else "…" + info.source[-47:]
    return f"{info.summary} · {source}"


@dataclass
class Slot:
    """The components of one adapter column: tick, strength, sweep (strengths, one column each)."""

    group: gr.Group
    check: gr.Checkbox
    strength: gr.Slider
    sweep: gr.Textbox


@dataclass
class Form:
    """The components of the form, in the order ``/generate`` takes them."""

    prompt: gr.Textbox
    negative: gr.Textbox
    seeds: gr.Textbox
    steps: gr.Slider
    guidance: gr.Slider
    width: gr.Slider
    height: gr.Slider
    scheduler: gr.Dropdown
    include_base: gr.Checkbox
    slots: list[Slot] = field(default_factory=list)
    slot_names: gr.State | None = None
    """The adapter each slot shows on this page, in slot order (pages opened earlier may lag behind the server)."""

    @property
    def fields(self) -> list[gr.components.Component]:
        """The shared settings, in ``/generate``'s order."""
        return [self.prompt, self.negative, self.seeds, self.steps, self.guidance, self.width, self.height,
                self.scheduler, self.include_base]  # fmt: skip

    @property
    def slot_inputs(self) -> list[gr.components.Component]:
        return [c for s in self.slots for c in (s.check, s.strength, s.sweep)]

    @property
    def everything(self) -> list[gr.components.Component]:
        return self.fields + self.slot_inputs


@dataclass(frozen=True)
class SlotValues:
    ticked: bool
    strength: float
    sweep: str


@dataclass(frozen=True)
class FormValues:
    """What a person entered: the shared settings (as Gradio gives them) and the adapter slots."""

    prompt: str
    negative_prompt: str
    seeds: str
    num_inference_steps: float
    guidance_scale: float
    width: float
    height: float
    scheduler: str
    include_base: bool
    slots: tuple[SlotValues, ...] = ()

    @classmethod
    def read(cls, form: Form, data: Mapping[gr.components.Component, object]) -> FormValues:
        """The values of ``form`` from Gradio's ``{component: value}`` dict (an event with a set of inputs)."""
        return cls(*(data[c] for c in form.fields), slots=read_slots(form, data))

    def settings(self) -> GenerationSettings:
        """The shared settings, checked (``CompareError`` names a bad one)."""
        return GenerationSettings(
            self.prompt or "", self.negative_prompt or "", self.num_inference_steps, self.guidance_scale,
            self.width, self.height, self.scheduler,
        )  # fmt: skip

    def adapters(self, names: Sequence[str]) -> dict[str, float | list[float]]:
        """``{name: strength}`` of the ticked slots (``names`` in slot order); a sweep gives a list of strengths."""
        out: dict[str, float | list[float]] = {}
        for name, slot in zip(names, self.slots):
            if slot.ticked:
                sweep = parse_strengths(slot.sweep, name)
                out[name] = sweep if sweep else slot.strength
        return out


def read_slots(form: Form, data: Mapping[gr.components.Component, object]) -> tuple[SlotValues, ...]:
    """The values of every slot of ``form`` from Gradio's ``{component: value}`` dict."""
    return tuple(SlotValues(bool(data[s.check]), float(data[s.strength]), str(data[s.sweep] or "")) for s in form.slots)


def build_form(d: GenerationSettings, default_seeds: str, loaded: Sequence[AdapterInfo]) -> Form:
    """The form's components (call inside a ``gr.Column``), showing one slot per loaded adapter."""
    prompt = gr.Textbox(
        d.prompt, label="Prompt", lines=2, elem_id="prompt",
        placeholder="(empty) describe the image, with your adapters' trigger words; Ctrl+Enter generates",
    )  # fmt: skip
    negative = gr.Textbox(d.negative_prompt, label="Negative prompt", elem_id="negative-prompt")
    with gr.Row():
        seeds = gr.Textbox(
            default_seeds, label="Seeds", info="one row each: '0, 7, 42' or a range '0-3'", elem_id="seeds"
        )
        scheduler = gr.Dropdown(list(SCHEDULERS), value=d.scheduler, label="Scheduler", elem_id="scheduler")
    with gr.Row():
        steps = gr.Slider(1, MAX_STEPS, d.num_inference_steps, step=1, label="Steps", elem_id="steps")
        guidance = gr.Slider(0, MAX_GUIDANCE, d.guidance_scale, step=0.5, label="Guidance scale", elem_id="guidance")
    with gr.Row():
        width = gr.Slider(MIN_SIDE, MAX_SIDE, d.width, step=8, label="Width", elem_id="width")
        height = gr.Slider(MIN_SIDE, MAX_SIDE, d.height, step=8, label="Height", elem_id="height")

    gr.Markdown("**Columns** · a sweep ('0, 0.5, 1, 1.5') gives an adapter one column per strength")
    include_base = gr.Checkbox(True, label="base model", info="no adapter", elem_id="include-base")
    form = Form(prompt, negative, seeds, steps, guidance, width, height, scheduler, include_base)
    for i in range(MAX_SLOTS):
        info = loaded[i] if i < len(loaded) else None
        with gr.Group(visible=info is not None, elem_id=f"slot-{i}") as group:
            check = gr.Checkbox(
                info is not None,
                label=info.name if info else f"adapter {i + 1}",
                info=slot_info(info) if info else None,
                elem_id=f"use-{i}",
            )
            with gr.Row():
                strength = gr.Slider(
                    0, MAX_STRENGTH, 1.0, step=0.05, label="strength", elem_id=f"strength-{i}", scale=2
                )
                sweep = gr.Textbox(
                    "", label="sweep (optional)", placeholder="0, 0.5, 1, 1.5", elem_id=f"sweep-{i}", scale=1
                )
        form.slots.append(Slot(group, check, strength, sweep))
    form.slot_names = gr.State([a.name for a in loaded])
    return form


FRESH_SLOT = SlotValues(True, 1.0, "")
"""A slot shown anew: ticked, strength 1, no sweep."""


def synced_slots(
    page_names: Sequence[str], adapters: Sequence[AdapterInfo], kept: Mapping[str, SlotValues] | None = None
) -> list[SlotValues | None]:
    """Values for ``slot_updates`` that bring a page whose slots show ``page_names`` to ``adapters``.

    An adapter gets its ``kept`` values if any; else ``None`` (leave the slot as it is) if its slot already shows
    it; else ``FRESH_SLOT``.
    """
    kept = kept or {}
    out: list[SlotValues | None] = []
    for i, a in enumerate(adapters):
        if a.name in kept:
            out.append(kept[a.name])
        elif i < len(page_names) and page_names[i] == a.name:
            out.append(None)
        else:
            out.append(FRESH_SLOT)
    return out


def slot_updates(adapters: Sequence[AdapterInfo], values: Sequence[SlotValues | None]) -> list:
    """Updates for every slot (group, check, strength, sweep, flattened): slot ``i`` shows ``adapters[i]`` with
    ``values[i]`` (``None``: leave its values as they are); slots past the adapters are hidden."""
    out: list = []
    for i in range(MAX_SLOTS):
        if i >= len(adapters):
            out += [gr.Group(visible=False), gr.Checkbox(False), gr.skip(), gr.skip()]
            continue
        a, v = adapters[i], values[i] if i < len(values) else None
        out.append(gr.Group(visible=True))
        if v is None:
            out += [gr.Checkbox(label=a.name, info=slot_info(a)), gr.skip(), gr.skip()]
        else:
            out += [gr.Checkbox(v.ticked, label=a.name, info=slot_info(a)), gr.Slider(value=v.strength), v.sweep]
    return out


def restored_updates(form: Form, restored: RestoredForm, names: Sequence[str]) -> tuple[list, list[str]]:
    """Updates for ``form.everything`` from a restored PNG, and the adapters it names that are not loaded.

    A grid PNG sets every column (adapters it lacks are unticked); a cell PNG ticks its own column and leaves
    the others as they are. An adapter with several strengths gets them as its sweep.
    """
    s = restored.settings
    seeds = ", ".join(map(str, restored.seeds))
    base = restored.include_base if restored.whole_grid else (True if restored.include_base else gr.skip())
    updates: list = [s.prompt, s.negative_prompt, seeds, s.num_inference_steps, s.guidance_scale, s.width, s.height,
                     s.scheduler, base]  # fmt: skip
    for i in range(len(form.slots)):
        name = names[i] if i < len(names) else None
        strengths = restored.strengths.get(name) if name else None
        if strengths is None:
            updates += [False if restored.whole_grid and name else gr.skip(), gr.skip(), gr.skip()]
        elif len(strengths) == 1:
            updates += [True, strengths[0], ""]
        else:
            updates += [True, gr.skip(), ", ".join(f"{k:g}" for k in strengths)]
    missing = [n for n in restored.strengths if n not in names]
    return updates, missing
