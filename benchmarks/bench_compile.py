"""DoRA / LoRA training-step ratio under ``torch.compile`` (inductor, CPU), beside the eager ratio, with
``bench_paired.py``'s method (interleaved pairs, the median of per-pair ratios, a 95% interval); compile time apart.

    python benchmarks/bench_compile.py --pairs 21                     # transformer stack (bench_paired's case)
    python benchmarks/bench_compile.py --pairs 0 --unet 32 --unet_pairs 7   # full SDXL UNet, checkpointing, 32x32

Variants of one case (the same base weights, B non-zero, rank 16): ours DoRA and LoRA, eager and compiled; and
DoRA compiled with ``AdaptedLayer.compile_lean`` (the lean autograd functions inside the graph instead of the
``reference`` path inductor fuses). Printed:

- compile time: the first training step of each compiled variant (dynamo + inductor + that step), each in a fresh
  process with inductor's on-disk caches turned off (nothing compiled before is reused), with the median eager
  step beside it;
- paired ratios of the training step: compiled DoRA / compiled LoRA (does inductor's fusion of DoRA's elementwise
  passes close the gap to 1.0?), eager DoRA / eager LoRA (the same pairs in the same process, for comparison),
  compiled lean DoRA / compiled LoRA, and compiled / eager for DoRA and for LoRA (what compiling buys).

A training step is forward + backward + an in-place update of the adapter tensors (``bench_layers.train_step``),
so cached norms are invalidated as in real training. The full-UNet case runs as ``train_dreambooth_dora.py``
does: gradient checkpointing, recompute mode ``none``, DoRA and LoRA as two adapters on one UNet switched per
call (each state gets its own compiled graph after its first call).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch._functorch.config
import torch._inductor.config

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_layers import make_variants, train_step, workload  # noqa: E402
from bench_unet import build_unet, perturb_b, step, unet_inputs  # noqa: E402
from common import machine_line, paired_ratio  # noqa: E402

from dora_diffusion import AdapterConfig, add_adapter, set_recompute, trainable_parameters  # noqa: E402
from dora_diffusion.core.inject import adapted_layers  # noqa: E402


def first_step(fn: Callable[[], object]) -> float:
    """Seconds of the first call of ``fn`` (for a compiled step: the compilation and one step)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_step(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def set_compile_lean(model: torch.nn.Module, on: bool) -> None:
    for layer in adapted_layers(model).values():
        layer.compile_lean = on


def transformer_variants(args) -> tuple[dict[str, Callable[[], None]], dict[str, Callable[[], None]]]:
    """Eager and compiled training steps of two SDXL transformer blocks (1280 channels, ``--tokens`` tokens),
    ``--targets``, rank ``--rank``: ``({dora, lora}, {dora, lora, lean})``."""
    base, inputs = workload("transformer", args.blocks, args.tokens)
    variants = make_variants(base, args.targets, args.rank)
    dora, lora = variants["dora"], variants["lora"]
    lean = make_variants(base, args.targets, args.rank)["dora"]  # its own copy: compile_lean is read at trace time
    set_compile_lean(lean, True)
    eager = {"dora": lambda: train_step(dora, inputs), "lora": lambda: train_step(lora, inputs)}
    models = {"dora": dora, "lora": lora, "lean": lean}
    compiled = {k: (lambda m=m, c=torch.compile(m): compiled_step(c, m, inputs)) for k, m in models.items()}
    return eager, compiled


def transformer_case(args) -> None:
    eager, compiled = transformer_variants(args)
    label = f"transformer {args.targets} rank {args.rank}"
    eager_step = median_step(eager["dora"], 3)
    for name in compiled:
        print(f"{label}  compile time {name:4s}: first step {first_step_in_child(name, None):.1f} s "
              f"(eager DoRA step {eager_step:.2f} s)", flush=True)  # fmt: skip
    pairs = {
        "compiled dora/lora": (compiled["dora"], compiled["lora"]),
        "eager dora/lora": (eager["dora"], eager["lora"]),
        "compiled lean/lora": (compiled["lean"], compiled["lora"]),
        "dora compiled/eager": (compiled["dora"], eager["dora"]),
        "lora compiled/eager": (compiled["lora"], eager["lora"]),
    }
    for name, (fa, fb) in pairs.items():  # paired_ratio's warm-up call compiles a variant the first time
        print(f"{label}  train {name:20s} {paired_ratio(fa, fb, args.pairs)}", flush=True)


def first_step_in_child(variant: str, latent: int | None) -> float:
    """The first compiled step of ``variant`` in a fresh process (nothing compiled or cached before it)."""
    child = [sys.executable, sys.argv[0], "--first_step", variant, *sys.argv[1:]]
    if latent is not None:
        child += ["--first_step_latent", str(latent)]
    done = subprocess.run(child, check=True, capture_output=True, text=True)
    return float(done.stdout.strip().splitlines()[-1])


def compiled_step(compiled: Callable, model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    """``bench_layers.train_step`` through a compiled model (its parameters are ``model``'s)."""
    x = inputs[0].detach().requires_grad_(True)
    compiled(x, *inputs[1:]).float().square().mean().backward()
    with torch.no_grad():
        for p in [p for p in model.parameters() if p.requires_grad]:
            p.add_(p.grad, alpha=-1e-6)
            p.grad = None


def unet_case(latent: int, args) -> None:
    """The full SDXL UNet (random weights, fp32), gradient checkpointing, DoRA and LoRA switched per call."""
    unet = build_unet("cpu", torch.float32)
    inputs = unet_inputs(latent, "cpu", torch.float32)
    for name, use_dora in (("dora", True), ("lora", False)):
        add_adapter(unet, AdapterConfig(rank=args.rank, use_dora=use_dora, targets=args.targets), name)
        perturb_b(trainable_parameters(unet, name))
    set_recompute(unet, "none")  # as train_dreambooth_dora.py does under gradient checkpointing
    layers = list(adapted_layers(unet).values())
    compiled = torch.compile(unet)

    def run(name: str, model) -> Callable[[], None]:
        def go() -> None:
            for layer in layers:
                layer.set_active({name: 1.0})
            step(model, inputs, trainable_parameters(unet, name), None)

        return go

    label = f"unet {latent}x{latent} {args.targets} rank {args.rank}"
    if args.first_step:
        print(first_step(run(args.first_step, compiled)))
        return
    eager_step = median_step(run("dora", unet), 1)
    for name in ("dora", "lora"):
        print(f"{label}  compile time {name}: first step {first_step_in_child(name, latent):.1f} s "
              f"(eager DoRA step {eager_step:.1f} s)", flush=True)  # fmt: skip
    for name, fa, fb in (
        ("compiled dora/lora", run("dora", compiled), run("lora", compiled)),
        ("eager dora/lora", run("dora", unet), run("lora", unet)),
        ("dora compiled/eager", run("dora", compiled), run("dora", unet)),
    ):
        print(f"{label}  train {name:20s} {paired_ratio(fa, fb, args.unet_pairs)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=21, help="pairs per ratio of the transformer stack (0: skip it)")
    ap.add_argument("--targets", default="attn_ff")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--unet", type=int, nargs="*", default=[], help="latent sides for the full-UNet case")
    ap.add_argument("--unet_pairs", type=int, default=7)
    ap.add_argument("--first_step", help=argparse.SUPPRESS)  # a variant: the child process that times its compilation
    ap.add_argument("--first_step_latent", type=int, help=argparse.SUPPRESS)  # ... in the full-UNet case
    args = ap.parse_args(argv)
    torch.set_grad_enabled(True)
    torch._inductor.config.fx_graph_cache = False  # compile times from nothing, also on a second run of the script
    torch._functorch.config.enable_autograd_cache = False
    if args.first_step and args.first_step_latent is None:
        print(first_step(transformer_variants(args)[1][args.first_step]))
        return 0
    if args.first_step:
        unet_case(args.first_step_latent, args)
        return 0
    print(machine_line(), flush=True)
    if args.pairs:
        transformer_case(args)
    for latent in args.unet:
        unet_case(latent, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
