"""Paper section 3: how much an adapter changed the magnitude and the direction of each weight.

Figure 2 of the paper plots one point (delta_D, delta_M) per layer and training step. Full fine-tuning
and DoRA show a negative slope (correlation -0.62 and -0.31): a layer changes mostly its magnitude or
mostly its direction. LoRA shows a positive slope (+0.83): both change together. ``analyze_pipeline``
gives the points for adapters loaded into a pipeline, ``summarize`` the slope and Pearson correlation,
``plot`` the figure. ``dora-diffusion analyze`` (``add_analyze_parser`` / ``run_analyze``) runs all of it
on adapter files and training checkpoints.

One module a job:

- ``decomposition``: the math (delta_M, delta_D per weight; the least-squares line and r), pure torch.
- ``scan``: ``Row`` per adapted module of a pipeline (``analyze_pipeline``), ``write_csv``, ``load_base``.
- ``summary``: slope and r per adapter and component (``summarize``), as text or Markdown; ``pool_checkpoints``.
- ``plot``: the Figure 2 PNG (``plot``) and the app's plot-and-summary (``analysis_plot_for``).
- ``sources``: the adapter files and training checkpoints a command line names (``adapter_sources``).
- ``command``: ``dora-diffusion analyze``.
"""

from dora_diffusion.analysis.command import add_analyze_parser, run_analyze
from dora_diffusion.analysis.decomposition import Fit, channel_changes, decompose, fit_line
from dora_diffusion.analysis.plot import analysis_plot_for, plot
from dora_diffusion.analysis.scan import Row, analyze_pipeline, write_csv
from dora_diffusion.analysis.sources import adapter_sources, file_method
from dora_diffusion.analysis.summary import Summary, format_summary, pool_checkpoints, summarize, summary_markdown

__all__ = [
    "Fit",
    "Row",
    "Summary",
    "adapter_sources",
    "add_analyze_parser",
    "analysis_plot_for",
    "analyze_pipeline",
    "channel_changes",
    "decompose",
    "file_method",
    "fit_line",
    "format_summary",
    "plot",
    "pool_checkpoints",
    "run_analyze",
    "summarize",
    "summary_markdown",
    "write_csv",
]
