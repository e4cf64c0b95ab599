"""Summaries of measured rows: the slope and Pearson r of delta_M against delta_D per adapter (paper Figure 2).

Full fine-tuning and DoRA show a negative slope in the paper (r = -0.62 and -0.31), LoRA a positive one (+0.83).
``summarize`` fits each adapter's rows (``decomposition.fit_line``), ``format_summary`` and ``summary_markdown``
print them, ``pool_checkpoints`` groups a training run's checkpoints into one adapter.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from dora_diffusion.formats import COMPONENTS
from dora_diffusion.analysis.decomposition import Fit, fit_line
from dora_diffusion.analysis.scan import Row


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


def fit_rows(rows: Sequence[Row]) -> Fit:
    """The line of delta_M against delta_D through ``rows``."""
    return fit_line([r.delta_D for r in rows], [r.delta_M for r in rows])


def by_adapter(rows: Iterable[Row]) -> dict[str, list[Row]]:
    """``rows`` grouped by adapter, adapters in order of first appearance."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.adapter, []).append(row)
    return groups


def summarize(rows: Iterable[Row]) -> dict[str, Summary]:
    """Per adapter (in the order of ``rows``): slope and Pearson r of delta_M against delta_D over all its modules,
    the same per component, and the module count."""
    out = {}
    for adapter, group in by_adapter(rows).items():
        methods = {r.method for r in group}
        per = {c: fit_rows([r for r in group if r.component == c]) for c in COMPONENTS}
        out[adapter] = Summary(
            adapter,
            methods.pop() if len(methods) == 1 else "mixed",
            fit_rows(group),
            {c: f for c, f in per.items() if f.n},
        )
    return out


def short_number(v: float) -> str:
    """``v`` to 3 significant digits, ``-`` for NaN (an undefined slope or r)."""
    return "-" if math.isnan(v) else f"{v:.3g}"


def _summary_table(summaries: dict[str, Summary]) -> tuple[list[str], list[list[str]]]:
    comps = [c for c in COMPONENTS if any(c in s.components for s in summaries.values())]
    header = ["adapter", "method", "modules", "slope", "r", *(f"r {c}" for c in comps)]
    body = []
    for s in summaries.values():
        per = [f"{short_number(s.components[c].r)} ({s.components[c].n})" if c in s.components else "" for c in comps]
        body.append([s.adapter, s.method, str(s.n), short_number(s.fit.slope), short_number(s.fit.r), *per])
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


_CHECKPOINT_LABEL = re.compile(r"^(?P<run>.+)/checkpoint-\d+$")


def pool_checkpoints(rows: Sequence[Row]) -> list[Row]:
    """``rows`` with each ``RUN/checkpoint-N`` label replaced by ``RUN``: one group per training run, all its steps
    together, as the paper's Figure 2 plots them. Returns ``rows`` unchanged (the same list) if none is such."""
    runs = [_CHECKPOINT_LABEL.match(r.adapter) for r in rows]
    if not any(runs):
        return rows if isinstance(rows, list) else list(rows)
    return [replace(r, adapter=m.group("run")) if m else r for r, m in zip(rows, runs)]
