"""The "Analysis" tab (DoRA paper, Figure 2): how each chosen adapter changed magnitude and direction per module."""

from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr

from dora_diffusion.compare import Comparer


def analysis_tab(comparer: Comparer) -> None:
    """The tab's content for the adapters loaded in ``comparer``; call inside a ``gr.Tab``.

    A person ticks the adapters to analyse (none ticked: all), may draw one panel per adapter so that no adapter's
    points hide another's, and gets the plot, a summary and the per-module rows as CSV (``/analysis``).
    """
    from dora_diffusion.analysis import analysis_plot_for

    out_dir = Path(tempfile.mkdtemp(prefix="dora-diffusion-analysis-"))

    def choices(chosen: list[str] | None = None) -> gr.CheckboxGroup:
        names = [a.name for a in comparer.adapters]
        return gr.CheckboxGroup(choices=names, value=[n for n in (chosen or []) if n in names])

    def run(chosen: list[str] | None, panels: bool) -> tuple[str | None, str, str | None, gr.CheckboxGroup]:
        names = [n for n in (chosen or []) if n in {a.name for a in comparer.adapters}] or None
        csv_path = Path(tempfile.mkstemp(prefix="analysis_", suffix=".csv", dir=out_dir)[1])
        try:
            with comparer.lock:
                path, markdown = analysis_plot_for(comparer.pipe, names, out_dir, bool(panels), csv_path)
        except (ValueError, RuntimeError) as err:  # no adapter loaded, or fused weights
            return None, f"**{err}**", None, choices(chosen)
        return str(path), markdown, str(csv_path), choices(chosen)

    gr.Markdown(
        "How much each adapter changed the **magnitude** (ΔM, mean |m′ − m0| of the output-channel norms) and the "
        "**direction** (ΔD, mean 1 − cos) of every adapted module, at strength 1. One ring per module. "
        "The paper found a negative slope for full fine-tuning and DoRA, a positive one for LoRA."
    )
    with gr.Row():
        adapters = gr.CheckboxGroup(
            [a.name for a in comparer.adapters], label="Adapters (none ticked: all)", elem_id="analysis-adapters"
        )
        panels = gr.Checkbox(False, label="one panel per adapter (no point hides another)", elem_id="analysis-panels")
    button = gr.Button("Analyse", variant="primary", elem_id="analyse")
    image = gr.Image(label="ΔM vs ΔD", type="filepath", interactive=False)
    summary = gr.Markdown()
    csv_file = gr.File(label="Rows per module (CSV)", elem_id="analysis-csv")
    button.click(run, [adapters, panels], [image, summary, csv_file, adapters], api_name="analysis")
