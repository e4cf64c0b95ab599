"""``dora-diffusion analyze``: measure adapter files and training checkpoints against a base model.

``add_analyze_parser`` registers the subcommand; ``run_analyze`` loads the base (``scan.load_base``), loads and
measures each adapter of ``sources.adapter_sources`` alone, prints the summary and writes ``analysis.csv`` and
``analysis.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

from dora_diffusion_cli import declare_analyze
from dora_diffusion.formats import AdapterFileError
from dora_diffusion.formats.safefile import printable
from dora_diffusion.pipeline import delete_dora_adapters, load_dora_weights
from dora_diffusion.analysis.plot import plot
from dora_diffusion.analysis.scan import BASE_DTYPES, Row, analyze_pipeline, load_base, write_csv
from dora_diffusion.analysis.sources import adapter_sources, file_method
from dora_diffusion.analysis.summary import format_summary, pool_checkpoints, summarize


def add_analyze_parser(subparsers) -> None:
    """Register ``dora-diffusion analyze`` (its arguments are declared in ``dora_diffusion_cli``)."""
    declare_analyze(subparsers).set_defaults(func=run_analyze)


PRINTED_LIMIT = 4000
"""Longest line printed; labels, methods and paths come from file names and headers, so control characters are
escaped."""


def _print(text: str, file=None) -> None:
    for line in text.splitlines() or [""]:
        print(printable(line, PRINTED_LIMIT), file=file)


def _error(message: str) -> int:
    _print(f"dora-diffusion analyze: error: {message}", file=sys.stderr)
    return 2


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
    for label, path in sources:
        name = printable(label, PRINTED_LIMIT)  # a file name's line breaks and escapes, escaped in every output
        try:
            load_dora_weights(pipe, path, adapter_name=name)
        except (AdapterFileError, ValueError) as err:
            return _error(f"adapter {path} does not fit {args.base}: {err}")
        found = analyze_pipeline(pipe, [name])
        method = file_method(path)
        method = printable(method, 100) if method else method
        rows += [replace(r, method=method) for r in found] if method else found
        delete_dora_adapters(pipe, name)
    if args.modules:
        names = [n.strip().strip(".") for n in args.modules.split(",") if n.strip().strip(".")]
        kept = [r for r in rows if any(r.module == n or r.module.endswith("." + n) for n in names)]
        if not kept:
            return _error(f"--modules {args.modules}: no module an adapter changes has a name ending with "
                          f"{' or '.join(names) or 'that'} (e.g. {rows[0].module if rows else 'attn1.to_q'})")  # fmt: skip
        rows = kept
    out = Path(args.out)
    _print(format_summary(summarize(rows)))
    pooled = pool_checkpoints(rows)
    if pooled is not rows:
        _print("\nper training run, all its checkpoints together (as the paper's Figure 2):")
        _print(format_summary(summarize(pooled)))
    csv_path = write_csv(rows, out / "analysis.csv")
    png_path = plot(pooled, out / "analysis.png", args.title)
    _print(f"wrote {csv_path} ({len(rows)} rows)")
    _print(f"wrote {png_path}")
    return 0
