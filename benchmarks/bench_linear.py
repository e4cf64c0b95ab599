"""One adapted Linear at a time (the training step of ``bench_layers.py``), at the SDXL shapes of a 1280-channel transformer block: the training
step of ours DoRA (keeping its output, mode ``none``; and recomputing ``W0 x``, mode ``cheap``/``all``)
against ours LoRA, CPU fp32, interleaved in one process. Shows where the DoRA overhead of
``bench_layers.py`` comes from, layer by layer.

    python benchmarks/bench_linear.py --repeats 15
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

from bench_layers import train_step  # noqa: E402
from common import interleaved_times, machine_line  # noqa: E402

from dora_diffusion.core.layers import AdapterSpec, wrap  # noqa: E402

# name, d_in, d_out, bias, tokens
SHAPES = [
    ("to_q / attn1 k, v", 1280, 1280, False, 1024),
    ("to_out.0", 1280, 1280, True, 1024),
    ("attn2 to_k / to_v", 2048, 1280, False, 77),
    ("ff.net.0.proj", 1280, 10240, True, 1024),
    ("ff.net.2", 5120, 1280, True, 1024),
]


def variants(base: nn.Linear, rank: int) -> dict[str, nn.Module]:
    out = {}
    for label, use_dora, recompute in (("lora", False, False), ("dora_keep_y", True, False), ("dora_recompute", True, True)):
        layer = wrap(copy.deepcopy(base))
        layer.new_adapter("a", AdapterSpec(rank, rank, use_dora))
        with torch.no_grad():
            layer.adapters["a"].B.normal_(std=0.01)
        layer.recompute_output = recompute
        out[label] = layer
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args(argv)
    print(machine_line())
    print(f"rank {args.rank}, median of {args.repeats} interleaved repeats, fp32 CPU\n")
    print("layer | d_in | d_out | tokens | lora train ms | dora keep y / lora | dora recompute / lora")
    print("--- | --- | --- | --- | --- | --- | ---")
    for name, d_in, d_out, bias, tokens in SHAPES:
        torch.manual_seed(0)
        base = nn.Linear(d_in, d_out, bias=bias).requires_grad_(False)
        x = torch.randn(1, tokens, d_in)
        fns = {k: (lambda m=m: train_step(m, (x,))) for k, m in variants(base, args.rank).items()}
        t = interleaved_times(fns, args.repeats, warmup=2)
        print(f"{name} | {d_in} | {d_out} | {tokens} | {t['lora'] * 1e3:.1f} | "
              f"{t['dora_keep_y'] / t['lora']:.3f} | {t['dora_recompute'] / t['lora']:.3f}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
