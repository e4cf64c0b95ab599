"""``dora-diffusion merge``: several adapters at strengths into one adapter file, or into the base model.

Into one file, the merged change of a module is ``sum_j k_j (W'_j - W0)``:

- LoRAs only: stacked, ``A = [A_1; A_2; ...]``, ``B = [k_1 s_1 B_1, k_2 s_2 B_2, ...]``, alpha = the total rank
  (scale 1). Exact, without the base. With ``--rank`` a stack over it is truncated by SVD (then not exact).
- any DoRA: ``W'_j`` depends on ``W0`` and DoRA's normalisation does not add, so the merged weight
  ``W = W0 + sum_j k_j (W'_j - W0)`` is formed per module (``--base`` needed) and extracted at ``--rank`` /
  ``--energy`` as a DoRA (``m`` = its row norms, exactly) or a LoRA (``--kind lora``), the error printed.

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
from dora_diffusion.tools.weights import ModelFolder, Modules, adapter_delta, factors_shaped, flat, model_modules, relative


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
    report (``report.exact`` says whether the result is exact). ``kind`` ``"dora"`` / ``"lora"`` forces the
    extraction route (default: stacked if all are LoRAs, else a DoRA extraction)."""
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
        raise ValueError("merging DoRA adapters (or --kind / --energy) goes through the merged weights W0 + sum k (W' - W0): pass --base")
    if not stacked and rank is None and energy is None:
        raise ValueError("merging DoRA adapters extracts the merged weights: give --rank or --energy")
    names: dict[str, list[str]] = {}
    for mods in all_modules:
        for comp, per in mods.items():
            names.setdefault(comp, []).extend(n for n in per if n not in names[comp])
    report, merged = Report("merge", exact=stacked), {}
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
            ma = fit_module(w0 + delta, w0, kind, rank, energy, iterations)
            diff = float((adapter_delta(f"{comp}.{name}", ma, w0) - delta).norm())
            report.add(comp, name, ma.rank, relative(diff, float((w0 + delta).norm())), relative(diff, float(delta.norm())))
            merged.setdefault(comp, {})[name] = ma
    report.notes.append("exact: LoRAs stacked" if report.exact else f"through the merged weights, extracted as a {kind}" if not stacked else "stacked, then truncated to --rank")
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
    beside it; returns the report (one row per fused module: its change ``||W - W0|| / ||W0||`` as the error)."""
    from dora_diffusion.hub import load_base_pipeline
    from dora_diffusion.pipeline import fuse_dora, load_dora_weights, set_dora_adapters, unload_dora_weights
    from dora_diffusion.pipeline.registry import AdapterRegistry

    ks = _strengths(sources, strengths)
    out = check_output(output, [*sources, base], overwrite, folder=True)
    pipe = load_base_pipeline(str(base), device="cpu", dtype="float32")
    names = [load_dora_weights(pipe, src, adapter_name=f"merge_{i}") for i, src in enumerate(sources)]
    set_dora_adapters(pipe, names, ks)
    registry = AdapterRegistry.of(pipe)
    originals = {c: {n: layer.weight.detach().clone() for n, layer in per.items()} for c, per in registry.layers.items()}
    fuse_dora(pipe)
    fused = {c: {n: layer.weight.detach().clone() for n, layer in per.items()} for c, per in registry.layers.items()}
    unload_dora_weights(pipe)
    report = Report("merge", exact=not fp16)
    with torch.no_grad():
        for comp, per in fused.items():
            model = getattr(pipe, comp)
            for name, weight in per.items():
                model.get_submodule(name).weight.copy_(weight)
                w0 = originals[comp][name].float()
                report.add(comp, name, 0, relative(float((weight - w0).norm()), float(w0.norm())), 0.0)
    if fp16:
        pipe.to(torch.float16)
    pipe.save_pretrained(out, safe_serialization=True)
    info = tool_info("merge --into-base", {f"adapter_{i}": s for i, s in enumerate(sources)} | {"base": base},
                     {"strengths": ks, "fp16": fp16}, report)  # fmt: skip
    (out / MERGE_INFO_NAME).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    report.notes.append(f"fused {len(report.rows)} modules of {len(sources)} adapters into {base}" + (" (fp16)" if fp16 else ""))
    report.output = out
    return report
