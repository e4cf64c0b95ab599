"""Pretrain the toy world's SDXL-architecture pipeline from scratch on the CPU.

    python -m dora_diffusion.toyworld.pretrain --out DIR        # about 45 minutes on 2 idle CPU cores

1. Render ``--num_images`` scenes of the ``"train"`` split (plain objects only; held-out triples never appear).
2. Train the VAE (``AutoencoderKL``) on random 32 x 32 crops of them:
   ``L = |x - D(z)|^2 + beta KL(q(z|x) || N(0, I))``, then set its ``scaling_factor`` to ``1 / std(z)`` so the UNet
   sees unit-variance latents, as in SDXL.
3. Train the UNet and both text encoders together with SDXL's epsilon objective,
   ``L = w(t) |eps - eps_theta(sqrt(a_t) z + sqrt(1 - a_t) eps, t, c)|^2`` on SDXL's noise schedule, with
   Min-SNR weighting ``w(t) = min(SNR(t), gamma) / SNR(t)``, ``SNR(t) = a_t / (1 - a_t)`` (Hang et al. 2023), and a
   per-channel noise offset (``eps += 0.1 * n``, ``n ~ N(0, 1)`` per image and channel), so the latent's mean does
   not leak the background colour at high noise and the model reads colours from the caption. Captions are dropped
   to zeros 10% of the time (the pipeline's negative conditioning is zeros: classifier-free guidance works). An
   exponential moving average of the weights is what is saved.
4. Save the pipeline (``save_pretrained``, fp16 safetensors; its scheduler samples from ``t = 999``, see
   ``model.build_scheduler``) and a loss log; every ``--eval_every`` steps print the EMA weights' prompt fidelity on
   32 held-out captions.

Everything is seeded; ``--max_steps`` (not the clock) decides what is trained, ``--max_minutes`` only guards.
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dora_diffusion.training.step.loss import min_snr_weights
from dora_diffusion.toyworld.model import build_untrained_pipeline
from dora_diffusion.toyworld.world import RESOLUTION, caption, render, scenes

TIME_IDS = (RESOLUTION, RESOLUTION, 0, 0, RESOLUTION, RESOLUTION)  # original size, crop corner, target size


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dora_diffusion.toyworld.pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="Directory for the pipeline, loss log and samples.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--init", default=None,
        help="Continue from this pretrained pipeline directory (its VAE is kept; the UNet and text encoders train on).",
    )
    p.add_argument("--num_images", type=int, default=16000, help="Scenes rendered for training.")
    p.add_argument("--vae_steps", type=int, default=1500)
    p.add_argument("--vae_batch_size", type=int, default=32)
    p.add_argument("--vae_crop", type=int, default=32, help="The VAE trains on random crops of this size.")
    p.add_argument("--vae_learning_rate", type=float, default=2e-3)
    p.add_argument(
        "--vae_from", default=None,
        help="Take the trained VAE of this pretrained pipeline directory and train fresh UNet and text encoders.",
    )
    p.add_argument("--max_steps", type=int, default=5500, help="UNet + text encoder steps.")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument(
        "--min_snr_gamma", type=float, default=5.0,
        help="Min-SNR loss weighting min(SNR, gamma) / SNR (Hang et al. 2023); 0 turns it off.",
    )
    p.add_argument(
        "--noise_offset", type=float, default=0.1,
        help="Per-channel constant added to the noise, so the latent's mean cannot leak the background colour "
        "at high noise (the model then reads the colours from the caption).",
    )
    p.add_argument("--ema_decay", type=float, default=0.998)
    p.add_argument(
        "--eval_every", type=int, default=2000,
        help="Every this many steps, sample 32 held-out captions with the EMA weights and print their prompt fidelity.",
    )
    p.add_argument("--max_minutes", type=float, default=60.0, help="Stop early (and say so) past this wall time.")
    p.add_argument(
        "--num_threads", type=int, default=None,
        help="Torch CPU threads (default: all cores while the machine is otherwise idle, 1 while it is busy: "
        "on a shared 2-core machine two threads then run several times slower than one).",
    )
    return p.parse_args(argv)


def render_dataset(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """``n`` train-split scenes as a (n, 3, 64, 64) uint8 tensor and their captions."""
    world = scenes("train", n, seed)
    images = np.stack([np.asarray(render(s)) for s in world])  # (n, 64, 64, 3)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), [caption(s) for s in world]


def to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0


def adapt_threads(fixed: int | None) -> None:
    """Use every core when this process is alone on the machine, one thread when others compete."""
    if fixed:
        return
    cores = os.cpu_count() or 1
    others = os.getloadavg()[0] - torch.get_num_threads()  # the load average counts this process's threads too
    torch.set_num_threads(cores if others < 0.6 else 1)


def _lr(step: int, total: int, base: float, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def random_crops(images: torch.Tensor, size: int, gen) -> torch.Tensor:
    """One random ``size`` x ``size`` window of each image (the VAE is convolutional: crops train it 4x cheaper)."""
    if size >= images.shape[-1]:
        return images
    top = torch.randint(images.shape[-2] - size + 1, (len(images),), generator=gen)
    left = torch.randint(images.shape[-1] - size + 1, (len(images),), generator=gen)
    return torch.stack([im[:, y : y + size, x : x + size] for im, y, x in zip(images, top.tolist(), left.tolist())])


def train_vae(
    vae, images: torch.Tensor, steps: int, batch_size: int, gen, log, deadline: float, threads=None,
    crop: int = 32, lr: float = 1e-3,
) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    from tqdm.auto import tqdm

    for step in tqdm(range(steps), desc="vae"):
        if step % 50 == 0:
            adapt_threads(threads)
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr)
        idx = torch.randint(len(images), (batch_size,), generator=gen)
        x = to_unit(random_crops(images[idx], crop, gen))
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        rec = F.mse_loss(recon, x)
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log("vae", step, rec.item(), kl.item())
        if time.monotonic() > deadline:
            print(f"vae: stopped at step {step} by --max_minutes")
            break
    vae.eval()


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([vae.encode(to_unit(images[i : i + batch])).latent_dist.mean for i in range(0, len(images), batch)])


def encode_text(pipe, text_encoder, text_encoder_2, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``StableDiffusionXLPipeline.encode_prompt`` computes: penultimate hidden states concatenated, pooled."""
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ids2 = pipe.tokenizer_2(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    h1 = text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    out2 = text_encoder_2(ids2, output_hidden_states=True)
    return torch.cat([h1, out2.hidden_states[-2]], dim=-1), out2.text_embeds


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


@torch.no_grad()
def heldout_fidelity(pipe, emas: dict[str, torch.nn.Module], n: int = 32) -> float:
    """Prompt fidelity of the EMA weights on ``n`` held-out captions (20 Euler steps, guidance 4, seeds 0..n-1)."""
    from diffusers import StableDiffusionXLPipeline

    from dora_diffusion.toyworld.score import score
    from dora_diffusion.toyworld.world import captions as world_captions

    sampler = StableDiffusionXLPipeline(**{**pipe.components, **emas})
    sampler.set_progress_bar_config(disable=True)
    prompts = world_captions("heldout", n, seed=11)
    gens = [torch.Generator().manual_seed(k) for k in range(n)]
    with torch.random.fork_rng(devices=[]):
        images = sampler(prompts, num_inference_steps=20, guidance_scale=4.0, generator=gens).images
    for m in emas.values():
        m.train()
    return score(images, prompts)["prompt_fidelity"]


def train_denoiser(pipe, latents, captions, args, gen, log, deadline) -> dict[str, torch.nn.Module]:
    from tqdm.auto import tqdm

    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    emas = {k: copy.deepcopy(m).requires_grad_(False) for k, m in models.items()}
    params = [p for m in models.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=1e-2)
    alphas = pipe.scheduler.alphas_cumprod.float()  # SDXL's scaled-linear schedule, 1000 steps
    time_ids = torch.tensor([TIME_IDS], dtype=torch.float32).repeat(args.batch_size, 1)
    for m in models.values():
        m.train()
    for step in tqdm(range(args.max_steps), desc="unet+text"):
        if step % 50 == 0:
            adapt_threads(args.num_threads)
        for g in opt.param_groups:
            g["lr"] = _lr(step, args.max_steps, args.learning_rate)
        idx = torch.randint(len(latents), (args.batch_size,), generator=gen)
        z0 = latents[idx]
        if torch.rand((), generator=gen) < 0.5:
            z0 = z0.flip(-1)  # scenes are mirror-symmetric in meaning
        t = torch.randint(0, len(alphas), (args.batch_size,), generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        if args.noise_offset:
            eps = eps + args.noise_offset * torch.randn((*z0.shape[:2], 1, 1), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        embeds, pooled = encode_text(pipe, pipe.text_encoder, pipe.text_encoder_2, [captions[i] for i in idx])
        keep = (torch.rand(args.batch_size, generator=gen) >= 0.1).float()
        embeds, pooled = embeds * keep.view(-1, 1, 1), pooled * keep.view(-1, 1)
        pred = pipe.unet(zt, t, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        loss = F.mse_loss(pred, eps, reduction="none").mean(dim=(1, 2, 3))
        if args.min_snr_gamma:
            loss = loss * min_snr_weights(pipe.scheduler, t, args.min_snr_gamma)
        loss = loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        for k in models:
            ema_update(emas[k], models[k], min(args.ema_decay, (1 + step) / (10 + step)))
        log("unet", step, loss.item(), float("nan"))
        if args.eval_every and (step + 1) % args.eval_every == 0:
            fidelity = heldout_fidelity(pipe, emas)
            log("eval", step, fidelity, float("nan"))
            print(f"step {step + 1}: held-out prompt fidelity {fidelity:.3f} (32 captions, EMA weights)", flush=True)
        if time.monotonic() > deadline:
            print(f"unet+text: stopped at step {step} by --max_minutes")
            break
    return emas


def pretrain(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    start = time.monotonic()
    deadline = start + 60 * args.max_minutes
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    if args.init and args.vae_from:
        raise SystemExit("--init already brings its VAE: give --init or --vae_from, not both")
    if args.init:
        from dora_diffusion.toyworld import load_pipeline

        pipe = load_pipeline(args.init)
    else:
        pipe = build_untrained_pipeline(args.seed)
    if args.vae_from:
        from diffusers import AutoencoderKL

        pipe.vae = AutoencoderKL.from_pretrained(Path(args.vae_from) / "vae", torch_dtype=torch.float32)
        pipe.register_modules(vae=pipe.vae)
    images, captions = render_dataset(args.num_images, args.seed + (1 if args.init else 0))
    print(f"rendered {len(images)} scenes in {time.monotonic() - start:.0f} s")
    with open(out / "loss_log.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["phase", "step", "loss", "kl", "seconds"])

        def log(phase: str, step: int, loss: float, kl: float) -> None:
            writer.writerow([phase, step, f"{loss:.5f}", f"{kl:.3f}", f"{time.monotonic() - start:.1f}"])

        if args.init or args.vae_from:
            latents = encode_latents(pipe.vae, images)
            scale = pipe.vae.config.scaling_factor
        else:
            train_vae(
                pipe.vae, images, args.vae_steps, args.vae_batch_size, gen, log, deadline, args.num_threads,
                crop=args.vae_crop, lr=args.vae_learning_rate,
            )
            latents = encode_latents(pipe.vae, images)
            scale = float(1.0 / latents.std())
            pipe.vae.register_to_config(scaling_factor=scale)
        latents = latents * scale
        print(f"vae done at {time.monotonic() - start:.0f} s; scaling_factor {scale:.4f}")
        emas = train_denoiser(pipe, latents, captions, args, gen, log, deadline)
    for name, ema in emas.items():
        getattr(pipe, name).load_state_dict(ema.state_dict())
    for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        m.eval()
        torch.nn.Module.to(m, dtype=torch.float16)
    pipe.save_pretrained(out / "pipeline", safe_serialization=True)
    minutes = (time.monotonic() - start) / 60
    (out / "pretrain_args.txt").write_text(f"{vars(args)}\nminutes: {minutes:.1f}\n")
    print(f"saved {out / 'pipeline'} after {minutes:.1f} minutes")
    return out / "pipeline"


def main(argv: list[str] | None = None) -> None:
    pretrain(parse_args(argv))


if __name__ == "__main__":
    main()
