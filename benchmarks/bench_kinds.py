"""Unfused inference of LyCORIS kinds with DoRA against a LoRA-DoRA of the same size (issue 30, item 4).

    python benchmarks/bench_kinds.py --pairs 31                 # transformer stack (bench_paired's case), minutes
    python benchmarks/bench_kinds.py --pairs 1 --tokens 16 --blocks 1    # smoke test: runs every variant once

The case is bench_paired's: two SDXL transformer blocks at 1280 channels, 1024 tokens, adapters on ``--targets``.
Variants, each on the same modules, DoRA per output channel, random trained-looking factors:

- ``lora``: ours LoRA-DoRA, rank ``r`` (the low-rank kind: ``A``, ``B``, the fused inference path);
- ``loha``: LoHa-DoRA of rank ``r / 2`` (``(w1_a w1_b) ⊙ (w2_a w2_b)``: as many parameters as the LoRA);
- ``lokr``: LoKr-DoRA, ``w1`` a full ``f x f'`` block (``f`` the divisor of each side closest below ``--factor``),
  ``w2 = w2_a w2_b`` of rank ``r``;
- ``lokr_fused``: the LoKr fused into the weights (``fuse``), against the bare base: fused inference is free.

For each comparison it prints the median of per-pair wall-time ratios with its 95% interval and the CPU-time ratio
(``common.paired_ratio``, the method of ``bench_paired.py``). LoHa and LoKr take the ``dense`` forward path:
``k (W' - W0)`` is materialised once per change of the factors or ``W0`` (the first call after a load or a
strength change pays it) and each call adds one dense product ``(W' - W0) x`` beside ``W0 x``; the timed calls
reuse the cache, as a render's steps do.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_layers import infer, workload  # noqa: E402
from common import machine_line, paired_ratio  # noqa: E402

from dora_diffusion import AdapterConfig, add_adapter  # noqa: E402
from dora_diffusion.adapter_io import attach_adapter  # noqa: E402
from dora_diffusion.core.inject import adapted_layers  # noqa: E402
from dora_diffusion.formats.base import ModuleAdapter  # noqa: E402


def side(dim: int, factor: int) -> int:
    """The divisor of ``dim`` closest to ``factor`` from below (at least 1)."""
    return max(d for d in range(1, min(dim, factor) + 1) if dim % d == 0)


def kind_module(kind: str, weight: torch.Tensor, rank: int, factor: int, g: torch.Generator) -> ModuleAdapter:
    """Random factors of ``kind`` for a Linear weight (out, in), with a DoRA magnitude near ``||W0||``."""
    out_f, in_f = weight.shape
    rnd = lambda *shape: torch.randn(*shape, generator=g) * 0.05  # noqa: E731
    if kind == "loha":
        r = max(1, rank // 2)
        factors = {"w1_a": rnd(out_f, r), "w1_b": rnd(r, in_f), "w2_a": rnd(out_f, r), "w2_b": rnd(r, in_f)}
    else:
        a, b = side(out_f, factor), side(in_f, factor)
        factors = {"w1": rnd(a, b), "w2_a": rnd(out_f // a, rank), "w2_b": rnd(rank, in_f // b)}
    magnitude = weight.norm(dim=1) * (0.9 + 0.2 * torch.rand(out_f, generator=g))
    hadamard_or_kron = "hadamard" if kind == "loha" else "kronecker"
    return ModuleAdapter(None, None, magnitude, float(rank), "out", False, hadamard_or_kron, factors, 2)


def make_kind_variants(base: nn.Module, targets: str, rank: int, factor: int) -> dict[str, nn.Module]:
    """base / LoRA-DoRA / LoHa-DoRA / LoKr-DoRA / fused LoKr-DoRA copies of ``base``, all frozen (inference)."""
    base.requires_grad_(False)
    lora = copy.deepcopy(base)
    add_adapter(lora, AdapterConfig(rank=rank, alpha=rank, use_dora=True, targets=targets), "a")
    g = torch.Generator().manual_seed(1)
    names = list(adapted_layers(lora))
    with torch.no_grad():
        for layer in adapted_layers(lora).values():
            layer.adapters["a"].B.copy_(torch.randn(layer.adapters["a"].B.shape, generator=g) * 0.01)
    out = {"base": base, "lora": lora}
    for kind in ("loha", "lokr"):
        m = copy.deepcopy(base)
        mods = {n: kind_module(kind, m.get_submodule(n).weight, rank, factor, g) for n in names}
        attach_adapter({"m": m}, "a", {"m": mods})
        out[kind] = m
    out["lokr_fused"] = copy.deepcopy(out["lokr"])
    for layer in adapted_layers(out["lokr_fused"]).values():
        layer.fuse()
    for m in out.values():
        m.requires_grad_(False)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=31)
    ap.add_argument("--targets", default="attn_ff")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--factor", type=int, default=8, help="LoKr: the full w1 block is about factor x factor")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1024)
    args = ap.parse_args(argv)
    print(machine_line(), flush=True)
    base, inputs = workload("transformer", args.blocks, args.tokens)
    variants = make_kind_variants(base, args.targets, args.rank, args.factor)
    for m in variants.values():  # first call: builds each dense kind's cached change of weight
        infer(m, inputs)
    for label, a, b in (("infer lokr_dora/lora_dora", "lokr", "lora"), ("infer loha_dora/lora_dora", "loha", "lora"),
                        ("infer lokr fused/base", "lokr_fused", "base")):  # fmt: skip
        result = paired_ratio(lambda: infer(variants[a], inputs), lambda: infer(variants[b], inputs), args.pairs)
        print(f"transformer {args.targets} rank {args.rank}  {label:26s} {result}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
