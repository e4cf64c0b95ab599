"""The full SDXL UNet architecture (config in code, random weights, no download): DoRA vs LoRA vs PEFT.

1. Training step (forward + backward with gradient checkpointing + in-place adapter update) at a small
   latent size. Ours: DoRA and LoRA are two adapters on one UNet, switched per step, interleaved. PEFT:
   its DoRA and LoRA likewise, in a second phase (two fp32 copies of the 2.6 B-parameter UNet do not fit
   in 24 GB); "peft_lora / lora" calibrates the phases against each other.
2. Time to load a rank-8 DoRA adapter on the ``attn`` targets (560 modules, diffusers layout) into the
   UNet: ``load_dora_weights`` vs diffusers' ``load_lora_weights``, alternated.

    python benchmarks/bench_unet.py                        # CPU fp32, 32x32 latents
    python benchmarks/bench_unet.py --device cuda --dtype bf16 --latent 128
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import interleaved_times, machine_line  # noqa: E402

import dora_diffusion  # noqa: E402
from dora_diffusion import AdapterConfig, add_adapter, trainable_parameters  # noqa: E402
from dora_diffusion.core.inject import adapted_layers, remove_all, set_recompute  # noqa: E402

SDXL_UNET = dict(
    sample_size=128,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_unet(device: str, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SDXL_UNET).to(device=device, dtype=dtype)
    unet.requires_grad_(False)
    unet.enable_gradient_checkpointing()
    unet.train()
    return unet


def unet_inputs(latent: int, device: str, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "sample": torch.randn(1, 4, latent, latent, generator=g).to(device, dtype),
        "timestep": torch.tensor([500], device=device),
        "encoder_hidden_states": torch.randn(1, 77, 2048, generator=g).to(device, dtype),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(1, 1280, generator=g).to(device, dtype),
            "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]], device=device, dtype=dtype),
        },
    }


def step(unet, inputs: dict, params: list[torch.nn.Parameter], autocast_dtype) -> None:
    device = inputs["sample"].device.type
    with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = unet(**inputs).sample
    out.float().square().mean().backward()
    with torch.no_grad():
        for p in params:
            p.add_(p.grad, alpha=-1e-6)
            p.grad = None


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def perturb_b(params) -> None:
    with torch.no_grad():
        for p in params:
            if p.dim() >= 2 and not p.abs().sum():
                p.normal_(std=0.01)


def bench_training(unet, args, dtype) -> dict[str, float]:
    inputs = unet_inputs(args.latent, args.device, dtype)
    autocast = None if dtype == torch.float32 else dtype
    for name, use_dora in (("dora", True), ("lora", False)):
        add_adapter(unet, AdapterConfig(rank=args.rank, use_dora=use_dora, targets=args.targets), name)
        perturb_b(trainable_parameters(unet, name))
    set_recompute(unet, "none")  # as train_dreambooth_dora.py does under gradient checkpointing
    layers = list(adapted_layers(unet).values())

    def run(name: str):
        for layer in layers:
            layer.set_active({name: 1.0})
        step(unet, inputs, trainable_parameters(unet, name), autocast)
        sync(args.device)

    ours = interleaved_times({"dora": lambda: run("dora"), "lora": lambda: run("lora")}, args.repeats)
    print(f"training step s: dora {ours['dora']:.3f}  lora {ours['lora']:.3f}  dora/lora {ours['dora'] / ours['lora']:.3f}", flush=True)
    remove_all(unet)
    if args.skip_peft:
        return ours

    from peft import LoraConfig, inject_adapter_in_model

    targets = {"attn": ["to_q", "to_k", "to_v", "to_out.0"],
               "attn_ff": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]}[args.targets]  # fmt: skip
    inject_adapter_in_model(LoraConfig(r=args.rank, lora_alpha=args.rank, use_dora=True, target_modules=targets), unet, "pdora")
    inject_adapter_in_model(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=targets), unet, "plora")
    from peft.tuners.lora import LoraLayer

    peft_layers = [m for m in unet.modules() if isinstance(m, LoraLayer)]

    def run_peft(name: str):
        for m in peft_layers:
            m.set_adapter(name)
        params = [p for n, p in unet.named_parameters() if f".{name}." in n or n.endswith(f".{name}")]
        for p in params:
            p.requires_grad_(True)
        step(unet, inputs, params, autocast)
        for p in params:
            p.requires_grad_(False)
        sync(args.device)

    for name in ("pdora", "plora"):
        perturb_b([p for n, p in unet.named_parameters() if "lora_B" in n and name in n])
    peft = interleaved_times({"peft_dora": lambda: run_peft("pdora"), "peft_lora": lambda: run_peft("plora")}, args.repeats)
    return {**ours, **peft}


def bench_loading(args) -> dict[str, float]:
    from diffusers import StableDiffusionXLPipeline

    from dora_diffusion.testing import build_tiny_sdxl_pipeline

    tiny = build_tiny_sdxl_pipeline()
    unet = build_unet(args.device, DTYPES[args.dtype]).eval()
    pipe = StableDiffusionXLPipeline(**{**tiny.components, "unet": unet})
    with tempfile.TemporaryDirectory() as tmp:
        add_adapter(pipe.unet, AdapterConfig(rank=8, targets="attn"), "file")
        perturb_b(trainable_parameters(pipe.unet, "file"))
        pipe.save_dora_weights(tmp)
        pipe.unload_dora_weights()
        times: dict[str, list[float]] = {"load_dora_weights": [], "diffusers load_lora_weights": []}
        for _ in range(args.load_repeats):
            t0 = time.perf_counter()
            pipe.load_dora_weights(tmp)
            times["load_dora_weights"].append(time.perf_counter() - t0)
            pipe.unload_dora_weights()
            t0 = time.perf_counter()
            pipe.load_lora_weights(tmp)
            times["diffusers load_lora_weights"].append(time.perf_counter() - t0)
            pipe.unload_lora_weights()
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights; bf16/fp16 also autocast")
    ap.add_argument("--latent", type=int, default=32, help="latent side (pixels / 8)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", choices=["attn", "attn_ff", "all"], default="attn_ff",
                    help="all (every convolution too) times ours only: use it with --skip_peft")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--load_repeats", type=int, default=3)
    ap.add_argument("--skip_training", action="store_true")
    ap.add_argument("--skip_loading", action="store_true", help="skip the adapter-loading comparison")
    ap.add_argument("--skip_peft", action="store_true", help="time only ours (PEFT's fp32 phase needs ~20 GB on CPU)")
    args = ap.parse_args(argv)
    if args.targets == "all" and not (args.skip_peft or args.skip_training):
        ap.error("--targets all is timed for ours only (PEFT's target list here is attention and feed-forward): add --skip_peft")
    assert dora_diffusion  # the pipeline methods are installed on import
    print(machine_line())
    print(f"SDXL UNet (2.6 B params, random), {args.dtype} on {args.device}, latent {args.latent}x{args.latent}, "
          f"rank {args.rank} on {args.targets}, gradient checkpointing, median of {args.repeats}\n")  # fmt: skip
    if not args.skip_training:
        unet = build_unet(args.device, DTYPES[args.dtype])
        t = bench_training(unet, args, DTYPES[args.dtype])
        del unet
        if "peft_dora" in t:
            print("training step s:", {k: round(v, 3) for k, v in t.items()})
            print(f"  dora/lora {t['dora'] / t['lora']:.3f}   peft_dora/dora {t['peft_dora'] / t['dora']:.3f}   "
                  f"peft_dora/peft_lora {t['peft_dora'] / t['peft_lora']:.3f}   peft_lora/lora {t['peft_lora'] / t['lora']:.3f}")  # fmt: skip
    if args.skip_loading:
        return 0
    load = bench_loading(args)
    print("adapter load s:", {k: round(v, 3) for k, v in load.items()})
    print(f"  load_dora_weights / load_lora_weights {load['load_dora_weights'] / load['diffusers load_lora_weights']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
