"""What a finished grid reports besides its cells: the per-column table (scores and mean differences), its CSV,
and the difference maps as one grid image."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image

from dora_diffusion.compare.differences import DifferenceMap, mean_differences
from dora_diffusion.compare.grid_image import compose_grid, grid_zoom, row_legend
from dora_diffusion.compare.infotext import column_name
from dora_diffusion.compare.plan import Column, GridPlan
from dora_diffusion.compare.scores import ColumnScore


def column_table(
    p: GridPlan,
    images: Mapping[tuple[int, Column], Image.Image],
    scores: Sequence[ColumnScore],
    maps: Sequence[DifferenceMap],
    pair_header: str = "mean |DoRA − LoRA|",
) -> dict:
    """``{"headers": [...], "data": [...]}``, a row per column: images rendered, each score, and the mean
    |difference| from the base column and from its partner in the maps' second group (DoRA against LoRA, or the
    chosen pair: ``pair_header`` names it), in 0-255 units over the seeds."""
    metrics = list(dict.fromkeys(k for row in scores for k in row.values))
    by_column = {row.column: row for row in scores}
    vs_base: dict[Column, list[float]] = {}
    vs_other: dict[Column, list[float]] = {}
    for m in maps:
        (vs_base if m.b.adapter is None else vs_other).setdefault(m.a, []).append(m.mean)

    def mean(values: list[float] | None) -> float | None:
        return round(sum(values) / len(values), 2) if values else None

    rows = []
    for column in p.columns:
        row = by_column.get(column)
        n = sum((s, column) in images for s in p.seeds)
        values = [round(row.values[k], 3) if row and row.values.get(k) is not None else None for k in metrics]
        rows.append([column_name(column), n, *values, mean(vs_base.get(column)), mean(vs_other.get(column))])
    return {"headers": ["column", "images", *metrics, "mean |Δ| vs base", pair_header], "data": rows}


def pair_header(pair: tuple[str, str], kinds: Mapping[str, str]) -> str:
    """The table's header for the mean difference of ``pair``: ``"mean |DoRA − LoRA|"`` for a DoRA and a LoRA
    (the page's label names them), else ``"mean |a − b|"`` with their names."""
    if (kinds.get(pair[0]), kinds.get(pair[1])) == ("DoRA", "LoRA"):
        return "mean |DoRA − LoRA|"
    return f"mean |{pair[0]} − {pair[1]}|"


def write_table_csv(table: Mapping, path: str | Path) -> Path:
    """Write ``column_table``'s table as CSV (empty cells for missing values); return the path."""
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(table["headers"])
        writer.writerows(["" if v is None else v for v in row] for row in table["data"])
    return path


def difference_grid(p: GridPlan, maps: Sequence[DifferenceMap]) -> Image.Image:
    """The difference maps as one image: a row per seed, a column per pair, its mean and gain in the legend."""
    means = mean_differences(maps)
    labels = list(means)
    seeds = [s for s in p.seeds if any(m.seed == s for m in maps)]
    cells = {(m.seed, m.label): m for m in maps}
    rows = [[cells[s, label].image if (s, label) in cells else None for label in labels] for s in seeds]
    gain = {m.label: m.gain for m in maps}
    legends = [[label, f"mean {mean:.2f}/255", f"brightness ×{gain[label]}"] for label, mean in means.items()]
    title = f"{p.settings.prompt}  ·  |difference| maps"
    zoom = grid_zoom(p.settings.width, p.settings.height)
    return compose_grid(rows, [row_legend(s) for s in seeds], legends, title, zoom)
