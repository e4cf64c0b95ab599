"""The GPU check: one command for the day a GPU is at hand, no downloads, one table.

    python benchmarks/gpu_check.py            # CUDA: full-size SDXL (random weights), 1024 px, bf16; ~5 min on an H100
    python benchmarks/gpu_check.py --tiny     # the same code on the CPU with the tiny pipeline (a test runs it)

1. Training step at 1024 px (128x128 latents), full SDXL UNet built from its config, bf16 autocast, gradient
   checkpointing, rank 16 on ``attn`` and on ``attn_ff``: seconds per step and peak GPU memory for our DoRA, our
   LoRA, PEFT's DoRA and PEFT's LoRA (ours: both adapters on one UNet, switched per step, interleaved; then
   PEFT's two the same way on the same UNet).
2. ``train_dreambooth_dora.py`` end to end for a few steps on a full-size random SDXL pipeline saved to a
   temporary folder: fp16 (GradScaler; SDXL's VAE kept in fp32) and bf16, with gradient checkpointing and
   latent caching, one validation image. Reported: seconds per step, peak memory, whether the losses and the
   validation image are finite.

Peak memory is ``torch.cuda.max_memory_allocated`` (on the CPU: not measured).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_unet import SDXL_UNET, perturb_b, step, unet_inputs  # noqa: E402
from common import interleaved_times, machine_line  # noqa: E402

from dora_diffusion import AdapterConfig, add_adapter, trainable_parameters  # noqa: E402
from dora_diffusion.core.inject import UNET_PRESETS, adapted_layers, remove_all, set_recompute  # noqa: E402
TEXT_ENCODER = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    hidden_act="quick_gelu", projection_dim=768)  # fmt: skip
TEXT_ENCODER_2 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                      hidden_act="gelu", projection_dim=1280)  # fmt: skip
VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=1024,
           scaling_factor=0.13025, force_upcast=True,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)  # fmt: skip


class Setup:
    """Sizes and devices of one check: full size on CUDA, tiny on the CPU."""

    def __init__(self, tiny: bool, rank: int, repeats: int) -> None:
        self.tiny, self.rank, self.repeats = tiny, rank, repeats
        self.device = "cpu" if tiny else "cuda"
        self.latent = 8 if tiny else 128
        self.resolution = self.latent * 8
        self.precisions = ("bf16",) if tiny else ("fp16", "bf16")  # fp16 autocast needs a GPU

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_gb(self) -> float:
        return torch.cuda.max_memory_allocated() / 2**30 if self.device == "cuda" else math.nan


def build_pipeline(setup: Setup, dtype: torch.dtype):
    """A ``StableDiffusionXLPipeline``: the tiny one, or SDXL's full sizes with random weights (built on the device)."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dora_diffusion.testing import build_tiny_sdxl_pipeline

    tiny = build_tiny_sdxl_pipeline(seed=0)
    if setup.tiny:
        return tiny
    tok = tiny.tokenizer  # byte-level, 514 tokens: every id is valid for CLIP's 49408-token embedding

    def text_config(sizes: dict) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **sizes)  # fmt: skip

    torch.manual_seed(0)
    with torch.device(setup.device):
        unet = UNet2DConditionModel(**SDXL_UNET)
        vae = AutoencoderKL(**VAE)
        text_encoder = CLIPTextModel(text_config(TEXT_ENCODER))
        text_encoder_2 = CLIPTextModelWithProjection(text_config(TEXT_ENCODER_2))
    for model in (unet, text_encoder, text_encoder_2, vae):
        torch.nn.Module.to(model, dtype=dtype)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tok,
                                     tokenizer_2=tiny.tokenizer_2, unet=unet, scheduler=tiny.scheduler)  # fmt: skip


def training_steps(setup: Setup, unet, targets: str) -> list[dict]:
    """Part 1: seconds per step and peak memory of ours and PEFT's DoRA and LoRA on ``targets``."""
    dtype = next(unet.parameters()).dtype
    inputs = unet_inputs(setup.latent, setup.device, dtype)
    if setup.tiny:  # the tiny UNet's text and time embedding sizes
        g = torch.Generator().manual_seed(0)
        inputs["encoder_hidden_states"] = torch.randn(1, 77, 80, generator=g).to(dtype)
        inputs["added_cond_kwargs"]["text_embeds"] = torch.randn(1, 32, generator=g).to(dtype)
    unet.requires_grad_(False)
    unet.enable_gradient_checkpointing()
    unet.train()
    rows = []

    def measure(runs: dict) -> None:
        times = interleaved_times(runs, setup.repeats)
        for name, run in runs.items():
            setup.reset_peak()
            run()
            rows.append({"check": f"train step {name}", "targets": targets, "s": times[name], "peak_gb": setup.peak_gb()})

    for name, use_dora in (("dora", True), ("lora", False)):
        add_adapter(unet, AdapterConfig(rank=setup.rank, use_dora=use_dora, targets=targets), name)
        perturb_b(trainable_parameters(unet, name))
    set_recompute(unet, "none")  # as train_dreambooth_dora.py does under gradient checkpointing
    layers = list(adapted_layers(unet).values())

    def ours(name: str):
        def run():
            for layer in layers:
                layer.set_active({name: 1.0})
            step(unet, inputs, trainable_parameters(unet, name), torch.bfloat16)
            setup.sync()

        return run

    measure({"ours DoRA": ours("dora"), "ours LoRA": ours("lora")})
    remove_all(unet)

    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    for name, use_dora in (("pdora", True), ("plora", False)):
        config = LoraConfig(r=setup.rank, lora_alpha=setup.rank, use_dora=use_dora, target_modules=UNET_PRESETS[targets])
        inject_adapter_in_model(config, unet, name)
        perturb_b([p for n, p in unet.named_parameters() if "lora_B" in n and name in n])
    peft_layers = [m for m in unet.modules() if isinstance(m, LoraLayer)]

    def peft(name: str):
        params = [p for n, p in unet.named_parameters() if f".{name}." in n or n.endswith(f".{name}")]

        def run():
            for m in peft_layers:
                m.set_adapter(name)
            for p in params:
                p.requires_grad_(True)
            step(unet, inputs, params, torch.bfloat16)
            for p in params:
                p.requires_grad_(False)
            setup.sync()

        return run

    measure({"PEFT DoRA": peft("pdora"), "PEFT LoRA": peft("plora")})
    return rows


def end_to_end(setup: Setup, model_dir: Path, data_dir: Path, work: Path, precision: str) -> dict:
    """Part 2: ``train_dreambooth_dora.py`` for a few steps in ``precision``; its step time, memory and finiteness."""
    from PIL import Image

    from dora_diffusion.training import main
    from dora_diffusion.training.output.steplog import read_step_log

    out = work / f"run-{precision}"
    steps = 4
    argv = [
        "--pretrained_model_name_or_path", str(model_dir), "--dataset", str(data_dir), "--output_dir", str(out),
        "--resolution", str(setup.resolution), "--max_train_steps", str(steps), "--gradient_accumulation_steps", "1",
        "--mixed_precision", precision, "--gradient_checkpointing", "--cache_latents", "--checkpointing_steps", "0",
        "--num_validation_images", "1", "--validation_inference_steps", "4", "--report_to", "none",
    ]  # fmt: skip
    setup.reset_peak()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        main(argv)
    total = time.perf_counter() - t0
    log = read_step_log(out)
    stamps = [r["time"] for r in log if "time" in r]
    per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else total / steps
    image = np.asarray(Image.open(next((out / "validation").rglob("*.png"))), dtype=np.float32)
    return {
        "check": f"script {precision}", "targets": "attn", "s": per_step, "peak_gb": setup.peak_gb(),
        "note": f"{steps} steps in {total:.0f} s incl. loading; losses finite {all(math.isfinite(r['loss']) for r in log)}; "
        f"validation image {'rendered' if image.std() > 1.0 else 'BLANK (NaN?)'}",
    }  # fmt: skip


def table(rows: list[dict]) -> str:
    """A markdown table; ratios against our LoRA of the same targets."""
    lines = ["| check | targets | s/step | peak GB | vs ours LoRA | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        base = next((b for b in rows if b["check"] == "train step ours LoRA" and b["targets"] == r["targets"]), None)
        ratio = f"{r['s'] / base['s']:.2f}x" if base and r["check"].startswith("train step") else ""
        peak = "-" if math.isnan(r["peak_gb"]) else f"{r['peak_gb']:.1f}"
        lines.append(f"| {r['check']} | {r['targets']} | {r['s']:.3f} | {peak} | {ratio} | {r.get('note', '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the tiny pipeline on the CPU (what the test runs)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per method (after one warm-up)")
    ap.add_argument("--skip_script", action="store_true", help="part 1 only")
    args = ap.parse_args(argv)
    setup = Setup(args.tiny, args.rank, args.repeats)
    if not setup.tiny and not torch.cuda.is_available():
        ap.error("no CUDA device: run with --tiny for the CPU version")
    device = torch.cuda.get_device_name() if setup.device == "cuda" else "CPU"
    print(machine_line(), "|", device, flush=True)
    t0 = time.perf_counter()
    rows = []
    pipe = build_pipeline(setup, torch.bfloat16)
    for targets in ("attn", "attn_ff"):
        rows += training_steps(setup, pipe.unet, targets)
        print(table(rows), flush=True)
    del pipe
    if setup.device == "cuda":
        torch.cuda.empty_cache()
    if not args.skip_script:
        from dora_diffusion.testing import make_toy_imagefolder

        with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
            work = Path(tmp)
            build_pipeline(setup, torch.float16 if not setup.tiny else torch.float32).save_pretrained(work / "model")
            make_toy_imagefolder(work / "data", n=4, size=setup.resolution)
            for precision in setup.precisions:
                rows.append(end_to_end(setup, work / "model", work / "data", work, precision))
                if setup.device == "cuda":
                    torch.cuda.empty_cache()
    text = table(rows)
    print(f"\nSDXL {'tiny (CPU)' if setup.tiny else 'full size, random weights'}, {setup.resolution} px, rank {args.rank}, "
          f"median of {args.repeats} steps, {time.perf_counter() - t0:.0f} s in all\n")  # fmt: skip
    print(text, flush=True)
    return text


if __name__ == "__main__":
    main()
