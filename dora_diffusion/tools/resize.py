"""``dora-diffusion resize``: change an adapter's rank, DoRA magnitudes kept exactly.

Per module the update ``s B A`` is truncated by SVD (computed from the factors, never forming the matrix) to the
new rank: one rank for all, or per module by kohya ``resize_lora.py``'s dynamic methods (``sv_ratio``,
``sv_cumulative``, ``sv_fro`` = retained Frobenius energy), capped by ``--rank``. A DoRA keeps ``m`` as it is, so
the row norms of ``W'`` stay exactly ``m``; only the direction's update is truncated. A module whose new rank is not
below its own is copied unchanged (exact, bit for bit). The error printed is the update's, ``||s'B'A' - sBA|| /
||sBA||``; with ``--base`` also the weight's, ``||W'_new - W'|| / ||W'||``.
"""

from __future__ import annotations

import os

from dora_diffusion.adapter_io import read_adapter
from dora_diffusion.formats import ModuleAdapter
from dora_diffusion.tools.output import Report, check_output, tool_info, write_adapter
from dora_diffusion.tools.svd import DYNAMIC_METHODS, check_rank, dynamic_rank, low_rank_svd
from dora_diffusion.tools.weights import ModelFolder, adapter_delta, factors_shaped, flat, model_modules, relative


def resize(
    source: str | os.PathLike,
    output: str | os.PathLike,
    rank: int,
    dynamic_method: str | None = None,
    dynamic_param: float | None = None,
    base: str | os.PathLike | None = None,
    to: str | None = None,
    overwrite: bool = False,
) -> Report:
    """Write the adapter at ``source`` with ranks at most ``rank`` (per module by ``dynamic_method`` at
    ``dynamic_param`` if given) to ``output``; returns the report. ``base`` (a diffusers SDXL folder) adds the
    weight error; ``to`` is ``"diffusers"`` or ``"kohya"`` (default: the source's dialect)."""
    check_rank(rank)
    if dynamic_method is not None:
        if dynamic_method not in DYNAMIC_METHODS:
            raise ValueError(f"--dynamic-method must be one of {', '.join(DYNAMIC_METHODS)}, got {dynamic_method!r}")
        if dynamic_param is None:
            raise ValueError(
                f"--dynamic-method {dynamic_method} needs --dynamic-param (a ratio >= 1 for sv_ratio, a fraction for the others)"
            )
    out = check_output(output, [source, base], overwrite)
    parsed, path = read_adapter(source)
    folder = None if base is None else ModelFolder(base)
    modules = model_modules(parsed, str(path), folder)
    report, resized = Report("resize", exact=True), {}
    for comp, mods in modules.items():
        for name, ma in mods.items():
            fit = low_rank_svd(flat(ma.b).float(), flat(ma.a).float(), ma.spec().scale)
            r = rank if dynamic_method is None else dynamic_rank(fit.s, dynamic_method, dynamic_param, rank)
            if r >= ma.rank:
                resized.setdefault(comp, {})[name] = ma
                report.add(comp, name, ma.rank, 0.0, 0.0)
                continue
            b, a = factors_shaped(*fit.factors(r), tuple(ma.b.shape[:1]) + tuple(ma.a.shape[1:]))
            new = ModuleAdapter(a, b, ma.magnitude, float(a.shape[0]), ma.norm_axis)
            resized.setdefault(comp, {})[name] = new
            report.exact = False
            error = change = fit.tail(new.rank)
            if folder is not None:
                w0 = folder.weight(comp, name).float()
                old = w0 + adapter_delta(f"{comp}.{name}", ma, w0)
                diff = float((w0 + adapter_delta(f"{comp}.{name}", new, w0) - old).norm())
                error, change = relative(diff, float(old.norm())), relative(diff, float((old - w0).norm()))
            report.add(comp, name, new.rank, error, change)
    if folder is None:
        report.notes.append("errors are the low-rank update's (pass --base for the weight's)")
    settings = {"rank": rank, "dynamic_method": dynamic_method, "dynamic_param": dynamic_param}
    info = tool_info("resize", {"adapter": path, "base": base}, settings, report)
    carried = {k: v for k, v in parsed.metadata.items() if k.startswith(("ss_", "modelspec."))}
    report.output = write_adapter(resized, out, to or parsed.dialect, info, folder, carried)
    return report
