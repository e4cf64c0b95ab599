"""``dora-diffusion bake``: a DoRA (or LoRA) as a plain LoRA of rank r, for loaders that cannot apply DoRA.

Per module the change ``ΔW = W' - W0`` (``W0`` from the base model: DoRA's ``W'`` depends on it) is truncated by
SVD to rank r: the best rank-r LoRA in the Frobenius norm (Eckart-Young). A LoRA module at or under rank r is
copied as it is (exact, bit for bit); over r, its own ``s B A`` is truncated without the base. The recommended
rank is the smallest that keeps every module's change error ``||ΔW_r - ΔW|| / ||ΔW||`` under the threshold.
"""

from __future__ import annotations

import os

import torch

from dora_diffusion.adapter_io import read_adapter
from dora_diffusion.formats import ModuleAdapter
from dora_diffusion.tools.output import Report, check_output, tool_info, write_adapter
from dora_diffusion.tools.svd import Svd, check_fraction, check_rank, low_rank_svd, svd
from dora_diffusion.tools.weights import ModelFolder, adapter_delta, factors_shaped, flat, model_modules, relative


def rank_for(fit: Svd, threshold: float) -> int:
    """The smallest rank whose truncation's relative error (``fit.tail(r)``) is at most ``threshold``."""
    sq = fit.s.double().square()
    total = float(sq.sum())
    if total == 0:
        return 1
    tails = (total - torch.cumsum(sq, 0)).clamp_min(0).div(total).sqrt()  # tails[r - 1] = fit.tail(r)
    return min(int((tails > threshold).sum()) + 1, fit.s.numel())


def _lora(fit: Svd, rank: int, shape: tuple[int, ...]) -> ModuleAdapter:
    b, a = fit.factors(rank)
    b, a = factors_shaped(b, a, shape)
    return ModuleAdapter(a, b, None, float(a.shape[0]))


def bake(
    source: str | os.PathLike,
    output: str | os.PathLike,
    rank: int,
    base: str | os.PathLike | None = None,
    threshold: float = 0.05,
    dynamic: bool = False,
    to: str | None = None,
    overwrite: bool = False,
) -> Report:
    """Write the adapter at ``source`` as a plain LoRA of rank at most ``rank`` to ``output``; returns the report.

    ``base`` (a diffusers SDXL folder) is needed for DoRA modules. ``threshold`` sets the recommended rank (printed);
    with ``dynamic`` each module gets the smallest rank under it (capped by ``rank``). ``to``: ``"diffusers"`` or
    ``"kohya"`` (default: the source's dialect).
    """
    check_rank(rank)
    check_fraction(threshold, "--threshold")
    out = check_output(output, [source, base], overwrite)
    parsed, path = read_adapter(source)
    folder = None if base is None else ModelFolder(base)
    modules = model_modules(parsed, str(path), folder)
    if folder is None and any(m.use_dora for mods in modules.values() for m in mods.values()):
        raise ValueError(
            f"{path} is a DoRA: its weights W' depend on the base weights W0; pass --base (the SDXL folder it was trained on)"
        )
    report, baked, recommended = Report("bake", exact=True), {}, 1
    for comp, mods in modules.items():
        for name, ma in mods.items():
            where = f"{comp}.{name}"
            w0 = None if folder is None else folder.weight(comp, name).float()
            if not ma.use_dora:
                fit = low_rank_svd(flat(ma.b).float(), flat(ma.a).float(), ma.spec().scale)
                delta = None
            else:
                delta = adapter_delta(where, ma, w0)
                fit = svd(flat(delta))
            need = rank_for(fit, threshold)
            recommended = max(recommended, need)
            r = min(rank, need) if dynamic else rank
            if not ma.use_dora and r >= ma.rank:
                baked.setdefault(comp, {})[name] = ma  # a LoRA at its rank: copied, exact
                report.add(comp, name, ma.rank, 0.0, 0.0)
                continue
            new = _lora(fit, r, tuple(ma.b.shape[:1]) + tuple(ma.a.shape[1:]))
            baked.setdefault(comp, {})[name] = new
            report.exact = False
            change = fit.tail(new.rank)
            if w0 is None:
                report.add(comp, name, new.rank, change, change)
            else:
                delta = adapter_delta(where, ma, w0) if delta is None else delta
                err = float((adapter_delta(where, new, w0) - delta).norm())
                weight_error = relative(err, float((w0 + delta).norm()))
                report.add(comp, name, new.rank, weight_error, relative(err, float(delta.norm())))
    report.notes.append(f"recommended rank for a change error <= {threshold:g} in every module: {recommended}")
    if folder is None:
        report.notes.append("no --base: the error column is the change error (the weight error needs W0)")
    settings = {"rank": rank, "threshold": threshold, "dynamic": dynamic, "recommended_rank": recommended}
    info = tool_info("bake", {"adapter": path, "base": base}, settings, report)
    carried = {k: v for k, v in parsed.metadata.items() if k.startswith(("ss_", "modelspec."))}
    report.output = write_adapter(baked, out, to or parsed.dialect, info, folder, carried)
    return report

