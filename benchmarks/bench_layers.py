"""DoRA vs LoRA vs PEFT on SDXL-shaped layers, CPU fp32, measured side by side in one process.

Workloads: a stack of diffusers ``BasicTransformerBlock`` at SDXL dims (1280 channels, 20 heads,
cross-attention dim 2048, 1024 tokens) and a ``ResnetBlock2D`` with 1280-channel 3x3 convs at 32x32.
Variants: base, ours LoRA, ours DoRA (unfused / fused), PEFT LoRA, PEFT DoRA, and for the transformer
stack ours DoRA under the other two ``set_recompute`` modes (``none``: keep every output for dL/dm;
``all``: recompute W0 x on every layer whose output nothing else keeps). Each training step is
forward + backward + an in-place update of the adapter weights (so cached norms are invalidated as in
real training). Timings are medians of interleaved repeats with the allocator's defaults; memory is the
peak resident memory of one training step above what was resident before it, measured first, in a fresh
child process whose allocator returns freed blocks at once.

    python benchmarks/bench_layers.py                       # the full table (ranks 4/16/64, attn/attn_ff/all)
    python benchmarks/bench_layers.py --quick               # rank 16, attn_ff only (the issue's headline case)
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import interleaved_times, machine_line, peak_bytes, pin_malloc  # noqa: E402

from dora_diffusion import AdapterConfig, add_adapter  # noqa: E402
from dora_diffusion.core.inject import adapted_layers, set_recompute  # noqa: E402

PEFT_TARGETS = {
    "attn": ["to_q", "to_k", "to_v", "to_out.0"],
    "attn_ff": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"],
    "all": ["conv1", "conv2", "conv_shortcut", "time_emb_proj"],
}


class TransformerStack(nn.Module):
    """``n`` SDXL transformer blocks in a row."""

    def __init__(self, n: int) -> None:
        super().__init__()
        from diffusers.models.attention import BasicTransformerBlock

        self.blocks = nn.ModuleList(
            BasicTransformerBlock(1280, 20, 64, cross_attention_dim=2048, activation_fn="geglu") for _ in range(n)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, encoder_hidden_states=context)
        return x


class Resnet(nn.Module):
    """One SDXL resnet block at 1280 channels."""

    def __init__(self) -> None:
        super().__init__()
        from diffusers.models.resnet import ResnetBlock2D

        self.block = ResnetBlock2D(in_channels=1280, out_channels=1280, temb_channels=1280)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.block(x, temb)


def workload(name: str, blocks: int, tokens: int) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    if name == "transformer":
        return TransformerStack(blocks), (torch.randn(1, tokens, 1280), torch.randn(1, 77, 2048))
    return Resnet(), (torch.randn(1, 1280, 32, 32), torch.randn(1, 1280))


def make_variants(base: nn.Module, targets: str, rank: int) -> dict[str, nn.Module]:
    """base / ours LoRA / ours DoRA / PEFT LoRA / PEFT DoRA copies of ``base``, B non-zero everywhere."""
    from peft import LoraConfig, inject_adapter_in_model

    base.requires_grad_(False)
    out = {"base": base}
    for use_dora, label in ((False, "lora"), (True, "dora")):
        m = copy.deepcopy(base)
        add_adapter(m, AdapterConfig(rank=rank, alpha=rank, use_dora=use_dora, targets=targets), "a")
        out[label] = m
        p = copy.deepcopy(base)
        cfg = LoraConfig(r=rank, lora_alpha=rank, use_dora=use_dora, target_modules=PEFT_TARGETS[targets])
        out[f"peft_{label}"] = inject_adapter_in_model(cfg, p)
    g = torch.Generator().manual_seed(1)
    for name, m in out.items():
        for pname, p in m.named_parameters():
            is_adapter = ".adapters." in pname or "lora_" in pname  # ours, PEFT's
            p.requires_grad_(is_adapter)
            if pname.endswith(".B") or "lora_B" in pname:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return out


def trainable(m: nn.Module) -> list[nn.Parameter]:
    return [p for p in m.parameters() if p.requires_grad]


def train_step(m: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    x = inputs[0].detach().requires_grad_(True)
    m(x, *inputs[1:]).float().square().mean().backward()
    with torch.no_grad():
        for p in trainable(m):
            p.add_(p.grad, alpha=-1e-6)  # an optimizer step: A, B, m change in place
            p.grad = None


def infer(m: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    with torch.no_grad():
        m(*inputs)


def build_case(wl: str, targets: str, rank: int, args) -> tuple[dict[str, nn.Module], tuple[torch.Tensor, ...]]:
    """The variants of one case; for the transformer stack also ours DoRA under the other recompute modes."""
    base, inputs = workload(wl, args.blocks, args.tokens)
    variants = make_variants(base, targets, rank)
    if wl == "transformer":
        for mode in ("none", "all"):
            variants[f"dora_{mode}"] = copy.deepcopy(variants["dora"])
            set_recompute(variants[f"dora_{mode}"], mode)
    return variants, inputs


def measure_memory(wl: str, targets: str, rank: int, args) -> dict[str, int]:
    """Peak resident bytes of one training step per variant (call in a process after ``pin_malloc``)."""
    variants, inputs = build_case(wl, targets, rank, args)
    return {k: peak_bytes(lambda m=m: train_step(m, inputs)) for k, m in variants.items()}


def measure_times(wl: str, targets: str, rank: int, args) -> dict:
    variants, inputs = build_case(wl, targets, rank, args)
    fused = copy.deepcopy(variants["dora"])
    for layer in adapted_layers(fused).values():
        layer.fuse()
    raw_train: dict[str, list[float]] = {}
    raw_infer: dict[str, list[float]] = {}
    train = interleaved_times({k: (lambda m=m: train_step(m, inputs)) for k, m in variants.items()}, args.repeats, raw=raw_train)
    inf_models = dict(variants, dora_fused=fused)
    inference = interleaved_times({k: (lambda m=m: infer(m, inputs)) for k, m in inf_models.items()}, args.repeats, raw=raw_infer)
    return {"workload": wl, "targets": targets, "rank": rank, "train_s": train, "infer_s": inference,
            "raw_train_s": raw_train, "raw_infer_s": raw_infer}  # fmt: skip


def memory_in_subprocess(argv: list[str]) -> list[dict[str, int]]:
    """Run the memory phase in a fresh process, so the timing phase keeps the allocator's defaults."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "memory.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--memory_only", "--json", str(out)]
        subprocess.run(cmd, check=True)
        return json.loads(out.read_text())


def ratios(r: dict) -> dict[str, float]:
    t, i, mem = r["train_s"], r["infer_s"], r["peak_bytes"]
    return {
        "train dora/lora": t["dora"] / t["lora"],
        "train peft_dora/dora": t["peft_dora"] / t["dora"],
        "train dora/base": t["dora"] / t["base"],
        "infer dora/lora": i["dora"] / i["lora"],
        "infer peft_dora/dora": i["peft_dora"] / i["dora"],
        "infer dora/base": i["dora"] / i["base"],
        "infer fused/base": i["dora_fused"] / i["base"],
        "peak dora/lora": mem["dora"] / mem["lora"],
        "peak peft_dora/dora": mem["peft_dora"] / mem["dora"],
        **{
            f"{what} {mode}/lora": d[f"dora_{mode}"] / d["lora"]
            for mode in ("none", "all")
            if f"dora_{mode}" in t  # transformer cases only
            for what, d in (("train", t), ("peak", mem))
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="only the transformer stack, rank 16, attn_ff")
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--blocks", type=int, default=2, help="transformer blocks in the stack")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, help="also write the raw numbers here")
    ap.add_argument("--memory_only", action="store_true", help=argparse.SUPPRESS)  # the child process
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    torch.set_grad_enabled(True)
    if args.quick:
        cases = [("transformer", "attn_ff", 16)]
    else:
        cases = [("transformer", t, r) for t in ("attn", "attn_ff") for r in args.ranks]
        cases += [("resnet", "all", r) for r in args.ranks]
    if args.memory_only:
        pin_malloc()
        memory = [measure_memory(*case, args) for case in cases]
        args.json.write_text(json.dumps(memory))
        return 0
    memories = memory_in_subprocess(argv)  # the child's own --json comes last, so argparse uses it
    print(machine_line())
    print(f"transformer stack: {args.blocks} blocks x {args.tokens} tokens; resnet: 1280 ch at 32x32; "
          f"median of {args.repeats} interleaved repeats; fp32 CPU\n")  # fmt: skip
    results = []
    header = None
    for (wl, targets, rank), memory in zip(cases, memories):
        r = {**measure_times(wl, targets, rank, args), "peak_bytes": memory}
        results.append(r)
        rat = ratios(r)
        if header is None:
            header = ["workload", "targets", "rank", "lora train s", "dora train s", *rat]
            print(" | ".join(header))
            print(" | ".join("---" for _ in header))
        row = [wl, targets, str(rank), f"{r['train_s']['lora']:.3f}", f"{r['train_s']['dora']:.3f}"]
        print(" | ".join(row + [f"{v:.3f}" for v in rat.values()]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
