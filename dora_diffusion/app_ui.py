"""The Gradio page of ``app.py``: adapters side by side at fixed seeds.

The page has a "Compare" tab (the form on the left, results on the right) and room for more tabs
(``extra_tabs``). Its events:

- Generate: a quick check of the form (never waiting behind a running grid), so a mistake shows at once;
  then ``/generate``, queued with one job at a time, which yields the gallery after every cell and ends
  with the grid PNG. Stop cancels it after the current denoising step.
- ``/add_adapter``: loads an adapter once into the shared pipeline and shows its checkbox and slider.
- ``/restore``: fills the form from a PNG this page made (its ``parameters`` text).

Errors (``gr.Error``) appear on the page; they change no input, so nothing typed is lost.
"""

from __future__ import annotations

import queue
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import gradio as gr

from .compare import (
    MAX_GUIDANCE,
    MAX_SIDE,
    MAX_STEPS,
    MAX_STRENGTH,
    MIN_SIDE,
    SCHEDULERS,
    AdapterInfo,
    CompareError,
    Comparer,
    GenerationSettings,
    GridPlan,
    default_adapter_name,
    grid_infotext,
    read_parameters,
    restore_cell,
    save_png,
)
from .formats import AdapterFileError

MAX_SLOTS = 12
"""Most adapters the page shows (a checkbox and a strength slider each)."""
KEEP_RUNS = 8
"""Output folders of the most recent grids kept on disk; older ones are deleted."""


class _Runs:
    """Output folders of grids (one per run) and the Stop flags of browser sessions."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="dora-diffusion-app-"))
        self._count = 0
        self._stop: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def new_dir(self) -> Path:
        with self._lock:
            self._count += 1
            path = self.root / f"run{self._count:05d}"
            path.mkdir()
            for old in sorted(self.root.iterdir())[:-KEEP_RUNS]:
                shutil.rmtree(old, ignore_errors=True)
        return path

    def start_job(self, session: str) -> threading.Event:
        """A fresh Stop flag for the grid this browser session starts."""
        with self._lock:
            self._stop[session] = flag = threading.Event()
        return flag

    def stop(self, session: str) -> None:
        with self._lock:
            flag = self._stop.get(session)
        if flag is not None:
            flag.set()


def _render_in_background(comparer: Comparer, plan, stop: threading.Event, heartbeat: float = 0.5) -> Iterator[tuple]:
    """Render ``plan`` in a worker thread; yield ``("step", k, step)``, ``("cell", result)`` and ``("tick",)``.

    Something is yielded after every denoising step and at least every ``heartbeat`` seconds, so Gradio can
    cancel the caller between two yields. Closing this generator (which cancelling does) sets ``stop``; the
    worker then ends the grid after its current denoising step.
    """
    events: queue.Queue = queue.Queue()

    def work() -> None:
        try:
            for result in comparer.render(plan, lambda k, step: events.put(("step", k, step)), stop.is_set):
                events.put(("cell", result))
        except BaseException as err:  # handed to the caller, which raises it on the page
            events.put(("error", err))
        events.put(("end",))

    threading.Thread(target=work, name="dora-diffusion-grid", daemon=True).start()
    try:
        while True:
            try:
                event = events.get(timeout=heartbeat)
            except queue.Empty:
                event = ("tick",)
            if event[0] == "end":
                return
            if event[0] == "error":
                raise _error(event[1])
            yield event
    finally:
        stop.set()


def _slot_info(info: AdapterInfo) -> str:
    """The line under an adapter's checkbox: what it is and (the end of) where it came from."""
    source = info.source if len(info.source) <= 48 else "…" + info.source[-47:]
    return f"{info.summary} · {source}"


def _default_cell(plan, n_done: int) -> int:
    """Gallery index whose parameters and snippet show first: the first adapter cell, else the first cell."""
    first_adapter = 1 if plan.columns[0].adapter is None and len(plan.columns) > 1 else 0
    return min(first_adapter, n_done - 1)


def _error(err: Exception) -> gr.Error:
    """An error shown on the page for 15 s (or until closed); the message names what to change."""
    return gr.Error(str(err), duration=15, print_exception=False)


def build_ui(
    comparer: Comparer,
    settings: GenerationSettings | None = None,
    seeds: str = "0-3",
    extra_tabs: Mapping[str, Callable[[Comparer], None]] | None = None,
    title: str = "DoRA vs LoRA: adapters side by side",
    max_queue: int = 16,
) -> gr.Blocks:
    """The page for ``comparer``, with its queue set up (one job at a time, at most ``max_queue`` waiting).

    The form starts at ``settings`` (default: an empty prompt at the base model's native size) and ``seeds``.
    ``extra_tabs`` maps a tab title to a function that builds the tab's content from ``comparer`` (the
    Analysis tab of ``dora_diffusion.analysis`` plugs in here).
    """
    if settings is None:
        settings = GenerationSettings("", width=comparer.default_size, height=comparer.default_size)
    runs = _Runs()
    if len(comparer.adapters) > MAX_SLOTS:
        raise ValueError(f"the page shows at most {MAX_SLOTS} adapters, {len(comparer.adapters)} are loaded")

    with gr.Blocks(title=title, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(f"## {title}")
        gr.Markdown(
            f"Base model `{comparer.model}` on {comparer.device.type} ({str(comparer.dtype).removeprefix('torch.')}). "
            "Every cell uses the same prompt, settings and seed: the adapter is the only difference between columns. "
            f"One grid runs at a time, at most {comparer.max_cells} images."
        )
        with gr.Tabs():
            with gr.Tab("Compare", id="compare"):
                on_load, load_outputs = _compare_tab(comparer, settings, seeds, runs)
            # More tabs: each builder fills its own gr.Tab and can use the comparer's pipeline and adapters.
            for tab_title, build_tab in (extra_tabs or {}).items():
                with gr.Tab(tab_title):
                    build_tab(comparer)
        demo.load(on_load, None, load_outputs, queue=False, api_visibility="private")
    demo.queue(max_size=max_queue, default_concurrency_limit=1)
    return demo


def _compare_tab(
    comparer: Comparer, d: GenerationSettings, default_seeds: str, runs: _Runs
) -> tuple[Callable, list[gr.components.Component]]:
    """The form and results of the Compare tab and their events; returns the page-load hook and its outputs."""
    loaded = comparer.adapters
    with gr.Row():
        with gr.Column(scale=2, min_width=360):
            prompt = gr.Textbox(d.prompt, label="Prompt", lines=2, placeholder="a photo of TOK ...", elem_id="prompt")
            negative = gr.Textbox(d.negative_prompt, label="Negative prompt", elem_id="negative-prompt")
            with gr.Row():
                seeds = gr.Textbox(
                    default_seeds, label="Seeds", info="one row each: '0, 7, 42' or a range '0-3'", elem_id="seeds"
                )
                scheduler = gr.Dropdown(list(SCHEDULERS), value=d.scheduler, label="Scheduler", elem_id="scheduler")
            with gr.Row():
                steps = gr.Slider(1, MAX_STEPS, d.num_inference_steps, step=1, label="Steps", elem_id="steps")
                guidance = gr.Slider(
                    0, MAX_GUIDANCE, d.guidance_scale, step=0.5, label="Guidance scale", elem_id="guidance"
                )
            with gr.Row():
                width = gr.Slider(MIN_SIDE, MAX_SIDE, d.width, step=8, label="Width", elem_id="width")
                height = gr.Slider(MIN_SIDE, MAX_SIDE, d.height, step=8, label="Height", elem_id="height")

            gr.Markdown("**Columns**")
            include_base = gr.Checkbox(True, label="base model", info="no adapter", elem_id="include-base")
            slots, checks, strengths = [], [], []
            for i in range(MAX_SLOTS):
                info = loaded[i] if i < len(loaded) else None
                with gr.Group(visible=info is not None, elem_id=f"slot-{i}") as slot:
                    checks.append(
                        gr.Checkbox(
                            info is not None,
                            label=info.name if info else f"adapter {i + 1}",
                            info=_slot_info(info) if info else None,
                            elem_id=f"use-{i}",
                        )
                    )
                    strengths.append(
                        gr.Slider(0, MAX_STRENGTH, 1.0, step=0.05, label="strength", elem_id=f"strength-{i}")
                    )
                slots.append(slot)

            with gr.Accordion("Add an adapter", open=False):
                add_source = gr.Textbox(label="Local path or Hub repo id", placeholder="runs/my-dora  or  user/repo")
                add_upload = gr.File(label="…or upload a .safetensors file", file_types=[".safetensors"])
                add_name = gr.Textbox(label="Column name (optional)", placeholder="derived from the file name")
                add_button = gr.Button("Load adapter")
                add_status = gr.Markdown()
            with gr.Accordion("Restore settings from a PNG made here", open=False):
                restore_upload = gr.File(label="PNG with generation parameters", file_types=["image"])

            with gr.Row():
                generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                stop_button = gr.Button("Stop", variant="stop", elem_id="stop")
            selection = gr.JSON(visible=False)

        with gr.Column(scale=3, min_width=480):
            gallery = gr.Gallery(
                label="Rows: seeds · columns: adapters",
                columns=1 + len(loaded),
                object_fit="contain",
                height="auto",
                elem_id="gallery",
            )
            grid_file = gr.File(label="Grid PNG with legends", elem_id="grid-file")
            cell_info = gr.Textbox(label="Parameters of the chosen cell (PNG text 'parameters')", lines=3)
            snippet = gr.Code(
                language="python",
                label="Reproduce the chosen cell with diffusers",
                interactive=False,
                elem_id="snippet",
            )
            results = gr.State([])

    form = [prompt, negative, seeds, steps, guidance, width, height, scheduler, include_base]

    def plan(fields: Sequence, adapters) -> GridPlan:
        """The checked grid plan of a request; bad input raises a ``gr.Error`` that names it."""
        prompt, negative_prompt, seeds, steps, guidance_scale, width, height, scheduler, include_base = fields
        try:
            if adapters is not None and not isinstance(adapters, dict):
                raise CompareError(f"adapters must be a {{name: strength}} mapping, got {type(adapters).__name__}")
            settings = GenerationSettings(
                prompt or "", negative_prompt or "", steps, guidance_scale, width, height, scheduler
            )
            return comparer.plan(settings, seeds or "", adapters or {}, bool(include_base))
        except CompareError as err:
            raise _error(err) from None

    def check(*values):
        """Check the form and turn the ticked slots into ``{adapter: strength}`` for /generate."""
        fields, ticks, levels = values[: len(form)], values[len(form) : -MAX_SLOTS], values[-MAX_SLOTS:]
        names = [a.name for a in comparer.adapters]
        chosen = {name: float(levels[i]) for i, name in enumerate(names[:MAX_SLOTS]) if ticks[i]}
        plan(fields, chosen)
        return chosen

    def generate(
        prompt: str,
        negative_prompt: str,
        seeds: str,
        num_inference_steps: float,
        guidance_scale: float,
        width: float,
        height: float,
        scheduler: str,
        include_base: bool,
        adapters: dict[str, float],
        request: gr.Request,
        progress=gr.Progress(),
    ):
        """Render the grid: one column per adapter in ``adapters`` ({name: strength}) and the base model if
        ``include_base``, one row per seed. Yields the gallery after each cell, then the grid PNG."""
        form_values = (prompt, negative_prompt, seeds, num_inference_steps, guidance_scale, width, height, scheduler)
        p = plan((*form_values, include_base), adapters)
        stop = runs.start_job(request.session_hash or "")
        out = runs.new_dir()
        n, n_steps, n_cols = len(p), p.settings.num_inference_steps, len(p.columns)
        progress((0, n * n_steps), desc=f"cell 1 of {n}")
        done, items, infos = [], [], []
        for event in _render_in_background(comparer, p, stop):
            if event[0] == "step":
                k, step = event[1:]
                progress((k * n_steps + step, n * n_steps), desc=f"cell {k + 1} of {n} · step {step} of {n_steps}")
            if event[0] != "cell":
                yield (gr.skip(),) * 5  # lets a cancellation (Stop, a client's cancel) in between two steps
                continue
            result = event[1]
            c = result.cell
            path = save_png(
                result.image, out / f"r{c.row:02d}c{c.col:02d}_{c.column.label}_seed{c.seed}.png", result.infotext
            )
            done.append(result)
            items.append((str(path), result.caption))
            infos.append({"infotext": result.infotext, "snippet": comparer.snippet(p, c), "caption": result.caption})
            # the first yield also sets the gallery's column count; later ones send plain values
            gallery_value = gr.Gallery(items, columns=n_cols) if len(items) == 1 else list(items)
            shown = infos[_default_cell(p, len(infos))]
            yield gallery_value, gr.skip(), shown["infotext"], shown["snippet"], infos
        if len(done) < n:
            return
        grid = save_png(comparer.grid(p, done), out / "grid.png", grid_infotext(p, comparer.model))
        shown = infos[_default_cell(p, len(infos))]
        yield list(items), str(grid), shown["infotext"], shown["snippet"], infos

    def request_stop(request: gr.Request) -> None:
        runs.stop(request.session_hash or "")

    def show_cell(infos: list[dict], evt: gr.SelectData):
        if not infos or evt.index is None or evt.index >= len(infos):
            return gr.skip(), gr.skip()
        return infos[evt.index]["infotext"], infos[evt.index]["snippet"]

    def show_slots(first_new: int):
        """Updates showing the slots of the loaded adapters; those from ``first_new`` on are also ticked at 1."""
        adapters = comparer.adapters
        groups, ticks, levels = [gr.skip()] * MAX_SLOTS, [gr.skip()] * MAX_SLOTS, [gr.skip()] * MAX_SLOTS
        for i, a in enumerate(adapters[:MAX_SLOTS]):
            groups[i] = gr.Group(visible=True)
            if i >= first_new:
                ticks[i], levels[i] = gr.Checkbox(True, label=a.name, info=_slot_info(a)), gr.Slider(value=1.0)
            else:
                ticks[i] = gr.Checkbox(label=a.name, info=_slot_info(a))
        return groups, ticks, levels

    def add_adapter(source: str, upload: str | None, name: str):
        """Load an adapter from a local path, a Hub repo id, or an uploaded .safetensors file."""
        source = (source or "").strip()
        if source and upload:
            raise _error(CompareError("give a path or Hub repo id, or upload a file — not both"))
        if len(comparer.adapters) >= MAX_SLOTS:
            raise _error(CompareError(f"the page shows at most {MAX_SLOTS} adapters"))
        if upload and not (name or "").strip():
            name = default_adapter_name(Path(upload).name, [a.name for a in comparer.adapters])  # not the cache folder
        try:
            info = comparer.add_adapter(upload or source, name)
        except (CompareError, AdapterFileError, OSError, ValueError, RuntimeError) as err:
            raise _error(err) from None
        except Exception as err:  # e.g. a Hub error: show it and keep serving
            raise _error(RuntimeError(f"could not load {upload or source!r}: {type(err).__name__}: {err}")) from None
        groups, ticks, levels = show_slots(len(comparer.adapters) - 1)
        status = f"Loaded **{info.name}**: {info.summary}, from `{info.source}`."
        return status, *groups, *ticks, *levels

    def restore(path: str | None):
        """Fill the form with a cell's settings and seed, and tick its column (other columns stay as they are)."""
        if not path:
            return [gr.skip()] * (len(form) + 2 * MAX_SLOTS)
        try:
            cell = restore_cell(read_parameters(path))
        except CompareError as err:
            raise _error(err) from None
        s = cell.settings
        updates = [
            s.prompt,
            s.negative_prompt,
            str(cell.seed),
            s.num_inference_steps,
            s.guidance_scale,
            s.width,
            s.height,
            s.scheduler,
            True if cell.adapter is None else gr.skip(),
        ]
        check_u, strength_u = [gr.skip()] * MAX_SLOTS, [gr.skip()] * MAX_SLOTS
        names = [a.name for a in comparer.adapters]
        if cell.adapter is not None:
            if cell.adapter in names:
                i = names.index(cell.adapter)
                check_u[i], strength_u[i] = True, cell.strength
            else:
                gr.Warning(f"adapter {cell.adapter!r} of this image is not loaded; add it under 'Add an adapter'")
        if cell.model and cell.model != comparer.model:
            gr.Warning(f"this image was made with base model {cell.model!r}, this page runs {comparer.model!r}")
        return *updates, *check_u, *strength_u

    # queued (Gradio 6 shows no error toast for unqueued events), but in its own group with no limit, so a
    # mistake shows at once even while another grid runs
    checked = generate_button.click(
        check, form + checks + strengths, selection, concurrency_limit=None, api_visibility="private"
    )
    running = checked.success(
        generate,
        form + [selection],
        [gallery, grid_file, cell_info, snippet, results],
        api_name="generate",
        concurrency_id="pipeline",
        concurrency_limit=1,
    )
    stop_button.click(request_stop, None, None, cancels=[running], queue=False, api_visibility="private")
    gallery.select(show_cell, results, [cell_info, snippet], queue=False, api_visibility="private")
    add_button.click(
        add_adapter,
        [add_source, add_upload, add_name],
        [add_status, *slots, *checks, *strengths],
        api_name="add_adapter",
        concurrency_id="pipeline",
        concurrency_limit=1,
    )
    restore_upload.upload(restore, restore_upload, form + checks + strengths, api_name="restore")

    def on_load():
        """When a page opens, show the adapters added (from other browser tabs) since start-up."""
        groups, ticks, _ = show_slots(len(loaded))
        return *groups, *ticks

    return on_load, slots + checks


def analysis_tab(comparer: Comparer) -> None:
    """The "Analysis" tab (DoRA paper, Figure 2) for the adapters loaded in ``comparer``; call inside a ``gr.Tab``."""
    from .analysis import analysis_plot_for

    def run() -> tuple[str | None, str]:
        try:
            with comparer.lock:
                path, markdown = analysis_plot_for(comparer.pipe)
        except (ValueError, RuntimeError) as err:  # no adapter loaded, or fused weights
            return None, f"**{err}**"
        return str(path), markdown

    gr.Markdown(
        "How much each adapter changed the **magnitude** (ΔM, mean |m′ − m0| of the output-channel norms) and the "
        "**direction** (ΔD, mean 1 − cos) of every adapted module, at strength 1. One point per module. "
        "The paper found a negative slope for full fine-tuning and DoRA, a positive one for LoRA."
    )
    button = gr.Button("Analyse loaded adapters", variant="primary")
    image = gr.Image(label="ΔM vs ΔD", type="filepath", interactive=False)
    summary = gr.Markdown()
    button.click(run, outputs=[image, summary], api_name="analysis")
