"""The Gradio page of ``app.py``: adapters side by side at fixed seeds.

The page has a "Compare" tab (the form on the left, results on the right) and room for more tabs
(``extra_tabs``). Its events (handlers in ``events``, form in ``form``):

- Generate (or Ctrl+Enter): a quick check of the form (never waiting behind a running grid), so a mistake shows
  at once; then ``/generate``, queued with one job at a time, which yields the gallery after every cell and ends
  with the difference maps, the grid PNG (shown and downloadable), scores per column and a message. Stop ends
  the grid within the current denoising step and keeps the cells done so far as a partial grid.
- ``/add_adapter`` / ``/remove_adapter``: load an adapter once into the shared pipeline, or unload one.
- ``/restore``: fills the form from a PNG this page made: a cell, or a whole grid (all its seeds and columns).

Errors appear as toasts; those of Load adapter, Remove and Restore also stay written on the message area, which
alone carries their error status (no badge on the form). No error changes an input, so nothing typed is lost.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import gradio as gr

from dora_diffusion.app.analysis import analysis_tab
from dora_diffusion.app.events import CompareEvents, Results, Runs
from dora_diffusion.app.form import MAX_SLOTS, build_form
from dora_diffusion.compare import Comparer, GenerationSettings, Scorer
from dora_diffusion.compare.sources import AdapterSources

__all__ = ["ComparePage", "analysis_tab", "banner", "build_ui", "default_upload_dir"]

PAGE_CSS = """
#gallery .grid-container, #differences .grid-container {
  grid-template-columns: repeat(var(--grid-cols), minmax(0, 1fr)) !important;
  grid-template-rows: none !important; grid-auto-rows: auto !important;
}
#gallery .thumbnail-item, #differences .thumbnail-item {
  aspect-ratio: auto !important; height: auto !important; display: flex !important; flex-direction: column;
}
#gallery .thumbnail-item > img, #differences .thumbnail-item > img {
  aspect-ratio: 1 / 1; height: auto !important; flex: none;
}
#gallery .caption-label, #differences .caption-label {
  position: static !important; white-space: normal !important; max-width: 100% !important;
  overflow: visible !important; text-overflow: clip !important; overflow-wrap: normal !important;
  word-break: normal !important; border: none !important; border-radius: 0 !important; font-size: 11px;
  line-height: 1.2; padding: 2px 3px !important;
}
#gallery .meta-text, #scores .meta-text { display: none !important; }
#banner code { overflow-wrap: anywhere; word-break: break-all; }
#grid-image img { object-fit: contain !important; width: 100%; height: auto; }
#grid-image .image-frame { padding-top: 40px; }
#scores th, #scores th * { word-break: normal !important; overflow-wrap: normal !important; hyphens: none !important; }
#gallery .grid-wrap, #differences .grid-wrap { padding-top: 36px !important; }
.gradio-container { overflow: clip !important; }
@media (max-width: 768px) {
  #actions { position: sticky; bottom: 0; z-index: 20; background: var(--background-fill-primary);
             padding: 6px 0; flex-wrap: nowrap !important; box-shadow: 0 -2px 6px rgba(0, 0, 0, 0.12); }
  #actions > * { min-width: 0 !important; }
  #scores th, #scores td { padding: 0 !important; }
  #scores .cell-wrap { padding: 3px 1px !important; }
  #scores .header-content { gap: 0 !important; }
  #scores .cell-menu-button { display: none !important; }
  #scores th, #scores th *, #scores .body-cell, #scores .body-cell * {
    font-family: "DejaVu Sans", sans-serif !important; font-size: 11.5px !important; }
  #scores .body-cell, #scores .body-cell * { word-break: normal !important; overflow-wrap: normal !important; }
}
"""
"""Gallery captions sit under their image and wrap between words (never cut with '…', never covering the image,
which matters most for difference maps), and the gallery's columns shrink to the page instead of scrolling
sideways on a phone; the progress shows only its text (no elapsed-time counter, which restarts at every step);
table headers wrap between words only; a path in the banner wraps anywhere rather than being cut; the grid PNG starts below its label and buttons, which float over the
image's top corners, and so do the galleries' cells; on a phone the Generate / Stop row stays at the bottom of the
screen while the form scrolls (the page's container clips instead of hiding overflow, which would stop that)."""
PAGE_FONTS = ["DejaVu Sans", "Liberation Sans", "Helvetica", "Arial", "system-ui", "sans-serif"]
PAGE_MONO_FONTS = ["DejaVu Sans Mono", "Liberation Mono", "Menlo", "Consolas", "monospace"]
"""Fonts installed on the machine: the default theme's web fonts come from Google and cannot load offline (a
fallback font then drew some letters, like the capital A of DoRA, in another face)."""
PAGE_JS = """
() => {
  document.addEventListener("keydown", (e) => {
    if ((e.ctrlKey || e.metaKey) && e.key === "Enter") {
      const button = document.querySelector("#generate");
      if (button) { e.preventDefault(); button.click(); }
    }
  });
}
"""
"""Ctrl+Enter (Cmd+Enter) anywhere on the page clicks Generate."""


def default_upload_dir() -> Path:
    """``$XDG_CACHE_HOME/dora-diffusion/uploads`` or ``~/.cache/dora-diffusion/uploads``: uploaded adapters."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dora-diffusion" / "uploads"


class ComparePage(gr.Blocks):
    """``gr.Blocks`` whose ``launch`` adds the page's CSS, its local fonts and its Ctrl+Enter shortcut."""

    def launch(self, *args, css: str | None = None, js: str | None = None, theme=None, **kwargs):
        theme = theme or gr.themes.Default(font=PAGE_FONTS, font_mono=PAGE_MONO_FONTS)
        return super().launch(*args, css=PAGE_CSS + (css or ""), js=js or PAGE_JS, theme=theme, **kwargs)


def banner(comparer: Comparer, host: str | None) -> str:
    """The line under the title: base model, device, and who can reach the page."""
    reach = (
        "Served on this machine only (127.0.0.1); `--share` opens a public gradio.live link, "
        "`--host 0.0.0.0` the network."
        if host in (None, "127.0.0.1", "localhost")
        else f"Served on {host}."
    )
    return (
        f"Base model `{comparer.model}` on {comparer.device.type} ({str(comparer.dtype).removeprefix('torch.')}). "
        "Every cell uses the same prompt, settings and seed: the adapter and its strength are the only difference "
        f"between columns. One grid runs at a time, at most {comparer.max_cells} images. {reach}"
    )


def build_ui(
    comparer: Comparer,
    settings: GenerationSettings | None = None,
    seeds: str = "0-3",
    extra_tabs: Mapping[str, Callable[[Comparer], None]] | None = None,
    title: str = "DoRA vs LoRA: adapters side by side",
    max_queue: int = 16,
    scorer: Scorer | None = None,
    upload_dir: str | os.PathLike | None = None,
    host: str | None = None,
    allow_dirs: Sequence[str | os.PathLike] = (),
) -> gr.Blocks:
    """The page for ``comparer``, with its queue set up (one job at a time, at most ``max_queue`` waiting).

    The form starts at ``settings`` (default: the base model's native size) and ``seeds``; an empty prompt is
    filled with the loaded adapters' trigger words (``Comparer.trigger_prompt``), at start and whenever an adapter
    is added while the prompt is empty.
    ``extra_tabs`` maps a tab title to a function that builds the tab's content from ``comparer`` (the
    Analysis tab of ``dora_diffusion.app.analysis`` plugs in here). ``scorer`` scores each column
    (``compare.make_scorer``; None: no scores). Uploaded adapters are kept in ``upload_dir`` (default
    ``default_upload_dir()``). ``host`` is where the page is served, for the banner.

    The page's path box reads local files only under ``allow_dirs``, ``upload_dir`` and the local paths of the
    adapters loaded now (``compare.sources.AdapterSources``); other text is looked up as a Hub repo id, or refused.
    """
    if settings is None:
        settings = GenerationSettings("", width=comparer.default_size, height=comparer.default_size)
    if not settings.prompt.strip():  # start from the loaded adapters' trigger words (their files' headers)
        settings = dataclasses.replace(settings, prompt=comparer.trigger_prompt())
    if len(comparer.adapters) > MAX_SLOTS:
        raise ValueError(f"the page shows at most {MAX_SLOTS} adapters, {len(comparer.adapters)} are loaded")
    upload_dir = Path(upload_dir) if upload_dir else default_upload_dir()
    started = [a.source for a in comparer.adapters if a.file is not None and Path(a.source).exists()]
    sources = AdapterSources([*allow_dirs, upload_dir, *started])
    events = CompareEvents(comparer, Runs(), scorer, upload_dir, sources)

    with ComparePage(title=title, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(f"## {title}")
        gr.Markdown(banner(comparer, host), elem_id="banner")
        with gr.Tabs():
            with gr.Tab("Compare", id="compare"):
                on_load, load_inputs, load_outputs = _compare_tab(events, settings, seeds)
            # More tabs: each builder fills its own gr.Tab and can use the comparer's pipeline and adapters.
            for tab_title, build_tab in (extra_tabs or {}).items():
                with gr.Tab(tab_title):
                    build_tab(comparer)
        demo.load(on_load, load_inputs, load_outputs, queue=False, api_visibility="private")
    demo.queue(max_size=max_queue, default_concurrency_limit=1)
    return demo


def _results(n_columns: int) -> Results:
    """The results column: cells, difference maps and the grid PNG in tabs; scores; the chosen cell."""
    with gr.Tabs():
        with gr.Tab("Cells"):
            gallery = gr.Gallery(
                label="Rows: seeds · columns: adapters", columns=n_columns, object_fit="contain", height="auto",
                elem_id="gallery",
            )  # fmt: skip
        with gr.Tab("Differences"):
            differences = gr.Gallery(
                label="|adapter − base| and |DoRA − LoRA| per seed (brightness × gain; mean in 0-255 units)",
                columns=max(1, n_columns - 1), object_fit="contain", height="auto", elem_id="differences",
            )  # fmt: skip
        with gr.Tab("Grid PNG"):
            grid_image = gr.Image(
                label="Grid with legends", type="filepath", interactive=False, buttons=["download", "fullscreen"],
                elem_id="grid-image",
            )  # fmt: skip
    scores = gr.Dataframe(
        headers=["column", "images", "scores", "mean |Δ| vs base", "mean |DoRA − LoRA|"], label="Per column",
        interactive=False, wrap=True, elem_id="scores",
    )  # fmt: skip
    downloads = gr.File(label="Downloads: grid PNG, difference grid PNG, scores CSV", file_count="multiple",
                        elem_id="grid-file")  # fmt: skip
    cell_info = gr.Textbox(label="Parameters of the chosen cell (PNG text 'parameters')", lines=3)
    snippet = gr.Code(language="python", label="Reproduce the chosen cell with diffusers", interactive=False,
                      wrap_lines=True, elem_id="snippet")  # fmt: skip
    return Results(gallery, differences, grid_image, downloads, scores, cell_info, snippet, gr.State([]))


def _compare_tab(events: CompareEvents, d: GenerationSettings, default_seeds: str) -> tuple[Callable, list, list]:
    """Lay out the Compare tab and connect its events; returns the page-load hook, its inputs and outputs."""
    loaded = events.comparer.adapters
    with gr.Row():
        with gr.Column(scale=2, min_width=360):
            form = build_form(d, default_seeds, loaded)
            pair_choice = gr.Dropdown(
                choices=events.pair_options()[0], label="Difference pair", allow_custom_value=True,
                info="its maps and its mean difference in the table, beside each adapter against the base",
                elem_id="difference-pair",
            )  # fmt: skip
            with gr.Accordion("Add or remove adapters", open=False):
                add_source = gr.Textbox(label="Local path or Hub repo id", placeholder="runs/my-dora  or  user/repo",
                                        elem_id="add-source")  # fmt: skip
                add_upload = gr.File(label="…or upload a .safetensors file", file_types=[".safetensors"])
                add_name = gr.Textbox(label="Column name (optional)", placeholder="derived from the file name")
                add_button = gr.Button("Load adapter", elem_id="add-adapter")
                with gr.Row():
                    remove_choice = gr.Dropdown([a.name for a in loaded], value=None, label="Adapter to remove",
                                                elem_id="remove-choice")  # fmt: skip
                    remove_button = gr.Button("Remove adapter", elem_id="remove-adapter")
            with gr.Accordion("Restore settings from a PNG made here (a cell or a whole grid)", open=False):
                restore_upload = gr.File(label="PNG with generation parameters", file_types=["image"],
                                         elem_id="restore-upload")  # fmt: skip
            with gr.Row(elem_id="actions"):
                generate_button = gr.Button("Generate (Ctrl+Enter)", variant="primary", elem_id="generate")
                stop_button = gr.Button("Stop", variant="secondary", elem_id="stop")  # not red while idle
            message = gr.Markdown(elem_id="message")
            selection = gr.JSON(visible=False)
        with gr.Column(scale=3, min_width=480):
            results = _results(1 + len(loaded))

    events.form, events.remove_choice = form, remove_choice
    slot_outputs = [c for s in form.slots for c in (s.group, s.check, s.strength, s.sweep)]
    # queued (Gradio 6 shows no error toast for unqueued events), but in its own group with no limit, so a
    # mistake shows at once even while another grid runs
    checked = generate_button.click(
        events.check, {*form.everything, form.slot_names}, selection, concurrency_limit=None, api_visibility="private"
    )
    generated = checked.success(
        events.generate,
        form.fields + [selection, pair_choice],
        [*results.outputs, message, results.state],
        api_name="generate",
        concurrency_id="pipeline",
        concurrency_limit=1,
        show_progress_on=[results.gallery],  # one progress bar, not one on every output
    )
    generated.then(events.table_layout, results.scores, results.scores, queue=False, show_progress="hidden",
                   api_visibility="private")
    stop_button.click(events.request_stop, None, message, queue=False, api_name="stop", api_visibility="undocumented")
    results.gallery.select(events.show_cell, results.state, [results.cell_info, results.snippet], queue=False,
                           api_visibility="private")  # fmt: skip
    # its own group: a slow Hub lookup waits beside a running grid, not in front of the next one
    added = add_button.click(
        events.load_adapter,
        [add_source, add_upload, add_name, form.slot_names],
        [message, remove_choice, pair_choice, form.slot_names, *slot_outputs],
        api_name="add_adapter",
        concurrency_id="adapters",
        concurrency_limit=1,
        show_progress_on=[message],
    )
    removed = remove_button.click(
        events.remove_adapter,
        {remove_choice, form.slot_names, *form.slot_inputs},
        [message, remove_choice, pair_choice, form.slot_names, *slot_outputs],
        concurrency_id="pipeline",
        concurrency_limit=1,
        show_progress_on=[message],
        api_name="remove_adapter_form",
        api_visibility="private",
    )
    gr.api(events.remove_adapter_api, api_name="remove_adapter", concurrency_id="pipeline", concurrency_limit=1)
    restored = restore_upload.upload(
        events.restore,
        [restore_upload, form.slot_names],
        [*form.everything, message],
        api_name="restore",
        show_progress_on=[message],
    )
    added.success(events.prompt_after_load, form.prompt, form.prompt, queue=False, api_visibility="private")
    for event in (added, removed, restored):  # the error's text stays on the message area after its toast
        event.failure(events.show_error, None, message, queue=False, api_visibility="private")
    # the PNG is read: empty the box, so the next PNG drops in without removing this one by hand
    restored.then(lambda: None, None, restore_upload, queue=False, api_visibility="private")
    return events.on_load, [form.slot_names], [remove_choice, pair_choice, form.slot_names, *slot_outputs]
