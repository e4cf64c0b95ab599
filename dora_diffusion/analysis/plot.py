"""The paper's Figure 2 for measured rows: delta_M against delta_D, one colour and fitted line per adapter.

``plot`` writes the PNG (matplotlib's Agg canvas, the ``analysis`` extra); ``analysis_plot_for`` measures the
adapters loaded into a pipeline and returns the plot with a Markdown summary, for the app's Analysis tab.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from dora_diffusion.extras import require
from dora_diffusion.formats import COMPONENTS
from dora_diffusion.analysis.scan import Row, analyze_pipeline, write_csv
from dora_diffusion.analysis.summary import by_adapter, fit_rows, short_number, summarize, summary_markdown


FIGSIZE = (8.0, 5.5)
"""Size of the plot in inches; at ``DPI`` the PNG is 800 x 550 pixels."""
DPI = 100
_MARKERS = {"unet": "o", "text_encoder": "^", "text_encoder_2": "s"}


def _colors(n: int) -> list:
    from matplotlib import colormaps  # plot() checked the extra

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["viridis"](i / (n - 1)) for i in range(n)]


def plot(rows: Iterable[Row], path: str | os.PathLike, title: str | None = None, panels: bool = False) -> Path:
    """Scatter delta_M (y) against delta_D (x) like the paper's Figure 2; write a PNG of 800 x 550 pixels.

    One colour per adapter with its least-squares line and ``r`` in the legend; the marker tells the component
    (circle UNet, triangle text_encoder, square text_encoder_2). Points are hollow rings, so overlapping points
    stay visible; ``panels=True`` draws each adapter in its own panel (shared axes, 800 px wide, 360 px per row
    of two panels), so no adapter hides another. Uses matplotlib's Agg canvas, not pyplot, so it needs no display
    and is safe to call from several threads.
    """
    require("analysis", "the analysis plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    groups = by_adapter(rows)
    if not groups:
        raise ValueError("no rows to plot")
    n_rows = math.ceil(len(groups) / 2) if panels and len(groups) > 1 else 1
    n_cols = 2 if panels and len(groups) > 1 else 1
    figsize = FIGSIZE if n_rows * n_cols == 1 else (FIGSIZE[0], 3.6 * n_rows)
    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, sharex=True, sharey=True, squeeze=False).ravel()
    for i, (color, (adapter, group)) in enumerate(zip(_colors(len(groups)), groups.items())):
        ax = axes[i] if n_rows * n_cols > 1 else axes[0]
        f = fit_rows(group)
        for comp in COMPONENTS:
            pts = [r for r in group if r.component == comp]
            if pts:
                ax.scatter([r.delta_D for r in pts], [r.delta_M for r in pts], s=18, facecolors="none",
                           edgecolors=[color], alpha=0.8, marker=_MARKERS[comp], linewidths=0.9)  # fmt: skip
        label = f"{adapter} ({group[0].method if len({r.method for r in group}) == 1 else 'mixed'}): "
        label += f"r = {short_number(f.r)}, slope = {short_number(f.slope)}"
        if math.isnan(f.slope):
            ax.plot([], [], color=color, label=label)
        else:
            xs = [min(r.delta_D for r in group), max(r.delta_D for r in group)]
            ax.plot(xs, [f.slope * x + f.intercept for x in xs], color=color, linewidth=1.8, label=label)
    used = axes[: len(groups)] if n_rows * n_cols > 1 else axes[:1]
    for ax in axes[len(used) :]:
        ax.set_visible(False)
    shown = [c for c in COMPONENTS if any(r.component == c for g in groups.values() for r in g)]
    for ax in used:
        ax.set_xlabel("ΔD  (mean 1 − cos between W′ and W0 rows)")
        ax.set_ylabel("ΔM  (mean |m′ − m0| per output channel)")
        ax.ticklabel_format(style="sci", scilimits=(-3, 4))
        ax.grid(alpha=0.3)
        first = ax.legend(loc="upper left", fontsize=8)
        ax.add_artist(first)
        handles = [Line2D([], [], marker=_MARKERS[c], color="grey", markerfacecolor="none", linestyle="", label=c)
                   for c in shown]  # fmt: skip
        ax.legend(handles=handles, loc="lower right", fontsize=8)
    fig.suptitle(title or "Magnitude vs direction change per module (DoRA paper, Figure 2)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def analysis_plot_for(
    pipe,
    adapter_names: list[str] | None = None,
    directory: str | os.PathLike | None = None,
    panels: bool = False,
    csv_path: str | os.PathLike | None = None,
) -> tuple[Path, str]:
    """The Figure 2 plot of the adapters loaded into ``pipe`` (default: all) as a PNG in ``directory`` (default: a
    new file in the system temp dir), and a Markdown summary; with ``csv_path`` also the rows as CSV
    (``write_csv``). ``panels``: one panel per adapter (``plot``). Raises like ``analyze_pipeline``."""
    rows = analyze_pipeline(pipe, adapter_names)
    fd, name = tempfile.mkstemp(prefix="dora_analysis_", suffix=".png", dir=directory)
    os.close(fd)
    if csv_path is not None:
        write_csv(rows, csv_path)
    return plot(rows, name, panels=panels), summary_markdown(summarize(rows))
