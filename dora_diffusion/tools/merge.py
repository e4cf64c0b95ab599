"""``dora-diffusion merge``: several adapters at strengths into one adapter file, or into the base model.

Into one file, the merged change of a module is ``sum_j k_j (W'_j - W0)``:

- LoRAs only: stacked, ``A = [A_1; A_2; ...]``, ``B = [k_1 s_1 B_1, k_2 s_2 B_2, ...]``, alpha = the total rank
  (scale 1). Exact, without the base. With ``--rank`` a stack over it is truncated by SVD (then not exact).
- any DoRA (``--base`` needed: ``W'_j`` depends on ``W0``): exactly, a DoRA of the stacked ranks (``dora_stack``:
  the merged weight is a row scaling of ``W0`` plus the stacked low-rank terms); with ``--rank`` below the stacked
  rank, ``--energy`` or ``--kind lora``, the merged weight ``W = W0 + sum_j k_j (W'_j - W0)`` is extracted
  instead (``extract.fit_module``: DoRA with ``m`` = its row norms exactly, or LoRA), the error printed.

Into the base (``merge_into_base``): the pipeline with the adapters fused (``fuse_dora``) and saved with
``save_pretrained``, optionally in fp16.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch

from dora_diffusion.adapter_io import read_adapter
from dora_diffusion.formats import ModuleAdapter
from dora_diffusion.tools.extract import KINDS, fit_module
from dora_diffusion.tools.output import Report, check_output, tool_info, write_adapter
from dora_diffusion.tools.svd import check_fraction, check_rank, low_rank_svd
from dora_diffusion.tools.weights import (
    ModelFolder,
    Modules,
    adapter_delta,
    factors_shaped,
    flat,
    layer_adapter,
    model_modules,
    relative,
)


def _strengths(sources: Sequence, strengths: Sequence[float] | None) -> list[float]:
    if not sources:
        raise ValueError("name at least one adapter to merge")
    out = [1.0] * len(sources) if strengths is None else [float(k) for k in strengths]
    if len(out) != len(sources):
        raise ValueError(f"got {len(out)} strengths for {len(sources)} adapters; give one per adapter")
    return out


def _read_all(sources: Sequence, folder: ModelFolder | None) -> list[Modules]:
    """Each source's modules under model names; the same module must have the same shape in every source."""
    all_modules, seen = [], {}
    for src in sources:
        parsed, path = read_adapter(src)
        modules = model_modules(parsed, str(path), folder)
        for comp, mods in modules.items():
            for name, ma in mods.items():
                shape = (tuple(ma.b.shape[:1]), tuple(ma.a.shape[1:]))
                first = seen.setdefault((comp, name), (shape, path))
                if first[0] != shape:
                    raise ValueError(
                        f"mismatched bases: {comp}.{name} has weight shape {shape} in {path} and {first[0]} in {first[1]}"
                    )
        all_modules.append(modules)
    return all_modules


def _stack(parts: list[tuple[ModuleAdapter, float]]) -> ModuleAdapter:
    """One LoRA with the stacked ranks of ``(LoRA, strength)`` pairs: exactly ``sum_j k_j s_j B_j A_j``."""
    a = torch.cat([ma.a.float() for ma, _ in parts], dim=0)
    b = torch.cat([(k * ma.spec().scale) * ma.b.float() for ma, k in parts], dim=1)
    return ModuleAdapter(a, b, None, float(a.shape[0]))


SCALE_FLOOR = 1e-6
"""Smallest ``|1 + sum_j c_j|`` of a row for which ``dora_stack`` divides by it."""


@torch.no_grad()
def dora_stack(where: str, parts: list[tuple[ModuleAdapter, float]], w0: torch.Tensor) -> ModuleAdapter | None:
    """One DoRA of the stacked ranks giving exactly ``W0 + sum_j k_j (W'_j - W0)``, or None where none exists.

    Each part changes the weight by ``k_j (W'_j - W0) = c_j * W0 + B'_j A_j`` per output row (``Adapter.scaled``;
    LoRA: ``c_j = 0``), so the merged weight is ``W = diag(a) (W0 + B A)`` with ``a = 1 + sum_j c_j``, ``A = [A_1;
    A_2; ...]`` and ``B = [diag(1/a) B'_1, ...]``: a DoRA with ``m = a ||row(W0 + B A)||`` (signed where a row's
    scale turned negative). None if a row has ``|a| < SCALE_FLOOR`` or a part is a per-input (legacy) DoRA.
    """
    if any(ma.use_dora and ma.norm_axis != "out" for ma, _ in parts):
        return None
    scale = torch.ones(w0.shape[0])
    bs = []
    for ma, k in parts:
        c, b_scaled = layer_adapter(where, ma, w0).scaled(k)
        scale += 0 if c is None else c.float()
        bs.append(b_scaled.float())
    if float(scale.abs().min()) < SCALE_FLOOR:
        return None
    view = (-1,) + (1,) * (bs[0].dim() - 1)
    b = torch.cat([bb / scale.view(view) for bb in bs], dim=1)
    a = torch.cat([ma.a.float() for ma, _ in parts], dim=0)
    direction = flat(w0.float()) + flat(b) @ a.reshape(a.shape[0], -1)  # (d_out, K)
    magnitude = scale * direction.double().norm(dim=1).float()
    return ModuleAdapter(a, b, magnitude, float(a.shape[0]))


def merge_adapters(
    sources: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    strengths: Sequence[float] | None = None,
    base: str | os.PathLike | None = None,
    rank: int | None = None,
    energy: float | None = None,
    kind: str | None = None,
    iterations: int = 20,
    to: str = "diffusers",
    overwrite: bool = False,
) -> Report:
    """Merge the adapters at ``sources`` with ``strengths`` (default 1 each) into one file at ``output``; returns the
    report (``report.exact`` says whether the result is exact). Default: LoRAs stacked, or with a DoRA an exact DoRA
    of the stacked ranks; ``rank`` below the stacked rank, ``energy`` or ``kind="lora"`` extract the merged
    weights instead."""
    ks = _strengths(sources, strengths)
    check_rank(rank)
    check_fraction(energy, "--energy")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    out = check_output(output, [*sources, base], overwrite)
    folder = None if base is None else ModelFolder(base)
    all_modules = _read_all(sources, folder)
    any_dora = any(ma.use_dora for mods in all_modules for comp in mods.values() for ma in comp.values())
    stacked = kind is None and not any_dora and energy is None
    if not stacked and folder is None:
        raise ValueError(
            "merging DoRA adapters (or --kind / --energy) needs the base weights W0 (W' depends on them): pass --base"
        )
    exact_dora = (kind == "dora" or (kind is None and any_dora)) and energy is None
    if not stacked and not exact_dora and rank is None and energy is None:
        raise ValueError("extracting the merged weights (--kind lora) needs --rank or --energy")
    names: dict[str, list[str]] = {}
    for mods in all_modules:
        for comp, per in mods.items():
            names.setdefault(comp, []).extend(n for n in per if n not in names[comp])
    report, merged = Report("merge", exact=stacked or exact_dora), {}
    kind = kind or ("dora" if any_dora else "lora")
    for comp, per in names.items():
        for name in per:
            parts = [(mods[comp][name], k) for mods, k in zip(all_modules, ks) if name in mods.get(comp, {})]
            if stacked:
                ma = _stack(parts)
                if rank is not None and ma.rank > rank:
                    fit = low_rank_svd(flat(ma.b), flat(ma.a))
                    b, a = factors_shaped(*fit.factors(rank), tuple(ma.b.shape[:1]) + tuple(ma.a.shape[1:]))
                    ma, report.exact = ModuleAdapter(a, b, None, float(rank)), False
                    report.add(comp, name, rank, fit.tail(rank), fit.tail(rank))
                else:
                    report.add(comp, name, ma.rank, 0.0, 0.0)
                merged.setdefault(comp, {})[name] = ma
                continue
            w0 = folder.weight(comp, name).float()
            delta = sum(adapter_delta(f"{comp}.{name}", p, w0, k) for p, k in parts)
            total = sum(p.rank for p, _ in parts)
            ma = dora_stack(f"{comp}.{name}", parts, w0) if exact_dora and (rank is None or total <= rank) else None
            if ma is None:
                if rank is None and energy is None:
                    raise ValueError(
                        f"{comp}.{name} has no exact merged DoRA (a per-input DoRA, or a row whose scale cancels): "
                        "give --rank or --energy to extract the merged weights"
                    )
                report.exact = False
                ma = fit_module(w0 + delta, w0, kind, rank, energy, iterations)
            diff = float((adapter_delta(f"{comp}.{name}", ma, w0) - delta).norm())
            report.add(comp, name, ma.rank, relative(diff, float((w0 + delta).norm())), relative(diff, float(delta.norm())))
            merged.setdefault(comp, {})[name] = ma
    if stacked:
        report.notes.append("exact: LoRAs stacked" if report.exact else "LoRAs stacked, then truncated to --rank")
    else:
        how = "exact: a DoRA of the stacked ranks" if report.exact else f"through the merged weights, extracted as a {kind}"
        report.notes.append(how)
    settings = {"strengths": ks, "rank": rank, "energy": energy, "kind": kind, "stacked": stacked}
    info = tool_info("merge", {f"adapter_{i}": s for i, s in enumerate(sources)} | {"base": base}, settings, report)
    report.output = write_adapter(merged, out, to, info, folder)
    return report


MERGE_INFO_NAME = "dora_diffusion_merge.json"
"""The file beside ``model_index.json`` in a merged pipeline folder saying what made it."""


def merge_into_base(
    sources: Sequence[str | os.PathLike],
    base: str | os.PathLike,
    output: str | os.PathLike,
    strengths: Sequence[float] | None = None,
    fp16: bool = False,
    overwrite: bool = False,
) -> Report:
    """Fuse the adapters at ``sources`` with ``strengths`` into the SDXL pipeline ``base`` (a diffusers folder or
    Hub id) and ``save_pretrained`` it to the folder ``output`` (fp16 with ``fp16``), with ``MERGE_INFO_NAME``
    beside it; returns the report (no rows: the fused weights are exact in fp32; its notes count the modules)."""
    from dora_diffusion.hub import load_base_pipeline
    from dora_diffusion.pipeline import fuse_dora, load_dora_weights, set_dora_adapters, unload_dora_weights
    from dora_diffusion.pipeline.registry import AdapterRegistry

    ks = _strengths(sources, strengths)
    out = check_output(output, [*sources, base], overwrite, folder=True)
    pipe = load_base_pipeline(str(base), device="cpu", dtype="float32")
    names = [load_dora_weights(pipe, src, adapter_name=f"merge_{i}") for i, src in enumerate(sources)]
    set_dora_adapters(pipe, names, ks)
    registry = AdapterRegistry.of(pipe)
    fuse_dora(pipe)
    fused = {c: {n: layer.weight.detach().clone() for n, layer in per.items()} for c, per in registry.layers.items()}
    unload_dora_weights(pipe)
    report, largest = Report("merge --into-base", exact=not fp16), 0.0
    with torch.no_grad():
        for comp, per in fused.items():
            model = getattr(pipe, comp)
            for name, weight in per.items():
                target = model.get_submodule(name).weight  # W0 again: unloading restored it
                change = relative(float((weight.float() - target.float()).norm()), float(target.float().norm()))
                largest = max(largest, change)
                target.copy_(weight)
    count = sum(len(per) for per in fused.values())
    if fp16:
        pipe.to(torch.float16)
    pipe.save_pretrained(out, safe_serialization=True)
    info = tool_info("merge --into-base", {f"adapter_{i}": s for i, s in enumerate(sources)} | {"base": base},
                     {"strengths": ks, "fp16": fp16}, report)  # fmt: skip
    (out / MERGE_INFO_NAME).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    saved = " (saved in fp16)" if fp16 else ""
    report.notes.append(f"fused {count} modules of {len(sources)} adapters into {base}{saved}")
    report.notes.append(f"largest change of a weight, ||W - W0|| / ||W0||: {largest:.3e}")
    report.output = out
    return report
