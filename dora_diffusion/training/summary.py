"""The one-screen summary of resolved settings printed when training starts."""

from __future__ import annotations

import argparse
from pathlib import Path

from dora_diffusion.core.config import lora_scale
from dora_diffusion.training.data.records import LoadedDataset


def summary(
    args: argparse.Namespace,
    data: LoadedDataset,
    triggers: list[str],
    num_processes: int,
    resume: Path | None,
    micro_batches_per_epoch: int,
) -> str:
    """Aligned ``label  value`` lines, about 20 of them."""
    kind = "DoRA" if args.adapter == "dora" else "LoRA"
    scale = lora_scale(args.rank, args.alpha, args.rslora)
    captions = f"captions from {data.caption_column!r}" if data.caption_column else (
        "captions from .txt files" if data.source == "txt-captions" else f"instance prompt {args.instance_prompt!r}"
    )
    targets = f"UNet {args.unet_targets!r}" + (f" + both text encoders {args.text_encoder_targets!r}" if args.train_text_encoder else "")
    lr = f"lr {args.learning_rate:g}" + (f" (text encoders {args.text_encoder_lr:g})" if args.train_text_encoder else "")
    if getattr(args, "magnitude_lr", None) is not None:
        lr += f", magnitudes {args.magnitude_lr:g}"
    per_step = args.train_batch_size * args.gradient_accumulation_steps * num_processes
    epochs = args.max_train_steps * args.gradient_accumulation_steps / micro_batches_per_epoch
    crop = "centre crop" if args.center_crop else "random crop"
    loss = [f"{'noise offset ' + format(args.noise_offset, 'g') if args.noise_offset else 'no noise offset'}"]
    loss.append(f"Min-SNR gamma {args.snr_gamma:g}" if args.snr_gamma else "no Min-SNR")
    if getattr(args, "debiased_estimation_loss", False):
        loss.append("debiased estimation 1/sqrt(SNR)")
    if getattr(args, "mask_dir", None):
        loss.append(f"masked by {args.mask_dir}")
    if args.with_prior_preservation:
        loss.append(f"prior preservation x{args.prior_loss_weight:g} ({args.num_class_images} x {args.class_prompt!r})")
    validation = "none (no --validation_prompt)"
    if args.validation_prompt:
        when = f"every {args.validation_steps} steps and at the end" if args.validation_steps else "at the end"
        validation = f"{args.num_validation_images} x {args.validation_prompt!r}, {when}"
    checkpoints = f"every {args.checkpointing_steps} steps" if args.checkpointing_steps else "off"
    if args.checkpointing_steps and args.checkpoints_total_limit:
        checkpoints += f", keep {args.checkpoints_total_limit}"
    rows = [
        ("base model", args.pretrained_model_name_or_path),
        ("VAE", args.pretrained_vae_model_name_or_path or "the base model's own"),
        ("dataset", f"{args.dataset} ({data.source}, {len(data.records)} images, {captions}"
         + (f", {len(data.skipped)} unreadable skipped" if data.skipped else "") + ")"),
        ("trigger words", ", ".join(triggers) or "none found in the captions"),
        ("images", f"{args.resolution}px{', aspect-ratio buckets' if getattr(args, 'buckets', False) else ''}, {crop}"
         f"{', random flip' if args.random_flip else ''}, repeats {args.repeats}"),
        ("adapter", f"full fine-tuning (FT) of the weights of {targets} (biases frozen), written as an exact LoRA"
         if args.adapter == "full" else
         f"{kind} rank {args.rank}, alpha {args.alpha:g} (scale {scale:g}{', rsLoRA' if args.rslora else ''}), "
         f"dropout {args.dropout:g} on {targets}"
         + "".join(f", {flag} {value}" for flag, value in (("ranks", getattr(args, "rank_pattern", None)),
                                                          ("alphas", getattr(args, "alpha_pattern", None))) if value)),
        ("optimizer", f"{args.optimizer} {lr}, weight decay {args.adam_weight_decay:g} (not on magnitudes), "
         f"{args.lr_scheduler} schedule, {args.lr_warmup_steps} warm-up steps, clip {args.max_grad_norm:g}"),
        ("batch", f"{args.train_batch_size} x {args.gradient_accumulation_steps} accumulation x {num_processes} "
         f"process{'es' if num_processes > 1 else ''} = {per_step} images per step"),
        ("steps", f"{args.max_train_steps} ({epochs:.1f} epochs of {len(data.records) * args.repeats} images)"),
        ("precision", f"{args.mixed_precision} (adapter parameters fp32), gradient checkpointing "
         f"{'on' if args.gradient_checkpointing else 'off'}{', TF32' if args.allow_tf32 else ''}"),
        ("latents / text", f"{'cached' if args.cache_latents else 'encoded every step'} / "
         f"{'encoded every step (trained)' if args.train_text_encoder else 'precomputed'}"),
        ("loss", ", ".join(loss)),
        ("seed", str(args.seed)),
        ("validation", validation),
        ("checkpoints", checkpoints + (f"; resuming from {resume}" if resume else "")),
        ("output", f"{args.output_dir}{' (overwriting)' if args.overwrite_output_dir else ''}"),
        ("tracker", args.report_to + ("" if args.report_to == "none" else f" in {Path(args.output_dir) / args.logging_dir}")),
    ]
    others = other_trainers_options(args)
    if others:
        rows.insert(next(i for i, (k, _) in enumerate(rows) if k == "loss") + 1, ("also", others))
    if args.push_to_hub:
        rows.append(("hub", f"push to {args.hub_model_id or Path(args.output_dir).name}"))
    if args.export_kohya:
        rows.append(("extra output", "kohya/ComfyUI file <output name>_kohya.safetensors"))
    width = max(len(k) for k, _ in rows)
    title = f"DreamBooth {kind} training for SDXL"
    return "\n".join([title, "-" * len(title), *(f"{k.ljust(width)}  {v}" for k, v in rows)])


def _duration(seconds: float) -> str:
    """``"1 h 02 min"``, ``"3 min 05 s"``, ``"4.2 s"``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(round(seconds), 60)
    return f"{minutes} min {sec:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def counterpart_dir(output_dir: Path, adapter: str) -> Path:
    """Where the same run with the other adapter kind would go: ``x-sdxl-dora`` -> ``x-sdxl-lora``."""
    other = "lora" if adapter == "dora" else "dora"
    name = output_dir.name
    return output_dir.with_name(name[: -len(adapter)] + other if name.endswith(f"-{adapter}") else f"{name}-{other}")


def final_report(
    args: argparse.Namespace,
    output_dir: Path,
    seconds: float,
    steps: tuple[int, int],
    losses: list[float],
    validation_images: list[Path],
    card: str | None,
    next_steps: bool = True,
) -> str:
    """What the end of a run prints: the weights, the time, the final loss, the validation images, and the next
    commands (load it in Python; train the other kind and open both in the page; not with ``next_steps=False``).
    ``steps`` is (first, last)."""
    import shlex

    first, last = steps
    kind = "DoRA" if args.adapter == "dora" else "LoRA"
    q = shlex.quote
    out = output_dir
    lines = [f"saved {out / 'pytorch_lora_weights.safetensors'}"]
    timing = f"steps {first + 1}-{last} took {_duration(seconds)} (training and validation)" if last > first else f"no step trained (already at step {last})"
    if losses:
        tail = losses[-10:]
        timing += f"; final loss {losses[-1]:.4f} (mean of the last {len(tail)} steps {sum(tail) / len(tail):.4f})"
    lines.append(timing)
    if validation_images:
        lines.append(f"validation images: {validation_images[0].parent} ({len(validation_images)} x {args.validation_prompt!r})")
    else:
        lines.append("validation images: none (--validation_prompt none)")
    if card:
        lines.append(f"model card: {out / card}")
    if not next_steps:
        return "\n".join(lines)
    other = counterpart_dir(out, args.adapter)
    other_kind = "lora" if args.adapter == "dora" else "dora"
    base = args.pretrained_model_name_or_path
    lines += [
        "next:",
        f"  load it in Python:     pipe.load_dora_weights({str(out)!r})  # after `import dora_diffusion` (the card has the full snippet)",
        f"  train the {'LoRA' if other_kind == 'lora' else 'DoRA'} to compare: the same command with --adapter {other_kind} --output_dir {q(str(other))}",
        f"  open both in the page: python app.py --base {q(str(base))} --adapter {args.adapter}={q(str(out))} "
        f"--adapter {other_kind}={q(str(other))}",
    ]
    if kind == "DoRA" and args.train_text_encoder:
        lines.append("  (diffusers' own load_lora_weights needs peft installed, and drops text-encoder DoRA magnitudes)")
    return "\n".join(lines)


def other_trainers_options(args: argparse.Namespace) -> str:
    """The options of other trainers this run uses (EMA, LoRA+, captions, timesteps, loss type), or ``""``."""
    out = []
    if getattr(args, "use_ema", False):
        out.append(f"EMA decay {args.ema_decay:g}")
    if getattr(args, "loraplus_lr_ratio", None):
        out.append(f"LoRA+ B lr x{args.loraplus_lr_ratio:g}")
    if getattr(args, "caption_dropout_rate", 0.0):
        out.append(f"caption dropout {args.caption_dropout_rate:g}")
    if getattr(args, "shuffle_caption", False):
        out.append(f"shuffled tags (first {args.keep_tokens} kept)")
    low, high = getattr(args, "min_timestep", None), getattr(args, "max_timestep", None)
    if low is not None or high is not None:
        out.append(f"timesteps [{low or 0}, {high if high is not None else 'T'})")
    if getattr(args, "loss_type", "l2") != "l2":
        c = f" c {args.huber_c:g} ({args.huber_schedule})" if args.loss_type in ("huber", "smooth_l1") else ""
        out.append(f"{args.loss_type} loss{c}")
    return ", ".join(out)
