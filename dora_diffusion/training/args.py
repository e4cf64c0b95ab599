"""Command-line flags of ``train_dreambooth_dora.py``: parsing, checks, and the defaults that depend on the machine.

Flag names follow diffusers' ``train_dreambooth_lora_sdxl_advanced.py`` wherever the two scripts share a meaning.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import re
import sys
from pathlib import Path

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
"""The default base model."""
SDXL_FP16_FIX_VAE = "madebyollin/sdxl-vae-fp16-fix"
"""The VAE used with ``SDXL_BASE`` by default: SDXL's own VAE overflows in fp16."""
NATIVE_RESOLUTIONS = {SDXL_BASE: 1024}
"""Own size of well-known bases (its unet config's sample_size 128 x its VAE's scale 8): the default --resolution at
parsing. Any other base's is read from its configs when the run starts (``models.native_resolution``)."""
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
OPTIONAL_PACKAGES = {
    "adamw8bit": ("bitsandbytes", "bitsandbytes"),
    "prodigy": ("prodigyopt", "prodigyopt"),
    "wandb": ("wandb", "wandb"),
    "tensorboard": ("tensorboard", "tensorboard"),
}
"""What an option needs: option value -> (module to import, pip package)."""
MAX_SEED = 2**32 - 1
"""Seeds are 32-bit (numpy's range): ``derive_seed`` mixes the low 32 bits, so a larger seed would repeat a smaller one."""
MAX_STEPS = 10**8
MAX_RANK = 4096
"""Twice the widest SDXL layer (a rank above a layer's width adds memory, not capacity)."""
MAX_SIDE = 16384
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
"""``--loss_type`` values, kohya's names (``step/loss.py`` ``elementwise_loss``)."""
HUBER_SCHEDULES = ("snr", "exponential", "constant")
"""``--huber_schedule`` values, kohya's names (``step/loss.py`` ``huber_threshold``)."""


class FlagParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line and a pointer to ``--help`` (not the whole usage), that
    suggests the nearest flag for an unknown one (``--rnak`` -> ``--rank``) and never expands abbreviations."""

    def __init__(self, **kwargs) -> None:
        super().__init__(allow_abbrev=False, formatter_class=DefaultsFormatter, **kwargs)

    def _known_flags(self) -> list[str]:
        return [o for a in self._actions for o in a.option_strings if a.help != argparse.SUPPRESS]

    def parse_known_args(self, args=None, namespace=None):
        """As argparse's, but an unknown flag is an error naming the nearest known flags."""
        words = sys.argv[1:] if args is None else list(args)
        every = {o for a in self._actions for o in a.option_strings}
        self._unknown = [w for w in words if w.startswith("--") and w != "--" and w.split("=", 1)[0] not in every]
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(unknown_flags_message(extras, self._known_flags()))
        return parsed, extras

    def error(self, message: str):
        """Print ``prog: error: message`` and where to find every flag; exit with status 2. A missing required flag
        is reported with the unknown flags of the same command (``--rnak 8`` without ``--dataset``: both at once)."""
        unknown = getattr(self, "_unknown", [])
        if message.startswith("the following arguments are required") and unknown:
            message += "; and " + unknown_flags_message(unknown, self._known_flags())
        self.exit(2, f"{self.prog}: error: {message}\nSee `python {self.prog} --help` for every flag and its default.\n")


class DefaultsFormatter(argparse.HelpFormatter):
    """``--help`` shows ``(default: X)`` after each flag that has a default its help does not already state."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if text == argparse.SUPPRESS or default in (None, False, argparse.SUPPRESS) or default == {} or "default" in text.lower():
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def unknown_flags_message(extras: list[str], known: list[str]) -> str:
    """``unrecognized arguments: --rnak 8 (--rnak: did you mean --rank?)``: each unknown flag with its nearest
    known ones, if any is close."""
    import difflib

    hints = []
    for word in extras:
        if not word.startswith("--"):
            continue
        name = word.split("=", 1)[0]
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.75)
        if close:
            hints.append(f"{name}: did you mean {' or '.join(close)}?")
    shown = " ".join(extras)
    shown = shown if len(shown) <= 200 else shown[:197] + "..."
    return f"unrecognized arguments: {shown}" + (f" ({'; '.join(hints)})" if hints else "")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (every flag with its default and a one-line help)."""
    p = FlagParser(
        prog="train_dreambooth_dora.py",
        description="DreamBooth DoRA (or LoRA) adapters for SDXL. "
        "Example: accelerate launch train_dreambooth_dora.py --dataset linoyts/3d_icon",
    )
    _model_flags(p)
    _data_flags(p)
    _prior_flags(p)
    _adapter_flags(p)
    _optimisation_flags(p)
    _validation_flags(p)
    _output_flags(p)
    _compat_flags(p)
    _pivotal_flags(p)
    _other_trainers_flags(p)
    _compile_flags(p)
    _fp8_flags(p)
    return p


def _model_flags(p: argparse.ArgumentParser) -> None:
    """The model flags."""
    g = p.add_argument_group("model")
    add = g.add_argument
    add("--pretrained_model_name_or_path", default=SDXL_BASE, help="SDXL base: Hub id or local diffusers directory.")
    add(
        "--pretrained_vae_model_name_or_path",
        default=None,
        help=f"VAE to train and validate with. Default: {SDXL_FP16_FIX_VAE} when the base is {SDXL_BASE}, "
        "otherwise the base's own vae. 'none' always uses the base's own vae.",
    )
    add("--revision", default=None, help="Hub revision of the base model.")
    add("--variant", default=None, help="Weight variant of the base model files, e.g. fp16.")
    add("--cache_dir", default=None, help="Where downloaded models and datasets are cached.")


def _data_flags(p: argparse.ArgumentParser) -> None:
    """The data flags."""
    g = p.add_argument_group("data")
    add = g.add_argument
    add(
        "--dataset",
        "--dataset_name",
        "--instance_data_dir",
        dest="dataset",
        required=True,
        help="Hub dataset id, or a local folder: an imagefolder with metadata.jsonl/.csv, images with same-name "
        ".txt captions, or images only (then give --instance_prompt).",
    )
    add("--dataset_config_name", default=None, help="Config name of a Hub dataset.")
    add("--dataset_revision", default=None, help="Branch, tag or commit of a Hub dataset (default: main).")
    add("--image_column", default="image", help="Dataset column holding the images.")
    add("--caption_column", default=None, help="Dataset column holding the captions (default: detect prompt/text/caption).")
    add("--instance_prompt", default=None, help="Caption for images that have none.")
    add(
        "--trigger",
        default=None,
        help="The words that call the concept (model card, default validation prompt). Default: found in the captions, "
        "a rare token such as TOK in all of them, else the phrase all start with (linoyts/3d_icon: 'a 3dicon').",
    )
    add("--repeats", type=int_in(1, 10_000), default=1, help="How many times each image appears in one epoch.")
    add(
        "--resolution",
        type=int_in(8, MAX_SIDE),
        default=None,
        help="Square training resolution in pixels (a multiple of 8). Default: the base model's own size, its UNet's "
        "sample_size x the VAE's scale factor (1024 for SDXL, 64 for the toy world).",
    )
    add("--center_crop", action="store_true", help="Crop the centre after resizing (default: a random crop).")
    add("--random_flip", action="store_true", help="Flip half of the images horizontally.")
    add(
        "--buckets",
        "--enable_bucket",
        dest="buckets",
        action="store_true",
        help="Aspect-ratio buckets: crop each image to the bucket (about resolution^2 pixels) nearest its shape, "
        "instead of a square.",
    )
    add("--bucket_step", "--bucket_reso_steps", dest="bucket_step", type=int_in(8, MAX_SIDE), default=64, help="Bucket sides are multiples of this.")
    add("--min_bucket_side", "--min_bucket_reso", dest="min_bucket_side", type=int_in(8, MAX_SIDE), default=None, help="Default: resolution / 2.")
    add("--max_bucket_side", "--max_bucket_reso", dest="max_bucket_side", type=int_in(8, MAX_SIDE), default=None, help="Default: 2 x resolution.")
    add("--dataloader_num_workers", type=int_in(0, 256), default=0, help="Worker processes that prepare images.")


def _prior_flags(p: argparse.ArgumentParser) -> None:
    """The prior preservation flags."""
    g = p.add_argument_group("prior preservation")
    add = g.add_argument
    add("--with_prior_preservation", action="store_true", help="Add a prior-preservation loss on class images.")
    add("--class_prompt", default=None, help="Prompt of the class images, e.g. 'a 3d icon'.")
    add("--class_data_dir", default=None, help="Folder of class images; missing ones are generated with the base model.")
    add("--num_class_images", type=int_in(1, 1_000_000), default=100, help="Number of class images to use (and generate if missing).")
    add("--prior_loss_weight", type=float, default=1.0, help="Weight of the prior-preservation loss.")
    add("--sample_batch_size", type=int_in(1, 4096), default=4, help="Batch size when generating class images.")
    add("--prior_generation_steps", type=int_in(1, 10_000), default=30, help="Denoising steps per generated class image.")


def _adapter_flags(p: argparse.ArgumentParser) -> None:
    """The adapter flags."""
    g = p.add_argument_group(
        "adapter",
        "--adapter dora,lora (or lora,dora) trains both, one after the other on the same data order, noise, timesteps "
        "and seeds, into <output_dir>/dora and <output_dir>/lora, then renders a base | DoRA | LoRA grid "
        "(docs/training.md, 'A DoRA/LoRA pair in one command').",
    )
    add = g.add_argument
    add(
        "--adapter",
        type=adapter_choice,
        default="dora",
        metavar="dora|lora|full|dora,lora",
        help="DoRA (magnitude + direction) or plain LoRA; full: full fine-tuning (FT) of the --unet_targets weights "
        "themselves, the DoRA paper's reference, written as an exact LoRA of the change (fp32; large on SDXL, `attn` "
        "checkpoints about 17 GiB: docs/training.md); dora,lora: both as a pair.",
    )
    add("--rank", type=int_in(1, MAX_RANK), default=8, help="Rank r of the low-rank update.")
    add("--alpha", type=float, default=None, help="LoRA alpha; the update is scaled by alpha / rank (default alpha = rank).")
    add("--dropout", "--lora_dropout", dest="dropout", type=float, default=0.0, help="Dropout on the input of the low-rank path.")
    add("--rslora", action="store_true", help="Scale by alpha / sqrt(rank) (rank-stabilised LoRA).")
    add(
        "--rank_pattern",
        type=json_dict("--rank_pattern", int),
        default={},
        help="Per-module ranks, PEFT's dict form as JSON: '{\"down_blocks.2\": 16, \"to_k\": 4}'. A key matches a module "
        "whose name holds it as whole dotted parts (a block, a layer, a suffix); the longest matching key wins.",
    )
    add("--alpha_pattern", type=json_dict("--alpha_pattern", float), default={}, help="Per-module alphas, as --rank_pattern.")
    add(
        "--unet_targets",
        default="attn",
        help="UNet modules to adapt: a preset (attn, attn_ff, all), comma-separated module names, or re:<regex>.",
    )
    add("--train_text_encoder", action="store_true", help="Also adapt both CLIP text encoders.")
    add("--text_encoder_targets", default="attn", help="Text-encoder modules: a preset (attn, all), names, or re:<regex>.")
    add("--text_encoder_lr", type=float, default=5e-6, help="Learning rate of the text-encoder adapters.")


def _optimisation_flags(p: argparse.ArgumentParser) -> None:
    """The optimisation flags."""
    g = p.add_argument_group("optimisation")
    add = g.add_argument
    add("--optimizer", choices=("adamw", "adamw8bit", "prodigy"), default="adamw", type=str.lower, help="Optimizer.")
    add("--learning_rate", type=float, default=1e-4, help="Learning rate of the UNet adapter (prodigy: use 1.0).")
    add(
        "--magnitude_lr",
        type=float,
        default=None,
        help="Learning rate of the UNet's DoRA magnitudes (default: --learning_rate); text-encoder magnitudes get "
        "--text_encoder_lr times the same ratio.",
    )
    add("--scale_lr", action="store_true", help="Multiply the learning rates by batch size x accumulation x processes.")
    add("--adam_beta1", type=float, default=0.9)
    add("--adam_beta2", type=float, default=0.999)
    add("--adam_epsilon", type=float, default=1e-8)
    add("--adam_weight_decay", type=float, default=1e-4, help="Weight decay of A and B (never of the magnitudes).")
    add("--prodigy_beta3", type=float, default=None, help="Prodigy beta3 (default: sqrt(beta2)).")
    on_off(g, "prodigy_decouple", True, "Prodigy: AdamW-style decoupled weight decay.")
    on_off(g, "prodigy_use_bias_correction", True, "Prodigy: Adam's bias correction.")
    on_off(g, "prodigy_safeguard_warmup", True, "Prodigy: safeguard the step-size estimate during warm-up.")
    add("--lr_scheduler", choices=SCHEDULERS, default="constant", help="Learning-rate schedule.")
    add("--lr_warmup_steps", type=int_in(0, MAX_STEPS), default=0, help="Linear warm-up steps (schedules other than 'constant').")
    add("--lr_num_cycles", type=int_in(1, MAX_STEPS), default=1, help="Restarts of cosine_with_restarts.")
    add("--lr_power", type=float, default=1.0, help="Power of the polynomial schedule.")
    add("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm (0 disables).")
    add("--train_batch_size", type=int_in(1, 4096), default=1, help="Images per process per micro-batch.")
    add("--gradient_accumulation_steps", type=int_in(1, 65_536), default=4, help="Micro-batches per optimizer step.")
    add("--max_train_steps", type=int_in(1, MAX_STEPS), default=None, help="Optimizer steps (default 500, or --num_train_epochs).")
    add("--num_train_epochs", type=int_in(1, MAX_STEPS), default=None, help="Train this many epochs when --max_train_steps is not given.")
    add("--snr_gamma", type=float, default=None, help="Min-SNR loss weighting gamma (5.0 is usual).")
    add(
        "--debiased_estimation_loss",
        action="store_true",
        help="Weight each sample's loss by 1/sqrt(SNR) (1/(SNR+1) for v-prediction), SNR capped at 1000 (kohya's flag).",
    )
    add(
        "--mask_dir",
        default=None,
        help="Masked loss: a folder of masks named like the training images (cat.png for cat.jpg; white = learn, "
        "black = ignore), cropped and flipped with their images.",
    )
    add("--noise_offset", type=float, default=0.0, help="Noise offset (0.05-0.1 helps very dark/bright images).")
    add("--cache_latents", action="store_true", help="Encode every image with the VAE once, before training.")
    add("--mixed_precision", choices=("no", "fp16", "bf16"), default=None, help="Default: bf16 where supported, else fp16; no on CPU.")
    on_off(g, "gradient_checkpointing", True, "Recompute activations in the backward pass to save memory.")
    add("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere GPUs.")
    add("--seed", type=int_in(0, MAX_SEED), default=0, help="Seed of everything random (data order, crops, noise, validation).")


def _validation_flags(p: argparse.ArgumentParser) -> None:
    """The validation and logging flags."""
    g = p.add_argument_group("validation and logging")
    add = g.add_argument
    add(
        "--validation_prompt",
        default=None,
        help="Prompt rendered during and after training. Default: '<trigger>, an astronaut riding a horse' "
        "(without a trigger: the first caption); 'none': no validation images.",
    )
    add("--num_validation_images", type=int_in(1, 1024), default=4, help="Images per validation (seeds seed, seed+1, ...).")
    add("--validation_steps", type=int_in(1, MAX_STEPS), default=None, help="Validate every N steps (always once at the end).")
    add("--validation_epochs", type=int_in(1, MAX_STEPS), default=None, help="Validate every N epochs (diffusers' flag; --validation_steps wins).")
    add("--validation_inference_steps", type=int_in(1, 10_000), default=25, help="Denoising steps of validation images.")
    add("--validation_guidance_scale", type=float, default=5.0, help="Guidance scale of validation images.")
    add("--report_to", choices=("tensorboard", "wandb", "none"), default=None, help="Tracker (default: tensorboard if installed).")
    add("--logging_dir", default="logs", help="Tracker directory, relative to output_dir.")


def _output_flags(p: argparse.ArgumentParser) -> None:
    """The checkpoints and output flags."""
    g = p.add_argument_group("checkpoints and output")
    add = g.add_argument
    add(
        "--output_dir",
        default=None,
        help="Default: <dataset name>-sdxl-<adapter> in the current directory (a pair: <dataset name>-sdxl-dora-lora, "
        "holding dora/ and lora/).",
    )
    add("--overwrite_output_dir", action="store_true", help="Replace a previous run in output_dir.")
    add("--checkpointing_steps", type=int_in(0, MAX_STEPS), default=250, help="Save a resumable checkpoint every N steps (0: never).")
    add("--checkpoints_total_limit", type=int_in(1, MAX_STEPS), default=None, help="Keep at most this many checkpoints.")
    add(
        "--resume_from_checkpoint",
        default=None,
        help="'latest' (the newest intact checkpoint; with none, stop and write nothing), 'auto' (as latest, but start "
        "a new run in a folder that holds no run yet: one command for every start) or a checkpoint directory. Refused "
        "if the checkpoint was trained with other adapter settings or on other images or captions.",
    )
    add(
        "--allow_dataset_change",
        action="store_true",
        help="Resume although the images or captions differ from those the checkpoint was trained on (fixed "
        "captions, added images); the data order then differs from an uninterrupted run.",
    )
    add(
        "--export_kohya",
        "--output_kohya_format",
        dest="export_kohya",
        action="store_true",
        help="Also write <name>_kohya.safetensors (kohya/LyCORIS names; exact in LyCORIS, not in ComfyUI / Forge).",
    )
    add(
        "--export_comfyui",
        action="store_true",
        help="Also write <name>_comfyui.safetensors: kohya names, with dora_scale written for ComfyUI's and Forge's "
        "rule, so they render it as dora-diffusion does.",
    )
    add("--push_to_hub", action="store_true", help="Upload the run's own files (adapter, card, validation images, settings) to a private Hub repo at the end.")
    add("--hub_model_id", default=None, help="Hub repo id (default: the output_dir name under your account).")
    add("--hub_token", default=None, help="Hub token (default: the one saved by `hf auth login`).")
    add("--hub_public", action="store_true", help="Create the Hub repo public (default: private).")
    add(
        "--hub_private_repo",
        action="store_true",
        help="Create the Hub repo private: the default already (transformers' flag; diffusers' scripts have none).",
    )
    add("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)


def _compat_flags(p: argparse.ArgumentParser) -> None:
    """The flags of diffusers' scripts, accepted as they are."""
    g = p.add_argument_group(
        "diffusers flags", "Accepted so that commands written for diffusers' SDXL DreamBooth scripts run as they are."
    )
    add = g.add_argument
    add("--use_dora", action="store_true", help="DoRA (already the default here; --adapter lora for plain LoRA).")
    add("--use_8bit_adam", action="store_true", help="Same as --optimizer adamw8bit (needs bitsandbytes).")
    add(
        "--enable_xformers_memory_efficient_attention",
        action="store_true",
        help="Accepted and not needed: attention runs through PyTorch's scaled_dot_product_attention (SDPA).",
    )


def _pivotal_flags(p: argparse.ArgumentParser) -> None:
    """The pivotal tuning flags."""
    g = p.add_argument_group("pivotal tuning", "New tokens for the concept, trained with the adapter (diffusers' flags).")
    add = g.add_argument
    add(
        "--train_text_encoder_ti",
        action="store_true",
        help="Replace --token_abstraction in the captions by new tokens (<s0><s1>) and train their embeddings in both "
        "text encoders; saved as <output name>_emb.safetensors.",
    )
    add("--train_text_encoder_ti_frac", type=float, default=0.5, help="Fraction of the steps the embeddings train.")
    add("--token_abstraction", default="TOK", help="Caption word(s), comma-separated, that become new tokens.")
    add("--num_new_tokens_per_abstraction", type=int_in(1, 64), default=2, help="New tokens per abstraction word.")


def _other_trainers_flags(p: argparse.ArgumentParser) -> None:
    """The options people pick other trainers for, under those trainers' names (docs/training.md says whose)."""
    g = p.add_argument_group(
        "options of other trainers", "EMA, LoRA+, caption dropout and shuffling, a timestep range, Huber loss."
    )
    add = g.add_argument
    add(
        "--use_ema",
        action="store_true",
        help="Keep an exponential moving average of the adapter tensors; validation and the saved adapter use it, "
        "the raw weights train (checkpoints keep both).",
    )
    add(
        "--ema_decay",
        type=float,
        default=None,
        help="EMA decay (default 0.995): after step t the average keeps min(decay, (1+k)/(10+k)), k = t - 1, of itself "
        "(diffusers' EMAModel).",
    )
    add(
        "--loraplus_lr_ratio",
        type=float,
        default=None,
        help="LoRA+: the B matrices learn at this ratio x the learning rate of A (16 is the paper's; kohya's network "
        "arg). DoRA magnitudes keep their own rate.",
    )
    add("--caption_dropout_rate", type=float, default=0.0, help="Probability that a sample trains with the empty caption.")
    add("--shuffle_caption", action="store_true", help="Shuffle each caption's comma-separated tags every epoch.")
    add("--keep_tokens", type=int_in(0, 1000), default=0, help="With --shuffle_caption: keep the first N tags in front.")
    add("--min_timestep", type=int_in(0, 999), default=None, help="Lowest training timestep (default 0).")
    add("--max_timestep", type=int_in(1, 1000), default=None, help="Training timesteps stay below this (default 1000).")
    add(
        "--loss_type",
        choices=LOSS_TYPES,
        default="l2",
        help="Error per element: l2 (squared), l1, huber (pseudo-Huber 2c(sqrt(d^2+c^2)-c)) or smooth_l1 "
        "(2(sqrt(d^2+c^2)-c)), kohya's.",
    )
    add("--huber_c", type=float, default=None, help="Threshold c of huber and smooth_l1 (kohya's default 0.1).")
    add(
        "--huber_schedule",
        choices=HUBER_SCHEDULES,
        default=None,
        help="How c varies with the timestep: snr ((1-c)/(1+sigma_t)^2 + c; kohya's default), exponential (c^(t/T)) "
        "or constant.",
    )


def _compile_flags(p: argparse.ArgumentParser) -> None:
    """``--compile`` (kohya's ``--torch_compile``) and its backend (kohya's ``--dynamo_backend``)."""
    g = p.add_argument_group("compilation", "torch.compile of the UNet's training step (docs/training.md, 'Compiling the UNet').")
    add = g.add_argument
    add(
        "--compile",
        "--torch_compile",
        dest="compile",
        action="store_true",
        help="Train through torch.compile(unet): the first step compiles (minutes for SDXL), later steps run the fused "
        "graph. Validation and the saved files use the eager UNet.",
    )
    add("--dynamo_backend", default=None, help="The torch.compile backend with --compile (default inductor).")


def check_compile_flags(args: argparse.Namespace) -> None:
    """Raise ``ValueError`` naming ``--dynamo_backend`` when it is given without ``--compile`` or is unknown; then fill
    in its default."""
    if args.dynamo_backend is not None and not args.compile:
        raise ValueError(f"--dynamo_backend {args.dynamo_backend} does nothing without --compile; add --compile or drop it")
    if args.compile:
        import torch._dynamo

        args.dynamo_backend = args.dynamo_backend or "inductor"
        known = set(torch._dynamo.list_backends(exclude_tags=())) | {"eager"}
        if args.dynamo_backend not in known:
            raise ValueError(
                f"--dynamo_backend {args.dynamo_backend!r} is not a torch.compile backend here; choose one of {', '.join(sorted(known))}"
            )


OTHER_TRAINERS_DEFAULTS = {
    "use_ema": False, "ema_decay": 0.995, "loraplus_lr_ratio": None, "caption_dropout_rate": 0.0,
    "shuffle_caption": False, "keep_tokens": 0, "min_timestep": None, "max_timestep": None, "loss_type": "l2",
    "huber_c": 0.1, "huber_schedule": "snr",
}  # fmt: skip
"""The defaults of ``_other_trainers_flags``: what a run recorded before they existed trained with (``RUN_DEFAULTS``)."""


def _fp8_flags(p: argparse.ArgumentParser) -> None:
    """``--fp8_base`` (issue 31 item 3; ``training/fp8_base.py``)."""
    g = p.add_argument_group("float8 base")
    g.add_argument(
        "--fp8_base",
        action="store_true",
        help="Store the frozen UNet (and the text encoders unless they train) in float8 e4m3fn with a per-channel "
        "scale, computed per layer in the training dtype: about half the weight memory of bf16 (kohya's --fp8_base).",
    )


def check_fp8_flags(args: argparse.Namespace) -> None:
    """Raise ``ValueError`` if ``--fp8_base`` cannot work here (a torch without float8_e4m3fn)."""
    if args.fp8_base:
        from dora_diffusion.core.fp8 import float8_dtype

        try:
            float8_dtype()
        except RuntimeError as err:
            raise ValueError(f"--fp8_base: {err}") from None


def check_other_trainers_flags(args: argparse.Namespace) -> None:
    """Raise ``ValueError`` naming the flag of ``_other_trainers_flags`` whose value cannot work or does nothing;
    then fill in the defaults of ``--ema_decay``, ``--huber_c`` and ``--huber_schedule`` (None when not given, so that
    one given without the flag it tunes is refused)."""
    if args.ema_decay is not None and not args.use_ema:
        raise ValueError("--ema_decay does nothing without --use_ema; add --use_ema or drop --ema_decay")
    for name in ("huber_c", "huber_schedule"):
        if getattr(args, name) is not None and args.loss_type not in ("huber", "smooth_l1"):
            raise ValueError(
                f"--{name} does nothing with --loss_type {args.loss_type}; pass --loss_type huber or smooth_l1, or drop --{name}"
            )
    for name in ("ema_decay", "huber_c", "huber_schedule"):
        if getattr(args, name) is None:
            setattr(args, name, OTHER_TRAINERS_DEFAULTS[name])
    if not 0.0 < args.ema_decay < 1.0:
        raise ValueError(f"--ema_decay must be in (0, 1), got {args.ema_decay} (0.995 is the default; 0.999 averages longer)")
    if args.loraplus_lr_ratio is not None and args.loraplus_lr_ratio <= 0:
        raise ValueError(f"--loraplus_lr_ratio must be positive, got {args.loraplus_lr_ratio} (16 is the paper's)")
    if not 0.0 <= args.caption_dropout_rate < 1.0:
        raise ValueError(f"--caption_dropout_rate must be in [0, 1), got {args.caption_dropout_rate}")
    if args.keep_tokens and not args.shuffle_caption:
        raise ValueError(f"--keep_tokens {args.keep_tokens} does nothing without --shuffle_caption; add it or drop --keep_tokens")
    low = args.min_timestep if args.min_timestep is not None else 0
    high = args.max_timestep if args.max_timestep is not None else 1000
    if low >= high:
        raise ValueError(f"--min_timestep {low} must be below --max_timestep {high} (timesteps are drawn from [min, max))")
    if args.loss_type in ("huber", "smooth_l1") and not 0.0 < args.huber_c <= 1.0:
        raise ValueError(f"--huber_c must be in (0, 1] (kohya's schedules assume it), got {args.huber_c}")


FLOAT_RANGES = {
    "adam_beta1": (0.0, 1.0),
    "adam_beta2": (0.0, 1.0),
    "prodigy_beta3": (0.0, 1.0),
    "adam_epsilon": (0.0, math.inf),
    "adam_weight_decay": (0.0, math.inf),
    "max_grad_norm": (0.0, math.inf),
    "prior_loss_weight": (0.0, math.inf),
    "noise_offset": (0.0, math.inf),
}
"""Float flags with a range ``[low, high)``: a value outside it would fail in the optimizer hours later, or do nothing."""


def int_in(low: int, high: int):
    """An argparse type: an integer from ``low`` to ``high``; the error names the range (argparse adds the flag).

    Text longer than 40 characters is refused unread (Python will not even convert 5000 digits).
    """

    def parse(text: str) -> int:
        value = None
        if len(text) <= 40:
            try:
                value = int(text)
            except ValueError:
                pass
        if value is None or not low <= value <= high:
            shown = repr(text) if len(text) <= 40 else f"{text[:12]!r}... ({len(text)} characters)"
            raise argparse.ArgumentTypeError(f"must be an integer from {low} to {high}, got {shown}")
        return value

    parse.__name__ = "int"
    return parse


def notices(args: argparse.Namespace) -> list[str]:
    """What a diffusers flag in the command changes, or does not, here: one line each, printed at the start."""
    out = []
    if args.enable_xformers_memory_efficient_attention:
        out.append("--enable_xformers_memory_efficient_attention: not needed, attention uses PyTorch's SDPA")
    return out


def json_dict(flag: str, value_type: type):
    """An argparse type: a JSON object of module-name keys to positive numbers."""
    import json

    def parse(text: str) -> dict:
        try:
            value = json.loads(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"not JSON ({err}); write e.g. '{{\"down_blocks.2\": 16}}'") from None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"expected a JSON object of module name -> number, got {type(value).__name__}")
        out = {}
        for key, v in value.items():
            if not key or not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise argparse.ArgumentTypeError(f"{key!r}: {v!r} is not a positive number")
            if value_type is int and (v != int(v) or v > MAX_RANK):
                raise argparse.ArgumentTypeError(f"{key!r}: rank {v!r} is not a whole number from 1 to {MAX_RANK}")
            out[key] = value_type(v)
        return out

    parse.__name__ = flag
    return parse


def on_off(group, name: str, default: bool, help: str) -> None:
    """``--name`` / ``--no_name`` (underscores, like every other flag here)."""
    group.add_argument(f"--{name}", dest=name, action="store_true", default=default, help=f"{help} Default {'on' if default else 'off'}; --no_{name} turns it off.")
    group.add_argument(f"--no_{name}", dest=name, action="store_false", help=argparse.SUPPRESS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the flags; defaults that need no machine knowledge are resolved here.

    Errors exit with argparse's usage message, naming the flag.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resolution is None and args.pretrained_model_name_or_path.rstrip("/") in NATIVE_RESOLUTIONS:
        args.resolution = NATIVE_RESOLUTIONS[args.pretrained_model_name_or_path.rstrip("/")]
    try:
        check_args(args, parser)
        check_full_flags(args, given_flags(sys.argv[1:] if argv is None else argv))
        check_other_trainers_flags(args)
        check_compile_flags(args)
        check_fp8_flags(args)
    except ValueError as err:
        parser.error(str(err))
    if args.use_8bit_adam:
        args.optimizer = "adamw8bit"
    if args.max_train_steps is None and args.num_train_epochs is None:
        args.max_train_steps = 500
    args.alpha_is_rank = args.alpha is None
    if args.alpha is None:
        args.alpha = float(args.rank)
    args.pretrained_vae_model_name_or_path = resolve_vae(
        args.pretrained_model_name_or_path, args.pretrained_vae_model_name_or_path
    )
    if args.output_dir is None:
        args.output_dir = default_output_dir(args.dataset, args.adapter)
    if args.report_to is None:
        args.report_to = "tensorboard" if _installed("tensorboard") else "none"
    return args


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> None:
    """Raise ``ValueError`` naming the first flag whose value cannot work (before anything is loaded or written)."""
    for action in (parser or build_parser())._actions:
        value = getattr(args, action.dest, None)
        if action.type is float and isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{action.option_strings[0]} must be a finite number, got {value}")
    for name in ("learning_rate", "text_encoder_lr", "magnitude_lr"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
    for name, (low, high) in FLOAT_RANGES.items():
        value = getattr(args, name)
        if value is not None and not low <= value < high:
            raise ValueError(f"--{name} must be in [{low}, {high}), got {value}")
    if args.snr_gamma is not None and args.snr_gamma <= 0:
        raise ValueError(f"--snr_gamma must be positive (5.0 is usual), got {args.snr_gamma}")
    for name in ("unet_targets", "text_encoder_targets"):
        targets = parse_targets(getattr(args, name), f"--{name}")
        if isinstance(targets, str) and targets not in ("attn", "attn_ff", "all"):
            try:
                re.compile(targets)
            except re.error as err:
                raise ValueError(f"--{name} re:{targets} is not a valid regular expression: {err}") from None
    if args.resolution is not None:
        check_sides(args)
    positive = ("rank", "repeats", "train_batch_size", "gradient_accumulation_steps", "num_validation_images")
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("max_train_steps", "num_train_epochs", "validation_steps", "checkpoints_total_limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}")
    check_pair_flags(args)
    if args.use_dora and "dora" not in args.adapter.split(","):
        raise ValueError(f"--use_dora and --adapter {args.adapter} contradict each other; pass one")
    if args.use_8bit_adam and args.optimizer not in ("adamw", "adamw8bit"):
        raise ValueError(f"--use_8bit_adam and --optimizer {args.optimizer} contradict each other; pass one")
    if args.use_8bit_adam and not _installed("bitsandbytes"):
        raise ValueError("--use_8bit_adam needs the optional package bitsandbytes: pip install bitsandbytes")
    if not 0.0 < args.train_text_encoder_ti_frac <= 1.0:
        raise ValueError(f"--train_text_encoder_ti_frac must be in (0, 1], got {args.train_text_encoder_ti_frac}")
    if args.num_new_tokens_per_abstraction < 1:
        raise ValueError(f"--num_new_tokens_per_abstraction must be at least 1, got {args.num_new_tokens_per_abstraction}")
    if args.validation_epochs is not None and args.validation_epochs < 1:
        raise ValueError(f"--validation_epochs must be at least 1, got {args.validation_epochs}")
    if args.hub_public and args.hub_private_repo:
        raise ValueError("--hub_public and --hub_private_repo contradict each other; pass one")
    if args.overwrite_output_dir and args.resume_from_checkpoint:
        raise ValueError("--overwrite_output_dir and --resume_from_checkpoint contradict each other; pass one")
    if args.checkpointing_steps < 0:
        raise ValueError(f"--checkpointing_steps must be >= 0, got {args.checkpointing_steps}")
    if not 0.0 <= args.dropout < 1.0:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.alpha is not None and args.alpha <= 0:
        raise ValueError(f"--alpha must be positive, got {args.alpha}")
    if args.with_prior_preservation:
        missing = [f"--{n}" for n in ("class_prompt", "class_data_dir") if not getattr(args, n)]
        if missing:
            raise ValueError(f"--with_prior_preservation needs {' and '.join(missing)}")
        if args.num_class_images < 1:
            raise ValueError(f"--num_class_images must be at least 1, got {args.num_class_images}")
    for flag, module in (("export_kohya", "kohya"), ("export_comfyui", "comfyui")):
        if getattr(args, flag) and not _installed(f"dora_diffusion.formats.{module}"):
            raise ValueError(f"--{flag} needs dora_diffusion.formats.{module}, which this install does not have")
    for option in (args.optimizer, args.report_to):
        if option in OPTIONAL_PACKAGES:
            module, package = OPTIONAL_PACKAGES[option]
            if not _installed(module):
                flag = "--optimizer" if option == args.optimizer else "--report_to"
                raise ValueError(f"{flag} {option} needs the optional package {package}: pip install {package}")


def check_sides(args) -> None:
    """Raise ``ValueError`` if ``--resolution`` or the bucket sides cannot work. Run when the resolution is known: at
    parsing if it was given, else once the base model's own size has been read (``TrainingRun``)."""
    if args.resolution <= 0 or args.resolution % 8:
        raise ValueError(
            f"--resolution {args.resolution} is not a positive multiple of 8; SDXL's VAE downsamples by 8 "
            "(use e.g. 1024, 768 or 512)"
        )
    if args.buckets:
        if args.bucket_step < 8 or args.bucket_step % 8:
            raise ValueError(f"--bucket_step must be a positive multiple of 8, got {args.bucket_step}")
        low, high = args.min_bucket_side, args.max_bucket_side
        if low is not None and (low % args.bucket_step or low > args.resolution):
            raise ValueError(f"--min_bucket_side {low} must be a multiple of --bucket_step and at most --resolution")
        if high is not None and (high % args.bucket_step or high < args.resolution):
            raise ValueError(f"--max_bucket_side {high} must be a multiple of --bucket_step and at least --resolution")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def resolve_vae(base: str, vae: str | None) -> str | None:
    """The VAE to load, or None for the base's own.

    Rule: with no ``--pretrained_vae_model_name_or_path``, the fp16-fix VAE replaces SDXL base's VAE only
    when the base is the Hub id ``stabilityai/stable-diffusion-xl-base-1.0``; any other base (a local
    directory, a fine-tune) keeps its own vae. ``none`` always keeps the base's vae.
    """
    if vae is None:
        return SDXL_FP16_FIX_VAE if base.rstrip("/") == SDXL_BASE else None
    if vae.lower() == "none":
        return None
    return vae


def default_output_dir(dataset: str, adapter: str) -> str:
    """``<last part of the dataset name>-sdxl-<adapter>``: ``linoyts/3d_icon`` -> ``3d_icon-sdxl-dora``; a pair
    (``dora,lora`` in either order) -> ``3d_icon-sdxl-dora-lora``."""
    name = Path(dataset.rstrip("/\\")).name or "dataset"
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "dataset"
    return f"{name}-sdxl-{'-'.join(PAIR) if ',' in adapter else adapter}"


PAIR = ("dora", "lora")
"""The adapters of ``--adapter dora,lora``, and the names of their folders in the output folder."""


def adapter_choice(text: str) -> str:
    """``--adapter``: ``dora``, ``lora``, ``full`` (full fine-tuning, ``training/full.py``), or a pair ``dora,lora`` /
    ``lora,dora`` (trained in the order given)."""
    kinds = [k.strip().lower() for k in text.split(",")]
    if len(kinds) == 1 and kinds[0] in (*PAIR, "full"):
        return kinds[0]
    if "full" in kinds:
        raise argparse.ArgumentTypeError(
            f"{text!r}: full fine-tuning is not part of a pair (a pair is dora,lora); run --adapter full on its own, "
            "with the same flags and seed as the pair, for the same data order, noise and timesteps"
        )
    if sorted(kinds) == sorted(PAIR):
        return ",".join(kinds)
    raise argparse.ArgumentTypeError(
        f"{text!r}: choose dora, lora, or dora,lora (a DoRA and a LoRA trained as a pair; lora,dora trains the LoRA "
        "first)"
    )


def given_flags(argv: list[str]) -> set[str]:
    """The ``--flags`` written in ``argv`` (``--rank=4`` as ``--rank``), to tell a flag given from its default."""
    return {a.split("=", 1)[0] for a in argv if a.startswith("--")}


def check_full_flags(args: argparse.Namespace, given: set[str]) -> None:
    """Raise ``ValueError`` for a flag ``--adapter full`` (full fine-tuning) has no use for; ``given``: the flags in
    the command (``--rank`` and ``--alpha`` are refused when written, even at their defaults)."""
    if args.adapter != "full":
        return
    lowrank = [f for f in ("--rank", "--alpha") if f in given]
    lowrank += [f"--{n}" for n in ("rslora", "rank_pattern", "alpha_pattern") if getattr(args, n)]
    lowrank += ["--dropout"] if args.dropout else []
    refused = {
        "a low-rank adapter's shape (full fine-tuning has no rank: its file's rank per module is min(out, in x kh x kw))": lowrank,
        "DoRA's magnitudes or LoRA's B matrices (full fine-tuning trains the weights at --learning_rate)":
            [f"--{n}" for n in ("magnitude_lr", "loraplus_lr_ratio") if getattr(args, n) is not None],
        "the text encoders (full fine-tuning trains the UNet only)":
            [f"--{n}" for n in ("train_text_encoder", "train_text_encoder_ti") if getattr(args, n)],
        "a frozen float8 base (full fine-tuning trains those weights in fp32)": ["--fp8_base"] if args.fp8_base else [],
    }  # fmt: skip
    for what, flags in refused.items():
        if flags:
            raise ValueError(f"--adapter full with {' '.join(flags)}: that sets {what}; drop {' and '.join(flags)}")


def check_pair_flags(args: argparse.Namespace) -> None:
    """Raise ``ValueError`` for a flag a pair (``--adapter dora,lora``) cannot take as a single run does."""
    if "," not in args.adapter:
        return
    if args.resume_from_checkpoint not in (None, "latest", "auto"):
        raise ValueError(
            f"--adapter {args.adapter} with --resume_from_checkpoint {args.resume_from_checkpoint}: a pair resumes each "
            "half from its own latest checkpoint; pass --resume_from_checkpoint latest (or auto)"
        )


def resolve_mixed_precision(requested: str | None, device_type: str, env: dict | None = None) -> str:
    """``--mixed_precision``; else what ``accelerate launch`` / ``accelerate config`` chose; else the machine's default.

    ``accelerate launch`` passes its choice as ``ACCELERATE_MIXED_PRECISION``, but writes ``no`` also when
    nothing chose it, so ``no`` only counts when accelerate's default config file says so. The machine's
    default: bf16 on a CUDA GPU of compute capability 8 or more (Ampere, Hopper: bf16 in hardware; older GPUs
    only emulate it, slowly), fp16 on older and other GPUs, no on the CPU.
    """
    if requested is not None:
        return requested
    env = os.environ if env is None else env
    launched = env.get("ACCELERATE_MIXED_PRECISION")
    if launched and launched != "no":
        return launched
    configured = accelerate_config_precision()
    if configured is not None:
        return configured
    if device_type == "cuda":
        import torch

        return "bf16" if torch.cuda.get_device_capability()[0] >= 8 else "fp16"
    if device_type in ("mps", "xpu", "npu"):
        return "fp16"
    return "no"


def accelerate_config_precision() -> str | None:
    """``mixed_precision`` of accelerate's default config file (``accelerate config``), or None without one."""
    try:
        from accelerate.commands.config.config_args import default_config_file
    except ImportError:
        return None
    path = Path(default_config_file)
    if not path.is_file():
        return None
    import json

    import yaml

    try:
        text = path.read_text(encoding="utf-8")
        config = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError):
        return None
    value = config.get("mixed_precision") if isinstance(config, dict) else None
    return value if value in ("no", "fp16", "bf16") else None


def parse_targets(value: str, flag: str = "targets") -> str | list[str]:
    """A ``--*_targets`` value as ``AdapterConfig.targets``: preset name, list of names, or regex."""
    value = value.strip()
    if value in ("attn", "attn_ff", "all"):
        return value
    if value.startswith("re:"):
        if not value[3:]:
            raise ValueError(f"{flag} re: needs a regular expression after 're:'")
        return value[3:]
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise ValueError(f"{flag} is an empty target list")
    return names


RUN_KEYS = (
    "pretrained_model_name_or_path",
    "pretrained_vae_model_name_or_path",
    "dataset",
    "adapter",
    "rank",
    "alpha",
    "rslora",
    "unet_targets",
    "train_text_encoder",
    "text_encoder_targets",
    "rank_pattern",
    "alpha_pattern",
)
"""Settings that define the adapter being trained: a checkpoint made with other values cannot be resumed."""
RUN_DEFAULTS = {"rank_pattern": {}, "alpha_pattern": {}, **OTHER_TRAINERS_DEFAULTS, "fp8_base": False, "compile": False, "dynamo_backend": None}
"""What a setting recorded by an older version, which did not have it, meant."""
PATH_KEYS = ("pretrained_model_name_or_path", "pretrained_vae_model_name_or_path", "dataset")
"""Settings that may be local paths: compared by what they point at, not as strings."""


def run_settings(args: argparse.Namespace) -> dict:
    """The flags worth recording in ``training_args.json`` and the model card (JSON-serialisable)."""
    skip = {"hub_token", "local_rank", "overwrite_output_dir", "resume_from_checkpoint"}
    return {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in sorted(vars(args).items()) if k not in skip}
