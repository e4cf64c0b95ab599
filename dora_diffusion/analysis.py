"""Paper section 3: how much an adapter changed the magnitude and the direction of each weight.

For a base weight ``W0`` and the weight ``W' = W0 + (W' - W0)`` of one adapter at strength 1, every output
channel ``i`` (a row of a Linear weight, one filter over (in_channels, kh, kw) of a Conv2d) is split into a
magnitude and a direction (paper Eq. 2):

    m_i = ||w_i||_2,        v_i = w_i / ||w_i||_2

and the changes are averaged over the ``d_out`` channels (paper Eq. 3 and 4):

    delta_M = 1/d_out  sum_i |m'_i - m0_i|
    delta_D = 1/d_out  sum_i (1 - cos(w'_i, w0_i))

The paper writes ``W`` as d x k with one magnitude per column; its k columns are the output features, so
this is the same decomposition in PyTorch's (d_out, d_in) layout, and the same axis DoRA normalises here.

Figure 2 of the paper plots one point (delta_D, delta_M) per layer and training step. Full fine-tuning
and DoRA show a negative slope (correlation -0.62 and -0.31): a layer changes mostly its magnitude or
mostly its direction. LoRA shows a positive slope (+0.83): both change together. ``analyze_pipeline``
gives the points for adapters loaded into a pipeline, ``summarize`` the slope and Pearson correlation,
``plot`` the figure. ``dora-diffusion analyze`` (``add_analyze_parser`` / ``run_analyze``) runs all of it
on adapter files and training checkpoints.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass, fields, replace
from pathlib import Path

import torch
from torch import nn

from .extras import require
from .formats import COMPONENTS, DEFAULT_WEIGHT_NAME, AdapterFileError, read_safetensors, resolve_file
from .inject import adapted_layers
from .pipeline import components, delete_dora_adapters, get_dora_adapters, load_dora_weights
from .training.checkpoint import CHECKPOINT_RE

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

FIGSIZE = (8.0, 5.5)
"""Size of the plot in inches; at ``DPI`` the PNG is 800 x 550 pixels."""
DPI = 100
_MARKERS = {"unet": "o", "text_encoder": "^", "text_encoder_2": "s"}


# ---------------------------------------------------------------------------------------------- the math


@torch.no_grad()
def channel_changes(w0: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output channel ``|m'_i - m0_i|`` and ``1 - cos(w'_i, w0_i)``, two float64 tensors of shape (d_out,).

    ``w0`` and ``w`` have the same shape, output channels on dim 0 (Linear (out, in), Conv2d (out, in, kh, kw)).
    ``1 - cos`` is computed as ``||w'_i/||w'_i|| - w0_i/||w0_i||||^2 / 2``, equal to it for non-zero rows and free
    of the cancellation that ``1 - cos`` suffers for the tiny angles of short training runs. A row that is zero
    in both weights counts as unchanged (0); a row zero in only one of them as orthogonal (1).
    """
    if w0.shape != w.shape:
        raise ValueError(f"base weight has shape {tuple(w0.shape)}, adapted weight {tuple(w.shape)}; they must match")
    a = w0.detach().to("cpu", torch.float64).reshape(w0.shape[0], -1)  # (d_out, K)
    b = w.detach().to("cpu", torch.float64).reshape(w.shape[0], -1)  # (d_out, K)
    m0, m1 = a.norm(dim=1), b.norm(dim=1)  # (d_out,)
    u0 = a / m0.clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(1)
    u1 = b / m1.clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(1)
    d = 0.5 * (u1 - u0).pow(2).sum(dim=1)
    zero0, zero1 = m0 == 0, m1 == 0
    d = torch.where(zero0 | zero1, (zero0 != zero1).to(d.dtype), d)
    return (m1 - m0).abs(), d


def decompose(w0: torch.Tensor, w: torch.Tensor) -> tuple[float, float]:
    """``(delta_M, delta_D)`` of the weight ``w`` against the base ``w0`` (paper Eq. 3-4, per output channel).

    ``delta_M = mean_i |m'_i - m0_i|`` with ``m_i = ||w_i||_2``; ``delta_D = mean_i (1 - cos(w'_i, w0_i))``.
    Pure rescaling of rows by ``c_i > 0`` gives ``delta_D = 0`` and ``delta_M = mean_i |c_i - 1| ||w0_i||``;
    a rotation that keeps row norms gives ``delta_M = 0``.
    """
    dm, dd = channel_changes(w0, w)
    return float(dm.mean()), float(dd.mean())


# ---------------------------------------------------------------------------------------------- pipelines


@dataclass(frozen=True)
class Row:
    """The change one adapter makes to one module (one point of the paper's Figure 2)."""

    adapter: str
    module: str
    """Full module name inside its component, e.g. ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``."""
    component: str
    """``unet``, ``text_encoder`` or ``text_encoder_2``."""
    kind: str
    """``Linear`` or ``Conv2d``."""
    rank: int
    delta_M: float
    delta_D: float
    method: str
    """``DoRA`` or ``LoRA``, or what the file's ``dora_diffusion`` metadata names under ``method`` (e.g. ``FT``
    for a full fine-tuning written as a full-rank LoRA)."""


def _method(use_dora: bool) -> str:
    return "DoRA" if use_dora else "LoRA"


def analyze_pipeline(pipe, adapter_names: list[str] | None = None) -> list[Row]:
    """One ``Row`` per adapted module per adapter (default: every loaded adapter, in load order).

    Each adapter is measured alone at strength 1, ``W' = W0 + Adapter.delta(1.0)``, whatever adapters are
    active, at what strengths, or disabled. Raises ``RuntimeError`` if adapters are fused into the weights
    (``W0`` would not be the base weight) and ``ValueError`` for names that are not loaded.
    """
    loaded = get_dora_adapters(pipe)
    names = loaded if adapter_names is None else list(adapter_names)
    if not loaded:
        raise ValueError(
            f"no adapters are loaded into this {type(pipe).__name__}; load some with pipe.load_dora_weights()"
        )
    missing = [n for n in names if n not in loaded]
    if missing:
        raise ValueError(f"adapters {missing} are not loaded; loaded adapters: {loaded}")
    layers = {comp: adapted_layers(model) for comp, model in components(pipe).items()}
    if any(layer.fused for per in layers.values() for layer in per.values()):
        raise RuntimeError("adapters are fused into the weights; call pipe.unfuse_dora() before analysing them")
    rows = []
    for name in names:
        for comp, per in layers.items():
            for module, layer in per.items():
                spec = layer.adapters[name].spec if name in layer.adapters else None
                if spec is None:
                    continue
                w0 = layer.weight.detach().to("cpu", torch.float64)
                delta_m, delta_d = decompose(w0, w0 + layer.adapters[name].delta(1.0).to("cpu", torch.float64))
                kind = "Conv2d" if isinstance(layer.base_layer, nn.Conv2d) else "Linear"
                rows.append(Row(name, module, comp, kind, spec.rank, delta_m, delta_d, _method(spec.use_dora)))
    return rows


# ---------------------------------------------------------------------------------------------- summaries


@dataclass(frozen=True)
class Fit:
    """Least-squares line ``delta_M = slope * delta_D + intercept`` and Pearson correlation ``r`` over ``n`` points.

    ``slope`` and ``r`` are NaN when they are undefined (fewer than 2 points, or no spread).
    """

    n: int
    slope: float
    intercept: float
    r: float


def fit_line(x: Sequence[float], y: Sequence[float]) -> Fit:
    """Fit ``y = slope x + intercept`` by least squares; ``r = cov(x, y) / (sd(x) sd(y))``."""
    n = len(x)
    if n != len(y):
        raise ValueError(f"x has {n} values, y has {len(y)}")
    nan = float("nan")
    if n == 0:
        return Fit(0, nan, nan, nan)
    mx, my = math.fsum(x) / n, math.fsum(y) / n
    sxx = math.fsum((a - mx) ** 2 for a in x)
    syy = math.fsum((b - my) ** 2 for b in y)
    sxy = math.fsum((a - mx) * (b - my) for a, b in zip(x, y))
    if n < 2 or sxx == 0:
        return Fit(n, nan, nan, nan)
    slope = sxy / sxx
    r = sxy / math.sqrt(sxx * syy) if syy > 0 else nan
    return Fit(n, slope, my - slope * mx, r)


@dataclass(frozen=True)
class Summary:
    """What one adapter changed, over all its modules and per component."""

    adapter: str
    method: str
    """``DoRA``, ``LoRA`` or ``mixed``."""
    fit: Fit
    components: dict[str, Fit]

    @property
    def n(self) -> int:
        """Number of modules."""
        return self.fit.n


def _fit_rows(rows: Sequence[Row]) -> Fit:
    return fit_line([r.delta_D for r in rows], [r.delta_M for r in rows])


def _by_adapter(rows: Iterable[Row]) -> dict[str, list[Row]]:
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.adapter, []).append(row)
    return groups


def summarize(rows: Iterable[Row]) -> dict[str, Summary]:
    """Per adapter (in the order of ``rows``): slope and Pearson r of delta_M against delta_D over all its modules,
    the same per component, and the module count."""
    out = {}
    for adapter, group in _by_adapter(rows).items():
        methods = {r.method for r in group}
        per = {c: _fit_rows([r for r in group if r.component == c]) for c in COMPONENTS}
        out[adapter] = Summary(
            adapter,
            methods.pop() if len(methods) == 1 else "mixed",
            _fit_rows(group),
            {c: f for c, f in per.items() if f.n},
        )
    return out


def _num(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.3g}"


def _summary_table(summaries: dict[str, Summary]) -> tuple[list[str], list[list[str]]]:
    comps = [c for c in COMPONENTS if any(c in s.components for s in summaries.values())]
    header = ["adapter", "method", "modules", "slope", "r", *(f"r {c}" for c in comps)]
    body = []
    for s in summaries.values():
        per = [f"{_num(s.components[c].r)} ({s.components[c].n})" if c in s.components else "" for c in comps]
        body.append([s.adapter, s.method, str(s.n), _num(s.fit.slope), _num(s.fit.r), *per])
    return header, body


def format_summary(summaries: dict[str, Summary]) -> str:
    """A plain-text table: one line per adapter with its slope and r, then r (module count) per component."""
    header, body = _summary_table(summaries)
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in [header, *body])


_HOW_TO_READ = (
    "Slope and r of delta_M against delta_D over the adapter's modules (paper Figure 2). Negative: a module "
    "changes mostly its magnitude or mostly its direction, as in full fine-tuning (r = -0.62) and DoRA (-0.31) in "
    "the paper. Positive: both change together, as LoRA did there (+0.83)."
)


def summary_markdown(summaries: dict[str, Summary]) -> str:
    """The summary table in Markdown, with one sentence on how to read it."""
    header, body = _summary_table(summaries)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(line) + " |" for line in body]
    return "\n".join(lines) + "\n\n" + _HOW_TO_READ


# ---------------------------------------------------------------------------------------------- files


def write_csv(rows: Iterable[Row], path: str | os.PathLike) -> Path:
    """Write ``rows`` with the header ``adapter,module,component,kind,rank,delta_M,delta_D,method``; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([fl.name for fl in fields(Row)])
        writer.writerows(astuple(r) for r in rows)
    return path


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

    groups = _by_adapter(rows)
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
        f = _fit_rows(group)
        for comp in COMPONENTS:
            pts = [r for r in group if r.component == comp]
            if pts:
                ax.scatter([r.delta_D for r in pts], [r.delta_M for r in pts], s=18, facecolors="none",
                           edgecolors=[color], alpha=0.8, marker=_MARKERS[comp], linewidths=0.9)  # fmt: skip
        label = f"{adapter} ({group[0].method if len({r.method for r in group}) == 1 else 'mixed'}): "
        label += f"r = {_num(f.r)}, slope = {_num(f.slope)}"
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


# ---------------------------------------------------------------------------------------------- app


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


# ---------------------------------------------------------------------------------------------- command


@dataclass(frozen=True)
class _Source:
    label: str
    context: str
    """Name of the directory holding the thing the label names, put in front when labels repeat."""
    path: Path
    group: int
    step: float


def _same_tensors(a: Path, b: Path) -> bool:
    """True if two adapter files hold the same tensors (their headers may differ); False if either is unreadable."""
    try:
        (sa, _), (sb, _) = read_safetensors(a), read_safetensors(b)
    except (AdapterFileError, OSError):
        return False
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def adapter_sources(paths: Sequence[str | os.PathLike]) -> list[tuple[str, Path]]:
    """Expand the ``ADAPTER`` arguments of ``analyze`` into ``(label, adapter file)`` pairs, in plotting order.

    A file is labelled by its name without suffix (``pytorch_lora_weights.safetensors`` by its directory's
    name), a directory holding one adapter file by its own name. A training output directory with
    ``checkpoint-N/`` subdirectories (each holding ``pytorch_lora_weights.safetensors``, as
    ``train_dreambooth_dora.py`` and diffusers' DreamBooth scripts write them) gives one entry per checkpoint,
    by step, then its final weights unless they equal the last checkpoint's. Checkpoint directories passed one
    by one (``run/checkpoint-*``) are ordered by step too. Labels are usable as adapter names (``.`` becomes
    ``_``); labels that repeat get their parent directory's name in front, then ``#2``, ``#3``.
    """
    found: list[_Source] = []
    groups: dict[Path, int] = {}  # run directory -> position of its first checkpoint among the arguments
    for i, raw in enumerate(paths):
        path = Path(raw)
        if not path.exists():
            raise AdapterFileError(f"adapter {path} does not exist")
        path = path.resolve()
        m = CHECKPOINT_RE.match(path.name)
        if path.is_dir() and m:
            g = groups.setdefault(path.parent, i)
            found.append(_Source(path.name, path.parent.name, resolve_file(path), g, int(m.group(1))))
            continue
        ckpts = sorted(
            (int(mm.group(1)), child)
            for child in (path.iterdir() if path.is_dir() else ())
            if child.is_dir() and (mm := CHECKPOINT_RE.match(child.name))
        )
        if ckpts:
            g = groups.setdefault(path, i)
            found += [_Source(c.name, path.name, resolve_file(c), g, step) for step, c in ckpts]
            try:
                final = resolve_file(path)
            except AdapterFileError:
                continue  # a run that has not finished: checkpoints only
            if not _same_tensors(final, found[-1].path):  # saved at the last checkpoint's step: shown once
                found.append(_Source(path.name, path.parent.name, final, g, math.inf))
            continue
        if path.is_file() and path.name != DEFAULT_WEIGHT_NAME:
            found.append(_Source(path.stem, path.parent.name, path, i, 0))
        else:  # a directory, or the default file name that only its directory tells apart
            where = path if path.is_dir() else path.parent
            found.append(_Source(where.name, where.parent.name, resolve_file(path), i, 0))
    found.sort(key=lambda s: (s.group, s.step))  # stable: same group and step keep argument order
    counts: dict[str, int] = {}
    for s in found:
        counts[s.label] = counts.get(s.label, 0) + 1
    out: list[tuple[str, Path]] = []
    taken: set[str] = set()
    for s in found:
        label = (f"{s.context}/{s.label}" if counts[s.label] > 1 else s.label).replace(".", "_")
        unique, k = label, 1
        while unique in taken:
            k += 1
            unique = f"{label}#{k}"
        taken.add(unique)
        out.append((unique, s.path))
    return out


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_base(pretrained_model_name_or_path: str, dtype: str = "float32", variant: str | None = None):
    """``StableDiffusionXLPipeline.from_pretrained`` on the CPU without the VAE (the analysis does not need it).

    Raises ``OSError`` with a one-line message if the model cannot be loaded.
    """
    from diffusers import StableDiffusionXLPipeline

    path = Path(pretrained_model_name_or_path)
    hub_id = len(path.parts) == 2 and not str(pretrained_model_name_or_path).startswith((".", "~", os.sep, "/"))
    if not path.exists() and not hub_id:
        raise OSError(f"--base {pretrained_model_name_or_path}: no such directory, and not a Hub repo id 'owner/name'")
    if path.is_file():
        raise OSError(f"--base {path} is a file; pass a diffusers model directory (with model_index.json) or a Hub id")
    try:
        with warnings.catch_warnings():  # newer diffusers ask for `dtype=`; `torch_dtype=` works in all we support
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            return StableDiffusionXLPipeline.from_pretrained(
                pretrained_model_name_or_path, torch_dtype=_DTYPES[dtype], variant=variant, vae=None
            )
    except Exception as err:  # diffusers raises OSError, ValueError, EnvironmentError... with long messages
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OSError(f"could not load the base model {pretrained_model_name_or_path}: {first}") from None


def add_analyze_parser(subparsers) -> None:
    """Register ``dora-diffusion analyze``."""
    p = subparsers.add_parser(
        "analyze",
        help="magnitude and direction change per module (DoRA paper, Figure 2)",
        description="Apply each adapter alone to the base model and measure, per adapted module, the mean change of "
        "the output-channel norms (delta_M) and of their directions (delta_D, mean 1 - cos). Prints the slope and "
        "Pearson r of delta_M against delta_D per adapter, writes analysis.csv and the scatter plot analysis.png.",
    )
    p.add_argument("--base", required=True, metavar="MODEL",
                   help="the SDXL model the adapters were trained on: Hub id or local diffusers directory")  # fmt: skip
    p.add_argument("adapters", nargs="+", metavar="ADAPTER",
                   help="adapter .safetensors file or directory; a training output directory expands to its "
                   "checkpoint-N/ folders, ordered by step")  # fmt: skip
    p.add_argument("--out", default="analysis", metavar="DIR", help="output directory (default: ./analysis)")
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES),
                   help="precision to load the base in; float16 halves memory (default: float32)")  # fmt: skip
    p.add_argument("--variant", default=None, help="weights variant to load, e.g. fp16 (as in from_pretrained)")
    p.add_argument("--title", default=None, help="plot title")
    p.set_defaults(func=run_analyze)


def _error(message: str) -> int:
    print(f"dora-diffusion analyze: error: {message}", file=sys.stderr)
    return 2


def file_method(path: str | os.PathLike) -> str | None:
    """The ``method`` an adapter file's own metadata names (``dora_diffusion`` header key), if any."""
    import json

    from .formats.diffusers import OWN_METADATA_KEY

    _, metadata = read_safetensors(path)
    try:
        method = json.loads(metadata.get(OWN_METADATA_KEY, "{}")).get("method")
    except (ValueError, AttributeError, RecursionError):
        return None
    return str(method) if method else None


_CHECKPOINT_LABEL = re.compile(r"^(?P<run>.+)/checkpoint-\d+$")


def pool_checkpoints(rows: Sequence[Row]) -> list[Row]:
    """``rows`` with each ``RUN/checkpoint-N`` label replaced by ``RUN``: one group per training run, all its steps
    together, as the paper's Figure 2 plots them. Returns ``rows`` unchanged (the same list) if none is such."""
    runs = [_CHECKPOINT_LABEL.match(r.adapter) for r in rows]
    if not any(runs):
        return rows if isinstance(rows, list) else list(rows)
    return [replace(r, adapter=m.group("run")) if m else r for r, m in zip(rows, runs)]


def _unwritable(out: Path) -> str | None:
    """Why the folder ``out`` cannot be created or written to (checked before any work), or None."""
    if out.exists() and not out.is_dir():
        return "is a file; pass a folder (analysis.csv and analysis.png are written into it)"
    existing = next(p for p in (out, *out.parents) if p.exists() or p == Path(p.anchor))
    if not existing.is_dir():
        return f"{existing} is a file, so the folder cannot be created"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def run_analyze(args: argparse.Namespace) -> int:
    """Analyse every adapter against ``--base``; print the summary, write ``analysis.csv`` and ``analysis.png``.

    Adapters are loaded one at a time, so many checkpoints need no more memory than one. Returns 0, or 2 after
    printing one line if the base model or an adapter cannot be read or does not fit.
    """
    problem = _unwritable(Path(args.out))
    if problem:
        return _error(f"--out {args.out}: {problem}")
    try:
        sources = adapter_sources(args.adapters)
    except (AdapterFileError, OSError) as err:
        return _error(str(err))
    try:
        pipe = load_base(args.base, args.dtype, args.variant)
    except OSError as err:
        return _error(str(err))
    rows: list[Row] = []
    for name, path in sources:
        try:
            load_dora_weights(pipe, path, adapter_name=name)
        except (AdapterFileError, ValueError) as err:
            return _error(f"adapter {path} does not fit {args.base}: {err}")
        found = analyze_pipeline(pipe, [name])
        method = file_method(path)
        rows += [replace(r, method=method) for r in found] if method else found
        delete_dora_adapters(pipe, name)
    out = Path(args.out)
    print(format_summary(summarize(rows)))
    pooled = pool_checkpoints(rows)
    if pooled is not rows:
        print("\nper training run, all its checkpoints together (as the paper's Figure 2):")
        print(format_summary(summarize(pooled)))
    csv_path = write_csv(rows, out / "analysis.csv")
    png_path = plot(pooled, out / "analysis.png", args.title)
    print(f"wrote {csv_path} ({len(rows)} rows)")
    print(f"wrote {png_path}")
    return 0
