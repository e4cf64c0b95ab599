"""DreamBooth training of a DoRA (or LoRA) adapter on SDXL: from parsed flags to a finished output folder.

Several processes: see ``distributed.py``. Randomness: before micro-batch ``j`` every process reseeds torch from ``(seed, j, process)``; crops, flips
and the data order are functions of the seed too (``dataset.py``). A resumed run therefore draws the
same noise, timesteps, dropout masks and images as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from dora_diffusion.extras import require
from dora_diffusion.formats import DEFAULT_WEIGHT_NAME
from dora_diffusion.core.inject import set_recompute
from dora_diffusion.adapter_io import save_adapter
from dora_diffusion.training.args import RUN_KEYS, notices, parse_args, run_settings
from dora_diffusion.training.output.checkpoint import (
    CheckpointError,
    TrainingState,
    list_checkpoints,
    load_checkpoint,
    read_state,
    resolve_resume,
    save_checkpoint,
)
from dora_diffusion.training.data.records import DatasetError, default_validation_prompt, load_masks, load_records, trigger_words
from dora_diffusion.training.data.buckets import make_buckets, nearest_bucket
from dora_diffusion.training.data.dataset import DreamBoothDataset, collate
from dora_diffusion.training.data.sampling import (
    ADAPTER_INIT,
    STEP_NOISE,
    BucketBatchSampler,
    MicroBatchSampler,
    derive_seed,
    micro_batches_per_epoch,
)
from dora_diffusion.training.distributed import adapters_in_sync, average_gradients, broadcast_parameters, make_accelerator, refuse_sharding
from dora_diffusion.pipeline.embeddings import embeddings_name, write_embeddings
from dora_diffusion.training.data.encode import LatentSource, PromptSource
from dora_diffusion.training.errors import TrainingError, TrainingInterrupted
from dora_diffusion.training.signals import stop_on_signals
from dora_diffusion.training.output.hub import create_hub_repo, upload_run
from dora_diffusion.training.step.loss import denoising_loss, sample_noise, target_for
from dora_diffusion.training.output.model_card import CARD_NAMES, model_card, write_model_card
from dora_diffusion.training.models import (
    ADAPTER_NAME,
    Components,
    add_training_adapters,
    count_parameters,
    enable_checkpointing,
    load_components,
    named_trainable,
    vae_dtype,
)
from dora_diffusion.training.step.optim import build_lr_scheduler, build_optimizer, param_groups
from dora_diffusion.training.step.pivotal import add_new_tokens, mentions, new_token_rows, replace_abstractions, ti_steps, token_plan
from dora_diffusion.training.data.prior import generate_class_images, load_class_records, missing_class_indices
from dora_diffusion.training.data.fingerprint import dataset_fingerprint, fingerprint_difference
from dora_diffusion.training.output.rundir import (
    LOCK_FILE,
    SETTINGS_FILE,
    adapter_settings,
    check_apart,
    check_output_dir,
    check_resume,
    remove_leftovers,
    run_lock,
    with_resolved_paths,
    write_json_atomic,
)
from dora_diffusion.training.output.steplog import LOG_FILE, StepLog
from dora_diffusion.training.summary import summary
from dora_diffusion.training.output.validation import log_images, render, save_images, validation_folder, validation_pipeline

logger = logging.getLogger(__name__)

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main(argv: list[str] | None = None) -> Path:
    """Run ``train_dreambooth_dora.py`` with ``argv`` (default: ``sys.argv[1:]``); returns the output folder."""
    return train(parse_args(argv))


@contextlib.contextmanager
def on_device(modules: list[nn.Module], device: torch.device, offload: bool) -> Iterator[None]:
    """Move offloaded modules to ``device`` for the block and back to the CPU after it."""
    if offload:
        for m in modules:
            m.to(device)
    try:
        yield
    finally:
        if offload:
            for m in modules:
                m.to("cpu")


def resolve_triggers(args: argparse.Namespace, captions: list[str]) -> list[str]:
    """``--trigger``, else what the captions teach (``trigger_words``); warns where a prompt names a trigger the
    captions never hold (a diffusers command written for 3d_icon's old "TOK" captions, say)."""
    found = trigger_words(captions)
    triggers = [args.trigger] if args.trigger else found
    if args.trigger and not any(args.trigger in c for c in captions):
        logger.warning("--trigger %r appears in none of the %d captions; the adapter learns what the captions say", args.trigger, len(captions))
    for flag in ("instance_prompt", "validation_prompt"):
        prompt = getattr(args, flag)
        if not prompt or prompt.lower() == "none":
            continue
        unseen = [w for w in trigger_words([prompt]) if not any(w in c for c in captions)]
        if unseen and (flag == "validation_prompt" or all(c != prompt for c in captions)):
            logger.warning(
                "--%s %r names %s, which no caption holds: the model never saw it (the captions' trigger is %s)",
                flag, prompt, ", ".join(unseen), ", ".join(repr(t) for t in found) or "none",
            )  # fmt: skip
    return triggers


def apply_token_plan(args: argparse.Namespace, records: list) -> dict[str, list[str]]:
    """Pivotal tuning: replace each ``--token_abstraction`` word by its new tokens in the captions (and in
    ``--validation_prompt``); returns ``{word: its new tokens}``. A word no caption holds is an error (its tokens
    would never train)."""
    new_tokens = token_plan(args.token_abstraction, args.num_new_tokens_per_abstraction)
    captions = [r.caption for r in records]
    for word in new_tokens:
        if not any(mentions(c, word) for c in captions):
            found = trigger_words(captions)
            raise DatasetError(
                f"--train_text_encoder_ti: --token_abstraction {word!r} appears in none of the {len(captions)} captions, "
                "so its new tokens would never be trained"
                + (f". The captions' own trigger is {found[0]!r}: pass --token_abstraction {found[0].split()[-1]!r}" if found else "")
                + (" (linoyts/3d_icon's captions say 'a 3dicon' since 2024-08-14; --dataset_revision "
                   "6e1cf947876b1ec5b34daf6a99f11433d87791f5 has the old 'TOK' ones)" if "3d_icon" in str(args.dataset) else "")
            )  # fmt: skip
    for r in records:
        r.caption = replace_abstractions(r.caption, new_tokens)
    if args.validation_prompt:
        args.validation_prompt = replace_abstractions(args.validation_prompt, new_tokens)
    return new_tokens


def resolve_schedule(args: argparse.Namespace, num_images: int, num_processes: int, per_epoch: int | None = None) -> int:
    """Set ``args.max_train_steps`` (from ``--num_train_epochs`` if not given) and ``args.validation_steps`` (from
    diffusers' ``--validation_epochs`` if not given); returns the micro-batches per epoch.

    An epoch is ``num_images * repeats`` samples: ``ceil(samples / (batch * processes))`` micro-batches, and
    ``ceil(micro-batches / accumulation)`` optimizer steps. With buckets, pass their ``per_epoch``.
    """
    per_epoch = per_epoch or -(-num_images * args.repeats // (args.train_batch_size * num_processes))
    steps_per_epoch = math.ceil(per_epoch / args.gradient_accumulation_steps)
    args.max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    if args.validation_steps is None and args.validation_epochs is not None:
        args.validation_steps = args.validation_epochs * steps_per_epoch
    return per_epoch


def _show_logs(main_process: bool) -> None:
    """Show dora_diffusion's INFO messages on the main process (others: errors only), leaving other loggers be."""
    package = logging.getLogger("dora_diffusion")
    if not main_process:
        package.setLevel(logging.ERROR)
        return
    if package.level == logging.NOTSET:
        package.setLevel(logging.INFO)
    if not package.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        package.addHandler(handler)


def _tracker_config(settings: dict) -> dict:
    """Tracker hyper-parameters: scalars only (tensorboard refuses None and lists)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in settings.items()}


EXPORTS = {"export_kohya": "kohya", "export_comfyui": "comfyui"}
"""Flag -> format of the extra files a run writes beside ``pytorch_lora_weights.safetensors``."""


def export_name(output_dir: Path, format: str) -> str:
    """``<output folder name>_<format>.safetensors``: ``_kohya`` (``--export_kohya``), ``_comfyui`` (``--export_comfyui``)."""
    return f"{output_dir.resolve().name}_{format}.safetensors"


def exports(args: argparse.Namespace, output_dir: Path) -> dict[str, str]:
    """``{file name: format}`` of the exports this run writes."""
    return {export_name(output_dir, fmt): fmt for flag, fmt in EXPORTS.items() if getattr(args, flag, False)}


def vae_scale_factor(vae) -> int:
    """Pixels per latent pixel along a side: 8 for SDXL's VAE, 4 for the toy world's (diffusers' rule)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _inside(rel: str) -> bool:
    """True if ``rel`` is a plain relative path (no ``..``), so it stays inside the output folder."""
    return not Path(rel).is_absolute() and ".." not in Path(rel).parts and Path(rel).parts != ()


def _outputs(args: argparse.Namespace, output_dir: Path) -> list[str]:
    """Paths (relative to ``output_dir``) this run will write whose names are fixed in advance."""
    outputs = list(exports(args, output_dir))
    if args.validation_prompt and (output_dir / "validation").is_dir():  # the existing validation/step-N that it will write
        every = args.validation_steps or args.max_train_steps
        for child in sorted((output_dir / "validation").iterdir()):
            m = re.fullmatch(r"step-([1-9][0-9]{0,9})", child.name)
            if m and int(m[1]) <= args.max_train_steps and (int(m[1]) % every == 0 or int(m[1]) == args.max_train_steps):
                outputs.append(validation_folder(int(m[1])))
    return outputs


def micro_batch_loss(
    batch: dict,
    components: Components,
    latents: LatentSource,
    prompts: PromptSource,
    args: argparse.Namespace,
    autocast,
) -> torch.Tensor:
    """The loss of one micro-batch (instance samples, then class samples with prior preservation)."""
    unet, scheduler = components.unet, components.noise_scheduler
    device = latents.device
    z = latents.latents(batch)  # (N, 4, h, w)
    noise = sample_noise(z, args.noise_offset)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (z.shape[0],), device=device)
    noisy = scheduler.add_noise(z, noise, timesteps)
    with autocast():
        hidden, pooled = prompts.embeddings(batch["captions"])
        pred = unet(
            noisy,
            timesteps,
            encoder_hidden_states=hidden,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": batch["time_ids"].to(device)},
        ).sample
    target = target_for(scheduler, z, noise, timesteps)
    num_class = len(batch["class_index"]) if "class_index" in batch else 0
    mask = batch["mask"].to(device) if "mask" in batch else None
    return denoising_loss(
        pred, target, timesteps, scheduler, args.snr_gamma, num_class, args.prior_loss_weight,
        getattr(args, "debiased_estimation_loss", False), mask,
    )  # fmt: skip


def train(args: argparse.Namespace) -> Path:
    """Train with parsed flags (see ``args.py``); returns the output folder.

    The caller's torch RNG state is restored afterwards.
    """
    require("train", "training", ("accelerate",))
    refuse_sharding()
    output_dir = Path(args.output_dir)
    accelerator = make_accelerator(args, output_dir)
    device = accelerator.device
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(derive_seed(args.seed, ADAPTER_INIT))  # the same initial adapter on every process
        with contextlib.ExitStack() as held:  # the output folder's lock, once taken
            return _train(args, accelerator, output_dir, held)


def _train(args: argparse.Namespace, accelerator, output_dir: Path, held: contextlib.ExitStack) -> Path:
    main_process = accelerator.is_main_process
    _show_logs(main_process)
    refuse_sharding(accelerator)
    device = accelerator.device
    for line in notices(args):
        accelerator.print(f"note: {line}", flush=True)

    # ---- data and output folder: fail fast, before any model is loaded
    written = {"--output_dir": args.output_dir, "--class_data_dir": args.class_data_dir if args.with_prior_preservation else None}
    check_apart(written, {"--dataset": args.dataset, "--mask_dir": args.mask_dir})
    with accelerator.main_process_first():
        loaded = load_records(
            args.dataset, args.image_column, args.caption_column, args.instance_prompt, args.dataset_config_name,
            args.cache_dir, args.dataset_revision, args.resolution,
        )  # fmt: skip
    fingerprint = dataset_fingerprint(loaded.records)  # before pivotal tuning rewrites the captions
    new_tokens = apply_token_plan(args, loaded.records) if args.train_text_encoder_ti else None
    captions = [r.caption for r in loaded.records]
    masks = load_masks(args.mask_dir, loaded.records) if args.mask_dir else None
    triggers = resolve_triggers(args, captions)
    if args.validation_prompt is None:
        args.validation_prompt = default_validation_prompt(triggers, captions)
    elif args.validation_prompt.strip().lower() in ("none", ""):
        args.validation_prompt = None
    buckets = (
        make_buckets(args.resolution, args.bucket_step, args.min_bucket_side, args.max_bucket_side) if args.buckets else None
    )
    bucket_of = [nearest_bucket(r.size, buckets) for r in loaded.records] * args.repeats if buckets else None
    group = args.train_batch_size * accelerator.num_processes
    per_epoch = resolve_schedule(
        args, len(loaded.records), accelerator.num_processes, micro_batches_per_epoch(bucket_of, group) if buckets else None
    )
    max_steps = args.max_train_steps
    settings = {**run_settings(args), "num_processes": accelerator.num_processes, "trigger_words": triggers}
    resume_path = resolve_resume(output_dir, args.resume_from_checkpoint)
    keys = RUN_KEYS
    if resume_path is not None:
        resume_state = read_state(resume_path)
        if resume_state.global_step > max_steps:
            raise CheckpointError(
                f"--resume_from_checkpoint {resume_path}: it is at step {resume_state.global_step}, past --max_train_steps "
                f"{max_steps}; pass a larger --max_train_steps, or use its pytorch_lora_weights.safetensors as it is"
            )
        check_resume(resume_path, resume_state, settings, fingerprint, args.allow_dataset_change)
        same_data = resume_state.dataset is not None and fingerprint_difference(resume_state.dataset, fingerprint) is None
        if args.allow_dataset_change or same_data:  # the same data may have moved to another folder
            keys = tuple(k for k in RUN_KEYS if k != "dataset")
    run_files = check_output_dir(
        output_dir, settings, args.resume_from_checkpoint is not None, args.overwrite_output_dir, _outputs(args, output_dir), keys
    )
    if main_process:
        print(summary(args, loaded, triggers, accelerator.num_processes, resume_path, per_epoch), flush=True)
    repo_id = None
    if args.push_to_hub and main_process:  # before hours of training: a missing token or a taken name fails now
        try:
            repo_id = create_hub_repo(args.hub_model_id or output_dir.name, args.hub_token, public=args.hub_public)
        except TrainingError:
            raise
        except Exception as err:  # noqa: BLE001 - no token, a name taken by someone else, no network
            raise TrainingError(
                f"--push_to_hub: could not create the Hub repo {args.hub_model_id or output_dir.name!r} "
                f"({type(err).__name__}: {err}). Log in with `hf auth login` (or pass --hub_token), check "
                "--hub_model_id, or drop --push_to_hub; nothing was trained or written"
            ) from None

    # ---- models: every process loads its own copy (the Hub cache locks concurrent downloads of a file)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    weight_dtype = DTYPES[args.mixed_precision]
    components = load_components(args, weight_dtype)
    offload = device.type != "cpu"
    text_offload = offload and not args.train_text_encoder and new_tokens is None
    # nn.Module.to: diffusers' ModelMixin.to warns about "modules to keep in float32" even when there are none
    nn.Module.to(components.unet, device, weight_dtype)
    for te in (components.text_encoder, components.text_encoder_2):
        te.to(device, dtype=weight_dtype)
    nn.Module.to(components.vae, device, vae_dtype(components.vae, weight_dtype))
    autocast = accelerator.autocast

    class_records = None
    if args.with_prior_preservation:
        class_dir = Path(args.class_data_dir)
        todo = missing_class_indices(class_dir, args.num_class_images, accelerator.process_index, accelerator.num_processes)
        accelerator.wait_for_everyone()  # every process has counted the images before any writes more
        if todo:  # each process renders its share (a slow single renderer would pass the collective timeout)
            logger.info("generating %d class images of %r in %s", len(todo), args.class_prompt, class_dir)
            pipe = validation_pipeline(components, components.unet, device)
            generate_class_images(
                pipe, class_dir, args.class_prompt, todo, args.resolution, args.seed,
                args.sample_batch_size, args.prior_generation_steps,
            )  # fmt: skip
            del pipe
        accelerator.wait_for_everyone()
        class_records = load_class_records(class_dir, args.class_prompt, args.num_class_images, args.resolution)

    models = add_training_adapters(components, args)
    named = named_trainable(models)
    ti_named = add_new_tokens(components, new_tokens, args.seed) if new_tokens else []
    ti_until = ti_steps(args.max_train_steps, args.train_text_encoder_ti_frac) if new_tokens else 0
    named += ti_named
    params = [p for _, p in named]
    counted = count_parameters(models)
    accelerator.print(counted, flush=True)
    accelerator.print(f"training target: {components.noise_scheduler.config.prediction_type} (the scheduler config's)", flush=True)
    if args.gradient_checkpointing:
        components.unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            for te in (components.text_encoder, components.text_encoder_2):
                enable_checkpointing(te)
        for model in models.values():  # activations live for one block only: keep outputs, skip recomputing W0 x
            set_recompute(model, "none")
    for model in models.values():
        model.train()

    # ---- data pipeline
    dataset = DreamBoothDataset(
        loaded.records, args.resolution, args.center_crop, args.random_flip, args.repeats, args.seed,
        class_records, args.class_prompt, masks, buckets, vae_scale_factor(components.vae),
    )  # fmt: skip
    latents = LatentSource(components.vae, device, next(components.vae.parameters()).dtype)
    prompts = PromptSource(components, device, trained=args.train_text_encoder or new_tokens is not None)

    def freeze_prompts() -> None:
        """The text encoders stop changing: encode every prompt once, as when they never train."""
        for _, p in ti_named:
            p.requires_grad_(False)
        if args.train_text_encoder:
            return
        prompts.trained = False
        prompts.fill_cache([r.caption for r in loaded.records] + ([args.class_prompt] if class_records else []))
        if offload:
            components.text_encoder.to("cpu"), components.text_encoder_2.to("cpu")

    if new_tokens is None and not args.train_text_encoder:
        freeze_prompts()
    if args.cache_latents:
        latents.fill_cache(dataset)
        if offload:
            components.vae.to("cpu")

    # ---- optimisation
    lr_scale = args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes if args.scale_lr else 1
    optimizer = build_optimizer(param_groups(named, args, lr_scale), args)
    lr_scheduler = build_lr_scheduler(optimizer, args, max_steps)
    optimizer = accelerator.prepare(optimizer)
    start_step, start_micro = 0, 0
    if resume_path is not None:
        state = load_checkpoint(resume_path, named, optimizer, lr_scheduler, accelerator.scaler)
        start_step, start_micro = state.global_step, state.micro_batch
        layout = (accelerator.num_processes, args.train_batch_size, args.gradient_accumulation_steps, args.seed)
        if layout != (state.num_processes, state.train_batch_size, state.gradient_accumulation_steps, state.seed):
            logger.warning("resuming with another processes/batch/accumulation/seed layout: data order will differ")
        accelerator.print(f"resumed from {resume_path} at step {start_step}", flush=True)
    elif args.resume_from_checkpoint is not None:
        accelerator.print(f"no checkpoint in {output_dir} yet; starting a new run", flush=True)

    if accelerator.num_processes > 1:
        broadcast_parameters(params)

    # ---- the output folder: nothing was written to it before this point
    accelerator.wait_for_everyone()  # every process has checked the folder before the main one writes to it
    if main_process:
        new_lock = not os.path.lexists(output_dir / LOCK_FILE)
        held.enter_context(run_lock(output_dir))  # a second run started at the same time stops here
        run_files = check_output_dir(  # again, under the lock: another run may have written meanwhile
            output_dir, settings, args.resume_from_checkpoint is not None, args.overwrite_output_dir,
            _outputs(args, output_dir), keys,
        )  # fmt: skip
        if new_lock:
            run_files.adopt([LOCK_FILE])  # recorded with the next claim
        if args.overwrite_output_dir:
            run_files.clear()
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_leftovers(output_dir)
        write_json_atomic(run_files.claim(SETTINGS_FILE), with_resolved_paths(settings))
        run_files.claim(LOG_FILE)
        if args.report_to != "none" and _inside(args.logging_dir):
            run_files.claim_if_new(Path(args.logging_dir).as_posix())
    accelerator.wait_for_everyone()
    if args.report_to != "none" and main_process:
        accelerator.init_trackers("dora-dreambooth", config=_tracker_config(settings))

    def write_weights(directory: Path, weight_name: str | None = None, format: str = "diffusers") -> Path:
        meta = {"base_model": args.pretrained_model_name_or_path, "trigger_words": triggers, "training": {
            k: settings[k] for k in ("adapter", "rank", "alpha", "resolution", "max_train_steps", "unet_targets",
                                      "train_text_encoder", "text_encoder_targets", "seed")}}  # fmt: skip
        if directory == output_dir:
            run_files.claim(weight_name or DEFAULT_WEIGHT_NAME)
        if new_tokens and format == "diffusers":  # the new tokens' embeddings beside the adapter (also in checkpoints)
            emb = directory / embeddings_name(output_dir.resolve().name)
            if directory == output_dir:
                run_files.claim(emb.name)
            abstraction = {w: "".join(ts) for w, ts in new_tokens.items()}
            write_embeddings(emb, new_token_rows(components), [t for ts in new_tokens.values() for t in ts], abstraction)
        return save_adapter(models, directory, ADAPTER_NAME, weight_name=weight_name, format=format, metadata=meta)

    validated: dict[int, list[Path]] = {}

    def validate(step: int) -> None:
        if main_process:
            pipe = validation_pipeline(components, components.unet, device)
            movable = [components.text_encoder, components.text_encoder_2] if text_offload else []
            movable += [components.vae] if args.cache_latents and offload else []
            with on_device(movable, device, bool(movable)):
                images = render(
                    pipe, args.validation_prompt, args.num_validation_images, args.seed, args.resolution,
                    args.validation_inference_steps, args.validation_guidance_scale,
                )  # fmt: skip
            run_files.claim(validation_folder(step))
            validated[step] = save_images(images, output_dir, step)
            log_images(accelerator.trackers, images, args.validation_prompt, step)
        accelerator.wait_for_everyone()

    # ---- the loop
    from tqdm.auto import tqdm

    layout = (args.train_batch_size, accelerator.num_processes, accelerator.process_index, args.seed, start_micro)
    sampler = BucketBatchSampler(dataset.bucket_of, *layout) if buckets else MicroBatchSampler(len(dataset), *layout)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=args.dataloader_num_workers
    )
    batches = iter(loader)
    ga = args.gradient_accumulation_steps
    step_log = StepLog(output_dir, start_step) if main_process else None
    progress = tqdm(total=max_steps, initial=start_step, desc="steps", disable=not main_process, dynamic_ncols=True)
    micro = start_micro
    ti_frozen = new_tokens is None
    def stop_requested(request) -> bool:
        """True if a process got SIGTERM/SIGINT: every process stops at the same step, whichever got the signal."""
        stop = request.signum is not None
        if accelerator.num_processes > 1:
            stop = bool(accelerator.reduce(torch.tensor(float(stop), device=device), reduction="sum") > 0)
        return stop

    def save(global_step: int, micro: int) -> None:
        """Write checkpoint-<global_step> (main process), then wait for every process."""
        if main_process:
            state = TrainingState(
                global_step, micro, accelerator.num_processes, args.train_batch_size, ga, args.seed,
                adapter_settings(settings), fingerprint,
            )  # fmt: skip
            run_files.claim(f"checkpoint-{global_step}")
            save_checkpoint(
                output_dir, state, named, optimizer, lr_scheduler, accelerator.scaler, write_weights,
                args.checkpoints_total_limit, lambda c: run_files.owns(c.name),
            )  # fmt: skip
        accelerator.wait_for_everyone()

    with stop_on_signals() as stop_request:  # SIGTERM/SIGINT: finish the step, save a checkpoint, stop
        for step in range(start_step, max_steps):
            loss_sum = torch.zeros((), device=device)
            if not ti_frozen and step >= ti_until:
                freeze_prompts()
                ti_frozen = True
            for _ in range(ga):
                torch.manual_seed(derive_seed(args.seed, STEP_NOISE, micro, accelerator.process_index))
                batch = next(batches)
                loss = micro_batch_loss(batch, components, latents, prompts, args, autocast)
                accelerator.backward(loss / ga)
                loss_sum += loss.detach()
                micro += 1
            average_gradients(params, accelerator)
            mean_loss = accelerator.reduce(loss_sum / ga, reduction="mean") if accelerator.num_processes > 1 else loss_sum / ga
            value = float(mean_loss)
            if not math.isfinite(value):
                if step_log is not None:
                    step_log.write(step + 1, value, lr_scheduler.get_last_lr()[0])
                progress.close()
                accelerator.end_training()
                kept = list_checkpoints(output_dir)
                raise TrainingError(
                    f"the loss became {value} at step {step + 1}; training stopped and nothing was saved for this step. "
                    + (f"The last checkpoint, {kept[-1]}, is intact: " if kept else "No checkpoint was written yet: ")
                    + "lower --learning_rate, keep --max_grad_norm, try --mixed_precision bf16, then "
                    + ("--resume_from_checkpoint latest." if kept else "start again.")
                )
            if args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            if not optimizer.step_was_skipped:
                lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step = step + 1
            lr = lr_scheduler.get_last_lr()[0]
            progress.update(1)
            progress.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
            accelerator.log({"loss": value, "lr": lr}, step=global_step)
            if step_log is not None:
                step_log.write(global_step, value, lr)

            stop = stop_requested(stop_request)
            saved = stop or bool(args.checkpointing_steps and global_step % args.checkpointing_steps == 0)
            if saved:
                save(global_step, micro)
            if not stop and args.validation_prompt and args.validation_steps and global_step % args.validation_steps == 0:
                validate(global_step)
                stop = stop_requested(stop_request)  # a signal during validation stops here, not a step later
            if stop:
                if not saved:
                    save(global_step, micro)
                progress.close()
                accelerator.end_training()
                name = signal.Signals(stop_request.signum).name if stop_request.signum else "a signal on another process"
                raise TrainingInterrupted(
                    f"stopped by {name} after step {global_step} of {max_steps}; saved {output_dir / f'checkpoint-{global_step}'}. "
                    "Continue with the same command and --resume_from_checkpoint latest",
                    stop_request.signum or signal.SIGTERM,
                )
    progress.close()

    # ---- outputs
    if accelerator.num_processes > 1 and not adapters_in_sync(params, accelerator):
        raise TrainingError(f"the {accelerator.num_processes} processes ended with different adapters; nothing was saved")
    accelerator.wait_for_everyone()
    if main_process:
        try:
            write_weights(output_dir)
            for name, fmt in exports(args, output_dir).items():
                write_weights(output_dir, name, fmt)
        except OSError as err:
            kept = list_checkpoints(output_dir)
            raise TrainingError(
                f"could not write the trained adapter in {output_dir} ({err}). "
                + (f"The last checkpoint, {kept[-1]}, is intact: free some space, then continue with "
                   "--resume_from_checkpoint latest" if kept else "No checkpoint was written")
            ) from err  # fmt: skip
    if args.validation_prompt and max_steps not in validated:
        validate(max_steps)
    if main_process:
        repo_id = repo_id or str(output_dir)
        images = [str(p.relative_to(output_dir).as_posix()) for p in validated.get(max_steps, [])]
        card = next((n for n in CARD_NAMES if not run_files.conflicts([n])), None)
        if card is None:
            logger.warning("%s: README.md and model_card.md are not this run's; no model card was written", output_dir)
        else:
            if card != CARD_NAMES[0]:
                logger.warning("%s/README.md was not written by a run, so it is kept; the model card is %s", output_dir, card)
            write_model_card(run_files.claim(card), model_card(settings, repo_id, triggers, images, str(counted), list(exports(args, output_dir))))
        if args.push_to_hub:
            sent = upload_run(output_dir, repo_id, run_files, args.hub_token)
            print(f"uploaded {len(sent)} files to https://huggingface.co/{repo_id}: {', '.join(sent)}", flush=True)
        print(f"saved {output_dir / 'pytorch_lora_weights.safetensors'}", flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return output_dir
