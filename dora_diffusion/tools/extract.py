"""``dora-diffusion extract``: an adapter from a fine-tuned model and its base, one module at a time.

For each Linear/Conv2d module whose weight differs (``W_t`` fine-tuned, ``W0`` base):

- DoRA (default): ``m = ||row_i(W_t)||`` exactly; the direction by a rank-r truncated SVD (``svd.dora_fit``), so
  all of the rank goes to direction;
- LoRA: the rank-r truncated SVD of ``W_t - W0``.

The rank is ``--rank`` or, per module, the smallest keeping ``--energy`` of the change's Frobenius norm (capped by
``--rank`` if both are given). Only two weights of one module are held at a time (``weights.WeightFile`` reads
them without a memory map). The error printed per module is ``||W' - W_t|| / ||W_t||`` and ``||W' - W_t|| / ||W_t - W0||``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from dora_diffusion.formats import ModuleAdapter
from dora_diffusion.tools.output import Report, check_output, tool_info, write_adapter
from dora_diffusion.tools.svd import check_fraction, check_rank, dora_fit, energy_rank, svd
from dora_diffusion.tools.weights import ModelFolder, adapter_delta, factors_shaped, flat, relative

KINDS = ("dora", "lora")


def check_same_model(finetuned: ModelFolder, base: ModelFolder) -> None:
    """Raise ``ValueError`` unless both folders have the same components, module names and weight shapes."""
    if finetuned.components != base.components:
        raise ValueError(
            f"mismatched bases: {finetuned.path} has components {finetuned.components}, {base.path} has {base.components}"
        )
    for comp in base.components:
        a, b = finetuned.shapes(comp), base.shapes(comp)
        if a != b:
            only = sorted(set(a) ^ set(b))
            shapes = sorted(n for n in set(a) & set(b) if a[n] != b[n])
            what = f"modules {only[:3]} are in one only" if only else f"{comp}.{shapes[0]} is {a[shapes[0]]} vs {b[shapes[0]]}"
            raise ValueError(
                f"mismatched bases: {finetuned.path} and {base.path} differ in {comp}: {what}; is it the base model of the "
                "fine-tune?"
            )


def other_changes(finetuned: ModelFolder, base: ModelFolder, components: list[str]) -> int:
    """How many tensors besides the Linear/Conv2d weights (biases, norms, embeddings) differ: an adapter cannot
    carry them, so the extraction leaves them at the base's values."""
    changed = 0
    for comp in components:
        covered = set()
        for name in finetuned.shapes(comp):
            covered |= {f"{name}.weight", f"text_model.{name}.weight", f"{name.removeprefix('text_model.')}.weight"}
        for key in finetuned.keys(comp):
            if key not in covered:
                theirs = base.tensor(comp, key)
                changed += theirs is None or not torch.equal(finetuned.tensor(comp, key), theirs)
    return changed


def fit_module(
    target: torch.Tensor, w0: torch.Tensor, kind: str, rank: int | None, energy: float | None, iterations: int
) -> ModuleAdapter:
    """An adapter of ``kind`` for one module whose fine-tuned weight is ``target`` over ``w0`` (file shapes)."""
    shape = tuple(w0.shape)
    if kind == "dora":
        fit = dora_fit(flat(target), flat(w0), rank, energy, iterations)
        b, a = factors_shaped(fit.b, fit.a, shape)
        return ModuleAdapter(a, b, fit.magnitude, float(fit.rank))
    decomposition = svd(flat(target.float() - w0.float()))
    r = rank if energy is None else min(energy_rank(decomposition.s, energy), rank or decomposition.s.numel())
    b, a = factors_shaped(*decomposition.factors(r), shape)
    return ModuleAdapter(a, b, None, float(a.shape[0]))


def extract(
    finetuned: str | os.PathLike,
    base: str | os.PathLike,
    output: str | os.PathLike,
    rank: int | None = None,
    energy: float | None = None,
    kind: str = "dora",
    components: Iterable[str] | None = None,
    iterations: int = 20,
    to: str = "diffusers",
    overwrite: bool = False,
) -> Report:
    """Write the adapter that takes the diffusers folder ``base`` to ``finetuned`` (a DoRA or a LoRA, ``kind``) at
    ``rank`` or at retained ``energy`` to ``output``; returns the report. ``components``: the ones to extract
    (default every one with a changed module)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if rank is None and energy is None:
        raise ValueError("give --rank, --energy or both (the rank, or the fraction of each change's norm to keep)")
    check_rank(rank)
    check_fraction(energy, "--energy")
    check_rank(iterations, "--iterations")
    out = check_output(output, [finetuned, base], overwrite)
    ft, b0 = ModelFolder(finetuned), ModelFolder(base)
    check_same_model(ft, b0)
    wanted = list(b0.components if components is None else components)
    unknown = [c for c in wanted if c not in b0.components]
    if unknown:
        raise ValueError(f"unknown components {unknown}; {base} has {b0.components}")
    report, modules, unchanged = Report("extract"), {}, 0
    for comp, name, _ in b0.modules():
        if comp not in wanted:
            continue
        w0, wt = b0.weight(comp, name), ft.weight(comp, name)
        if torch.equal(w0, wt):
            unchanged += 1
            continue
        w0, wt = w0.float(), wt.float()
        ma = fit_module(wt, w0, kind, rank, energy, iterations)
        modules.setdefault(comp, {})[name] = ma
        diff = float((w0 + adapter_delta(f"{comp}.{name}", ma, w0) - wt).norm())
        report.add(comp, name, ma.rank, relative(diff, float(wt.norm())), relative(diff, float((wt - w0).norm())))
        del w0, wt
    if not modules:
        raise ValueError(f"no Linear or Conv2d weight of {finetuned} differs from {base} in {wanted}; nothing to extract")
    report.notes.append(f"{unchanged} modules unchanged (skipped)")
    others = other_changes(ft, b0, wanted)
    if others:
        report.notes.append(f"{others} other tensors (biases, norms, embeddings) differ; an adapter cannot carry them")
    settings = {"kind": kind, "rank": rank, "energy": energy, "iterations": iterations, "components": wanted}
    info = tool_info("extract", {"finetuned": finetuned, "base": base}, settings, report)
    report.output = write_adapter(modules, out, to, info, b0)
    return report

