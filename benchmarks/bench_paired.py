"""Time ratios that hold on a noisy machine: many interleaved pairs, the median of per-pair ratios, a 95% interval.

    python benchmarks/bench_paired.py --pairs 31              # transformer stack (bench_layers --quick's case), ~7 min
    python benchmarks/bench_paired.py --pairs 31 --targets attn attn_ff --memory
    python benchmarks/bench_paired.py --pairs 0 --unet 32 --unet_pairs 9   # full SDXL UNet only, 32x32 latent

For each case (two SDXL transformer blocks at 1280 channels, 1024 tokens; rank, targets) and comparison it runs
``--pairs`` pairs of calls back to back, alternating which goes first, and reports the median of the per-pair
ratios with a distribution-free 95% interval (``common.median_interval``), for wall time and for the process's
CPU time (user + sys) beside it. A figure counts only when its wall interval is within +-3% of its median.
Comparisons: training step DoRA / LoRA (ours, default recompute mode), unfused inference DoRA / LoRA (ours),
training step PEFT DoRA / ours DoRA. With ``--memory``, beside them the peak resident memory of a training step
DoRA / LoRA, measured as ``bench_layers`` does (a fresh process whose glibc returns freed blocks at once;
memory is not noisy: one measurement, the median of 3 steps).

``--unet LATENT`` adds the full SDXL UNet (config in code, random weights, 2.6 B parameters fp32) with gradient
checkpointing and recompute mode ``none``, as ``train_dreambooth_dora.py`` runs it: training step DoRA / LoRA
on ``--targets``, ``--unet_pairs`` pairs (a step takes tens of seconds on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_layers import infer, make_variants, train_step, workload  # noqa: E402
from bench_unet import build_unet, perturb_b, step, unet_inputs  # noqa: E402
from common import machine_line, paired_ratio, peak_bytes, pin_malloc  # noqa: E402

from dora_diffusion import AdapterConfig, add_adapter, set_recompute, trainable_parameters  # noqa: E402
from dora_diffusion.core.inject import adapted_layers  # noqa: E402

COMPARISONS = (
    ("train dora/lora", "train", "dora", "lora"),
    ("infer dora/lora", "infer", "dora", "lora"),
    ("train peft_dora/dora", "train", "peft_dora", "dora"),
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=31)
    ap.add_argument("--targets", nargs="+", default=["attn_ff"])
    ap.add_argument("--peft_targets", nargs="*", default=["attn_ff"], help="targets where PEFT DoRA / ours is timed")
    ap.add_argument("--ranks", type=int, nargs="+", default=[16])
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--memory", action="store_true", help="also the peak-memory ratio DoRA / LoRA of a training step")
    ap.add_argument("--memory_child", help=argparse.SUPPRESS)  # targets; the fresh process that measures memory
    ap.add_argument("--unet", type=int, nargs="*", default=[], help="latent sides for the full-UNet case")
    ap.add_argument("--unet_pairs", type=int, default=9)
    args = ap.parse_args(argv)
    torch.set_grad_enabled(True)
    if args.memory_child:
        pin_malloc()
        base, inputs = workload("transformer", args.blocks, args.tokens)
        variants = make_variants(base, args.memory_child, args.ranks[0])
        print(json.dumps({k: peak_bytes(lambda m=variants[k]: train_step(m, inputs)) for k in ("dora", "lora")}))
        return 0
    print(machine_line(), flush=True)
    for targets in args.targets if args.memory else []:
        child = [*sys.argv[:1], "--memory_child", targets, "--blocks", str(args.blocks), "--tokens", str(args.tokens)]
        peak = json.loads(subprocess.run([sys.executable, *child], check=True, capture_output=True, text=True).stdout)
        print(f"transformer {targets} rank {args.ranks[0]}  peak memory dora/lora {peak['dora'] / peak['lora']:.3f} "
              f"(MB above resident: dora {peak['dora'] / 2**20:.1f}, lora {peak['lora'] / 2**20:.1f})", flush=True)  # fmt: skip
    for targets in args.targets if args.pairs else []:
        for rank in args.ranks:
            base, inputs = workload("transformer", args.blocks, args.tokens)
            variants = make_variants(base, targets, rank)
            step = {"train": train_step, "infer": infer}
            for label, kind, a, b in COMPARISONS:
                if a.startswith("peft") and targets not in args.peft_targets:
                    continue
                result = paired_ratio(
                    lambda: step[kind](variants[a], inputs), lambda: step[kind](variants[b], inputs), args.pairs
                )
                print(f"transformer {targets} rank {rank}  {label:22s} {result}", flush=True)
    for latent in args.unet:
        for targets in args.targets:
            print(f"unet {latent}x{latent} {targets} rank 16  train dora/lora     {unet_ratio(latent, targets, args.unet_pairs)}", flush=True)
    return 0


def unet_ratio(latent: int, targets: str, pairs: int):
    """Training step of the full SDXL UNet, ours DoRA / ours LoRA: two adapters on one UNet, switched per call."""
    unet = build_unet("cpu", torch.float32)
    inputs = unet_inputs(latent, "cpu", torch.float32)
    for name, use_dora in (("dora", True), ("lora", False)):
        add_adapter(unet, AdapterConfig(rank=16, use_dora=use_dora, targets=targets), name)
        perturb_b(trainable_parameters(unet, name))
    set_recompute(unet, "none")  # as train_dreambooth_dora.py does under gradient checkpointing
    layers = list(adapted_layers(unet).values())

    def run(name: str) -> None:
        for layer in layers:
            layer.set_active({name: 1.0})
        step(unet, inputs, trainable_parameters(unet, name), None)

    return paired_ratio(lambda: run("dora"), lambda: run("lora"), pairs)


if __name__ == "__main__":
    raise SystemExit(main())
