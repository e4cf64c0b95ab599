"""Time ratios that hold on a noisy machine: many interleaved pairs, the median of per-pair ratios, a 95% interval.

    python benchmarks/bench_paired.py --pairs 31              # transformer stack (bench_layers --quick's case), ~4 min
    python benchmarks/bench_paired.py --pairs 31 --targets attn attn_ff --ranks 16

For each case (two SDXL transformer blocks at 1280 channels, 1024 tokens; rank, targets) and comparison it runs
``--pairs`` pairs of calls back to back, alternating which goes first, and reports the median of the per-pair
ratios with a distribution-free 95% interval (``common.median_interval``), for wall time and for the process's
CPU time (user + sys) beside it. A figure counts only when its wall interval is within +-3% of its median.
Comparisons: training step DoRA / LoRA (ours, default recompute mode), unfused inference DoRA / LoRA (ours),
training step PEFT DoRA / ours DoRA.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_layers import infer, make_variants, train_step, workload  # noqa: E402
from common import machine_line, paired_ratio  # noqa: E402

COMPARISONS = (
    ("train dora/lora", "train", "dora", "lora"),
    ("infer dora/lora", "infer", "dora", "lora"),
    ("train peft_dora/dora", "train", "peft_dora", "dora"),
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=31)
    ap.add_argument("--targets", nargs="+", default=["attn_ff"])
    ap.add_argument("--ranks", type=int, nargs="+", default=[16])
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1024)
    args = ap.parse_args(argv)
    torch.set_grad_enabled(True)
    print(machine_line(), flush=True)
    for targets in args.targets:
        for rank in args.ranks:
            base, inputs = workload("transformer", args.blocks, args.tokens)
            variants = make_variants(base, targets, rank)
            step = {"train": train_step, "infer": infer}
            for label, kind, a, b in COMPARISONS:
                result = paired_ratio(
                    lambda: step[kind](variants[a], inputs), lambda: step[kind](variants[b], inputs), args.pairs
                )
                print(f"transformer {targets} rank {rank}  {label:22s} {result}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
