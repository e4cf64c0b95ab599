"""Adapters side by side at fixed seeds: the pure parts of the comparison page, importable without Gradio.

A grid has one row per seed and one column per adapter and strength (and, optionally, one for the base model).
Every cell uses the same prompt, settings and seed, so the adapter and its strength are the only difference
between columns. The modules, in the order a request meets them:

- ``plan``: seeds, strengths and sweeps, column names, ``GenerationSettings``, ``plan_grid`` -> ``GridPlan``.
- ``render``: ``Comparer``, a pipeline with adapters loaded once, rendering a plan cell by cell.
- ``infotext``: captions, A1111-style ``parameters`` text, reading it back (``restore_form``), PNG text chunks.
- ``grid_image``: the composite grid PNG with legends.
- ``differences``: ``|a - b|`` maps between columns at one seed.
- ``scores``: per-column scores (toy-world scorer, CLIP-T / CLIP-I); ``report``: the per-column table, its CSV,
  and the difference grid image.
- ``snippet``: the diffusers code that renders a cell again; ``loading``: the base pipeline.
"""

from dora_diffusion.compare.differences import DifferenceMap, abs_difference, default_pair, difference_maps, difference_pairs, mean_differences
from dora_diffusion.compare.grid_image import GRID_MIN_SIDE, column_legend, compose_grid, row_legend
from dora_diffusion.compare.infotext import (
    RestoredForm,
    a1111_sampler,
    caption,
    column_name,
    format_strength,
    grid_infotext,
    infotext,
    parse_infotext,
    png_info,
    read_parameters,
    restore_form,
    save_png,
    scheduler_from_a1111,
)
from dora_diffusion.compare.loading import check_adapter_args
from dora_diffusion.hub import dtype_keyword, load_base_pipeline
from dora_diffusion.compare.plan import (
    BASE_LABEL,
    DEFAULT_MAX_CELLS,
    MAX_GUIDANCE,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    MAX_STRENGTH,
    MIN_SIDE,
    SCHEDULERS,
    Cell,
    Column,
    CompareError,
    GenerationSettings,
    GridPlan,
    check_adapter_name,
    check_strength,
    default_adapter_name,
    parse_adapter_arg,
    parse_seeds,
    parse_strengths,
    plan_grid,
)
from dora_diffusion.compare.render import AdapterInfo, CellResult, Comparer
from dora_diffusion.compare.report import column_table, difference_grid, pair_header, write_table_csv
from dora_diffusion.compare.scores import ClipScorer, ColumnScore, Scorer, ScoringUnavailable, ToyWorldScorer, make_scorer, score_columns
from dora_diffusion.compare.snippet import reproduce_snippet

__all__ = [
    "BASE_LABEL", "DEFAULT_MAX_CELLS", "GRID_MIN_SIDE", "MAX_GUIDANCE", "MAX_SEED", "MAX_SIDE", "MAX_STEPS",
    "MAX_STRENGTH", "MIN_SIDE", "SCHEDULERS", "AdapterInfo", "Cell", "CellResult", "ClipScorer", "Column",
    "ColumnScore", "CompareError", "Comparer", "DifferenceMap", "GenerationSettings", "GridPlan", "RestoredForm",
    "Scorer", "ScoringUnavailable", "ToyWorldScorer", "a1111_sampler", "abs_difference", "caption",
    "check_adapter_args", "check_adapter_name", "check_strength", "column_legend", "column_name", "column_table",
    "compose_grid", "default_adapter_name", "default_pair", "difference_grid", "difference_maps", "difference_pairs", "dtype_keyword",
    "format_strength", "grid_infotext", "infotext", "load_base_pipeline", "make_scorer", "mean_differences",
    "pair_header", "parse_adapter_arg", "parse_infotext", "parse_seeds", "parse_strengths", "plan_grid", "png_info",
    "read_parameters", "reproduce_snippet", "restore_form", "row_legend", "save_png", "scheduler_from_a1111",
    "score_columns", "write_table_csv",
]  # fmt: skip
