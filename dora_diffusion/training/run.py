"""DreamBooth training of a DoRA (or LoRA) adapter on SDXL: ``TrainingRun``, from a config to a finished output folder.

A run is ``setup`` (read the data and check the output folder before any model loads, then models, adapters, the
data pipeline and the optimiser), ``train`` (the optimizer steps, with checkpoints, validation and signals) and
``finish`` (weights, exports, model card, Hub upload). Several processes: see ``distributed.py``. Randomness: before
micro-batch ``j`` every process reseeds torch from ``(seed, j, process)``; crops, flips and the data order are
functions of the seed too (``data/sampling.py``). A resumed run therefore draws the same noise, timesteps, dropout
masks and images as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from dora_diffusion.adapter_io import save_adapter
from dora_diffusion.core.inject import set_recompute
from dora_diffusion.extras import require
from dora_diffusion.formats import DEFAULT_WEIGHT_NAME
from dora_diffusion.pipeline.embeddings import embeddings_name, write_embeddings
from dora_diffusion.training.args import RUN_KEYS, check_sides, notices, parse_args, parse_targets, run_settings
from dora_diffusion.training.config import TrainConfig
from dora_diffusion.training.data.buckets import make_buckets, nearest_bucket
from dora_diffusion.training.data.captions import draw_batch_captions
from dora_diffusion.training.data.dataset import DreamBoothDataset, collate
from dora_diffusion.training.data.encode import LatentSource, PromptSource
from dora_diffusion.training.data.fingerprint import dataset_fingerprint, fingerprint_difference
from dora_diffusion.training.data.prior import generate_class_images, load_class_records, missing_class_indices
from dora_diffusion.training.data.records import default_validation_prompt, load_masks, load_records
from dora_diffusion.training.data.sampling import (
    ADAPTER_INIT,
    STEP_NOISE,
    BucketBatchSampler,
    MicroBatchSampler,
    derive_seed,
    micro_batches_per_epoch,
)
from dora_diffusion.training.distributed import (
    adapters_in_sync,
    average_gradients,
    broadcast_parameters,
    make_accelerator,
    refuse_sharding,
)
from dora_diffusion.training.errors import TrainingError, TrainingInterrupted
from dora_diffusion.training.fp8_base import store_in_float8
from dora_diffusion.training.full import FullFineTune, check_full_precision
from dora_diffusion.training.models import (
    ADAPTER_NAME,
    add_training_adapters,
    count_parameters,
    enable_checkpointing,
    load_components,
    named_trainable,
    native_resolution,
    vae_dtype,
    vae_scale_factor,
)
from dora_diffusion.training.output.checkpoint import (
    CheckpointError,
    TrainingState,
    check_ema_state,
    list_checkpoints,
    load_checkpoint,
    read_state,
    resolve_resume,
    save_checkpoint,
)
from dora_diffusion.training.output.hub import create_hub_repo, upload_run
from dora_diffusion.training.output.model_card import CARD_NAMES, model_card, write_model_card
from dora_diffusion.training.output.rundir import (
    LOCK_FILE,
    SETTINGS_FILE,
    adapter_settings,
    check_apart,
    check_nothing_to_resume,
    check_output_dir,
    check_resume,
    remove_leftovers,
    run_lock,
    with_resolved_paths,
    write_json_atomic,
)
from dora_diffusion.training.output.steplog import LOG_FILE, StepLog
from dora_diffusion.training.images import validation_pipeline
from dora_diffusion.training.output.validation import log_images, render, save_images, validation_folder
from dora_diffusion.training.plan import apply_token_plan, exports, inside_output, planned_outputs, resolve_schedule, resolve_triggers
from dora_diffusion.training.signals import stop_on_signals
from dora_diffusion.training.step.compiled import CompiledUNet
from dora_diffusion.training.step.ema import AdapterEMA
from dora_diffusion.training.step.optim import build_lr_scheduler, build_optimizer, param_groups
from dora_diffusion.training.step.pivotal import add_new_tokens, new_token_rows, ti_steps
from dora_diffusion.training.step.step import micro_batch_loss
from dora_diffusion.training.summary import final_report, summary

logger = logging.getLogger(__name__)

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main(argv: list[str] | None = None) -> Path:
    """Run ``train_dreambooth_dora.py`` with ``argv`` (default: ``sys.argv[1:]``); returns the output folder. One run:
    ``dora_diffusion.training.main`` (``pair.main``) also trains ``--adapter dora,lora``."""
    return train(parse_args(argv))


def train(args: argparse.Namespace | TrainConfig) -> Path:
    """Train with parsed flags (``parse_args``) or a ``TrainConfig``; returns the output folder.

    The caller's torch RNG state is restored afterwards.
    """
    require("train", "training", ("accelerate",))
    refuse_sharding()
    config = args if isinstance(args, TrainConfig) else TrainConfig.from_args(args)
    output_dir = Path(config.output_dir)
    accelerator, precision = make_accelerator(config, output_dir)
    config = config.resolved(mixed_precision=precision)
    device = accelerator.device
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(derive_seed(config.seed, ADAPTER_INIT))  # the same initial adapter on every process
        with contextlib.ExitStack() as held:  # the output folder's lock, once taken
            return TrainingRun(config, accelerator, held).run()


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


class TrainingRun:
    """One run of ``train_dreambooth_dora.py`` on one process: ``run()`` is ``setup()``, ``train()``, ``finish()``.

    ``config`` is final once ``setup`` has read the data (``TrainConfig.resolved`` filled in the schedule and the
    validation prompt); everything the steps share is an attribute set by one ``setup`` stage.
    """

    def __init__(self, config: TrainConfig, accelerator, held: contextlib.ExitStack) -> None:
        self.config = config
        self.accelerator = accelerator
        self.held = held
        self.output_dir = Path(config.output_dir)
        self.device = accelerator.device
        self.main_process = accelerator.is_main_process
        self.validated: dict[int, list[Path]] = {}
        self.next_steps = True
        """The final report ends with the next commands (a pair prints its own)."""

    @property
    def export_stem(self) -> str:
        """What ``--export_kohya`` / ``--export_comfyui`` files and pivotal tuning's ``_emb.safetensors`` are named
        after: the output folder's name."""
        return self.output_dir.resolve().name

    def run(self) -> Path:
        """Train and write the outputs; returns the output folder."""
        self.setup()
        self.train()
        return self.finish()

    # ---------------------------------------------------------------------------------------------- setup

    def setup(self) -> None:
        """Everything before the first step. Data and output folder fail fast, before any model is loaded; nothing
        is written to the output folder before ``_claim_output_dir``."""
        self.read()
        self.check()
        self.build()

    def read(self) -> None:
        """Read the data and settle the config (resolution, schedule, validation prompt): no model, no output folder."""
        _show_logs(self.main_process)
        refuse_sharding(self.accelerator)
        if self.config.adapter == "full":
            check_full_precision(self.config.mixed_precision)
        for line in notices(self.config):
            self.accelerator.print(f"note: {line}", flush=True)
        unreadable = self._resolve_resolution()
        self._read_data()
        if unreadable is not None:  # the data were checked first: their errors are the ones to fix first
            raise unreadable

    def check(self) -> None:
        """The checkpoint to resume, the output folder's rules and the Hub repo, before any model loads."""
        self._check_output_dir()
        self._create_hub_repo()

    def build(self) -> None:
        """Models, class images, adapters, data pipeline and optimiser; then the output folder is claimed."""
        self._load_models()
        self._class_images()
        self._add_adapters()
        self._data_pipeline()
        self._optimiser()
        self._claim_output_dir()

    def _resolve_resolution(self) -> TrainingError | None:
        """``--resolution``, by default the base model's own size (read from its configs, no weights); a warning when
        the size given is far from it. Returns the error to raise once the data are checked if the configs cannot be
        read and no size was given (the data are then read at SDXL's 1024)."""
        c = self.config
        try:
            native = native_resolution(c)
        except Exception as err:  # noqa: BLE001 - a missing or unreadable config: loading the model says why
            if c.resolution is None:
                self.config = c.resolved(resolution=1024)
                return TrainingError(
                    f"--pretrained_model_name_or_path {c.pretrained_model_name_or_path}: could not read its UNet and VAE "
                    f"configs to choose the training size ({type(err).__name__}: {err}). Check the path or Hub id, or "
                    "pass --resolution"
                )
            return None
        if c.resolution is None:
            self.config = c = c.resolved(resolution=native)
            try:
                check_sides(c)
            except ValueError as err:
                raise TrainingError(f"{err} (--resolution {native}: the base model's own size)") from None
            self.accelerator.print(f"--resolution {native}: the base model's own size (unet sample_size x VAE scale)", flush=True)
        elif max(c.resolution, native) >= 2 * min(c.resolution, native):
            logger.warning(
                "--resolution %d is far from the base model's own size, %d px: it %s",
                c.resolution, native,
                f"costs about {(c.resolution / native) ** 2:.0f}x the compute per step of {native} px, at a size the "
                "model never learned" if c.resolution > native else "trains at a size the model never learned, where it draws poorly",
            )  # fmt: skip

    def _read_data(self) -> None:
        """Images and captions, pivotal tuning's tokens, triggers, buckets; resolves the schedule and the prompt."""
        c, acc = self.config, self.accelerator
        written = {"--output_dir": c.output_dir, "--class_data_dir": c.class_data_dir if c.with_prior_preservation else None}
        check_apart(written, {"--dataset": c.dataset, "--mask_dir": c.mask_dir})
        with acc.main_process_first():
            self.loaded = load_records(
                c.dataset, c.image_column, c.caption_column, c.instance_prompt, c.dataset_config_name, c.cache_dir,
                c.dataset_revision, c.resolution,
            )  # fmt: skip
        records = self.loaded.records
        self.fingerprint = dataset_fingerprint(records)  # before pivotal tuning rewrites the captions
        self.new_tokens, prompt = apply_token_plan(c, records) if c.train_text_encoder_ti else (None, c.validation_prompt)
        captions = [r.caption for r in records]
        self.masks = load_masks(c.mask_dir, records) if c.mask_dir else None
        self.triggers = resolve_triggers(c, captions)
        if prompt is None:
            prompt = default_validation_prompt(self.triggers, captions)
        elif prompt.strip().lower() in ("none", ""):
            prompt = None
        self.buckets = make_buckets(c.resolution, c.bucket_step, c.min_bucket_side, c.max_bucket_side) if c.buckets else None
        bucket_of = [nearest_bucket(r.size, self.buckets) for r in records] * c.repeats if self.buckets else None
        group = c.train_batch_size * acc.num_processes
        per_epoch = micro_batches_per_epoch(bucket_of, group) if self.buckets else None
        schedule = resolve_schedule(c, len(records), acc.num_processes, per_epoch)
        self.per_epoch, self.max_steps = schedule.per_epoch, schedule.max_train_steps
        self.config = c.resolved(
            validation_prompt=prompt, max_train_steps=schedule.max_train_steps, validation_steps=schedule.validation_steps
        )
        self.settings = {**run_settings(self.config), "num_processes": acc.num_processes, "trigger_words": self.triggers}

    def _check_output_dir(self) -> None:
        """The checkpoint to resume from (checked against these settings and data) and the output folder's rules."""
        c = self.config
        self.resume_path = resolve_resume(self.output_dir, c.resume_from_checkpoint)
        if self.resume_path is None and c.resume_from_checkpoint is not None:
            check_nothing_to_resume(self.output_dir, c.resume_from_checkpoint)
        self.keys = RUN_KEYS
        if self.resume_path is not None:
            resume_state = read_state(self.resume_path)
            if resume_state.global_step > self.max_steps:
                raise CheckpointError(
                    f"--resume_from_checkpoint {self.resume_path}: it is at step {resume_state.global_step}, past "
                    f"--max_train_steps {self.max_steps}; pass a larger --max_train_steps, or use its "
                    "pytorch_lora_weights.safetensors as it is"
                )
            check_resume(self.resume_path, resume_state, self.settings, self.fingerprint, c.allow_dataset_change)
            if c.use_ema:
                check_ema_state(self.resume_path)  # before any model loads
            same_data = resume_state.dataset is not None and fingerprint_difference(resume_state.dataset, self.fingerprint) is None
            if c.allow_dataset_change or same_data:  # the same data may have moved to another folder
                self.keys = tuple(k for k in RUN_KEYS if k != "dataset")
        self.run_files = self._output_rules()
        if self.main_process:
            print(
                summary(c, self.loaded, self.triggers, self.accelerator.num_processes, self.resume_path, self.per_epoch),
                flush=True,
            )

    def _output_rules(self):
        c = self.config
        return check_output_dir(
            self.output_dir, self.settings, c.resume_from_checkpoint is not None, c.overwrite_output_dir,
            planned_outputs(c, self.output_dir, self.export_stem), self.keys,
        )  # fmt: skip

    def _create_hub_repo(self) -> None:
        """Before hours of training: a missing token or a taken name fails now."""
        c = self.config
        self.repo_id = None
        if not (c.push_to_hub and self.main_process):
            return
        try:
            self.repo_id = create_hub_repo(c.hub_model_id or self.output_dir.name, c.hub_token, public=c.hub_public)
        except TrainingError:
            raise
        except Exception as err:  # noqa: BLE001 - no token, a name taken by someone else, no network
            raise TrainingError(
                f"--push_to_hub: could not create the Hub repo {c.hub_model_id or self.output_dir.name!r} "
                f"({type(err).__name__}: {err}). Log in with `hf auth login` (or pass --hub_token), check "
                "--hub_model_id, or drop --push_to_hub; nothing was trained or written"
            ) from None

    def _load_models(self) -> None:
        """Every process loads its own copy (the Hub cache locks concurrent downloads of a file)."""
        c = self.config
        if c.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        weight_dtype = DTYPES[c.mixed_precision]
        self.components = comps = self._components(weight_dtype)
        self.offload = self.device.type != "cpu"
        self.text_offload = self.offload and not c.train_text_encoder and self.new_tokens is None and not c.shuffle_caption
        # nn.Module.to: diffusers' ModelMixin.to warns about "modules to keep in float32" even when there are none
        nn.Module.to(comps.unet, self.device, weight_dtype)
        for te in (comps.text_encoder, comps.text_encoder_2):
            te.to(self.device, dtype=weight_dtype)
        nn.Module.to(comps.vae, self.device, vae_dtype(comps.vae, weight_dtype))
        if c.fp8_base:  # before the adapters: their magnitudes start at the norms of the dequantized weights
            self.accelerator.print(store_in_float8(comps, c, weight_dtype), flush=True)

    def _components(self, weight_dtype: torch.dtype):
        """The frozen SDXL components, loaded in ``weight_dtype`` (a pair's second run gets the first one's)."""
        return load_components(self.config, weight_dtype)

    def _class_images(self) -> None:
        """Prior preservation: generate the class images that are missing (each process its share), then read them."""
        c, acc = self.config, self.accelerator
        self.class_records = None
        if not c.with_prior_preservation:
            return
        class_dir = Path(c.class_data_dir)
        todo = missing_class_indices(class_dir, c.num_class_images, acc.process_index, acc.num_processes)
        acc.wait_for_everyone()  # every process has counted the images before any writes more
        if todo:  # each process renders its share (a slow single renderer would pass the collective timeout)
            logger.info("generating %d class images of %r in %s", len(todo), c.class_prompt, class_dir)
            pipe = validation_pipeline(self.components, self.components.unet, self.device)
            generate_class_images(
                pipe, class_dir, c.class_prompt, todo, c.resolution, c.seed, c.sample_batch_size, c.prior_generation_steps
            )
            del pipe
        acc.wait_for_everyone()
        self.class_records = load_class_records(class_dir, c.class_prompt, c.num_class_images, c.resolution)

    def _add_adapters(self) -> None:
        """The adapters (and pivotal tuning's token rows): what trains."""
        c, comps = self.config, self.components
        self.full = FullFineTune(comps.unet, parse_targets(c.unet_targets)) if c.adapter == "full" else None
        self.models = {"unet": comps.unet} if self.full else add_training_adapters(comps, c)
        named = self.full.named if self.full else named_trainable(self.models)
        self.ti_named = add_new_tokens(comps, self.new_tokens, c.seed) if self.new_tokens else []
        self.ti_until = ti_steps(self.max_steps, c.train_text_encoder_ti_frac) if self.new_tokens else 0
        self.named = named + self.ti_named
        self.params = [p for _, p in self.named]
        self.counted = self.full.count() if self.full else count_parameters(self.models)
        self.ema = AdapterEMA(named, c.ema_decay) if c.use_ema else None  # of the adapter, not of new token rows
        self.accelerator.print(self.counted, flush=True)
        self.accelerator.print(f"training target: {comps.noise_scheduler.config.prediction_type} (the scheduler config's)", flush=True)
        if c.gradient_checkpointing:
            comps.unet.enable_gradient_checkpointing()
            if c.train_text_encoder:
                for te in (comps.text_encoder, comps.text_encoder_2):
                    enable_checkpointing(te)
            for model in self.models.values():  # activations live for one block only: keep outputs, skip recomputing W0 x
                set_recompute(model, "none")
        for model in self.models.values():
            model.train()
        self.step_components = self._compiled_step_components()

    def _compiled_step_components(self):
        """The components the training step calls: with ``--compile`` the UNet is its ``CompiledUNet`` (everything
        else, validation and saving included, keeps the eager ``self.components.unet``)."""
        c, comps = self.config, self.components
        if not c.compile:
            return comps
        sides = "sides dynamic across buckets" if c.buckets else "one static shape"
        self.accelerator.print(f"--compile: the UNet's training step runs through torch.compile (backend {c.dynamo_backend}, "
                               f"{sides}); the first step compiles it", flush=True)  # fmt: skip
        return dataclasses.replace(comps, unet=CompiledUNet(comps.unet, c.dynamo_backend, dynamic_sides=c.buckets))

    def _data_pipeline(self) -> None:
        """Samples, and the latent and prompt sources (caches when nothing upstream trains)."""
        c, comps = self.config, self.components
        self.dataset = DreamBoothDataset(
            self.loaded.records, c.resolution, c.center_crop, c.random_flip, c.repeats, c.seed,
            self.class_records, c.class_prompt, self.masks, self.buckets, vae_scale_factor(comps.vae),
        )  # fmt: skip
        self.latents = LatentSource(comps.vae, self.device, next(comps.vae.parameters()).dtype)
        encoded = c.train_text_encoder or self.new_tokens is not None or c.shuffle_caption  # shuffled: too many to cache
        self.prompts = PromptSource(comps, self.device, trained=encoded)
        self.ti_frozen = self.new_tokens is None
        if self.new_tokens is None and not c.train_text_encoder:
            self.freeze_prompts()
        if c.cache_latents:
            self.latents.fill_cache(self.dataset)
            if self.offload:
                comps.vae.to("cpu")

    def freeze_prompts(self) -> None:
        """The text encoders stop changing: encode every prompt once, as when they never train."""
        c = self.config
        for _, p in self.ti_named:
            p.requires_grad_(False)
        if c.train_text_encoder or c.shuffle_caption:
            return
        self.prompts.trained = False
        dropped = [""] if c.caption_dropout_rate else []
        self.prompts.fill_cache([r.caption for r in self.loaded.records] + dropped + ([c.class_prompt] if self.class_records else []))
        if self.offload:
            self.components.text_encoder.to("cpu"), self.components.text_encoder_2.to("cpu")

    def _optimiser(self) -> None:
        """Optimizer and LR schedule, restored from the checkpoint when resuming; every process starts equal."""
        c, acc = self.config, self.accelerator
        lr_scale = c.train_batch_size * c.gradient_accumulation_steps * acc.num_processes if c.scale_lr else 1
        optimizer = build_optimizer(param_groups(self.named, c, lr_scale), c)
        self.lr_scheduler = build_lr_scheduler(optimizer, c, self.max_steps)
        self.optimizer = acc.prepare(optimizer)
        self.start_step, self.start_micro = 0, 0
        if self.resume_path is not None:
            state = load_checkpoint(self.resume_path, self.named, self.optimizer, self.lr_scheduler, acc.scaler, self.ema)
            self.start_step, self.start_micro = state.global_step, state.micro_batch
            layout = (acc.num_processes, c.train_batch_size, c.gradient_accumulation_steps, c.seed)
            if layout != (state.num_processes, state.train_batch_size, state.gradient_accumulation_steps, state.seed):
                logger.warning("resuming with another processes/batch/accumulation/seed layout: data order will differ")
            acc.print(f"resumed from {self.resume_path} at step {self.start_step}", flush=True)
        elif c.resume_from_checkpoint is not None:
            acc.print(f"--resume_from_checkpoint {c.resume_from_checkpoint}: {self.output_dir} holds no run yet; starting a new one", flush=True)
        if acc.num_processes > 1:
            broadcast_parameters(self.params)

    def _claim_output_dir(self) -> None:
        """Take the folder's lock, check it again under the lock, and record what this run writes there."""
        c, acc = self.config, self.accelerator
        acc.wait_for_everyone()  # every process has checked the folder before the main one writes to it
        if self.main_process:
            new_lock = not os.path.lexists(self.output_dir / LOCK_FILE)
            self.held.enter_context(run_lock(self.output_dir))  # a second run started at the same time stops here
            self.run_files = self._output_rules()  # again, under the lock: another run may have written meanwhile
            if new_lock:
                self.run_files.adopt([LOCK_FILE])  # recorded with the next claim
            if c.overwrite_output_dir:
                self.run_files.clear()
            self.output_dir.mkdir(parents=True, exist_ok=True)
            remove_leftovers(self.output_dir)
            write_json_atomic(self.run_files.claim(SETTINGS_FILE), with_resolved_paths(self.settings))
            self.run_files.claim(LOG_FILE)
            if c.report_to != "none" and inside_output(c.logging_dir):
                self.run_files.claim_if_new(Path(c.logging_dir).as_posix())
        acc.wait_for_everyone()
        if c.report_to != "none" and self.main_process:
            acc.init_trackers("dora-dreambooth", config=_tracker_config(self.settings))

    # ---------------------------------------------------------------------------------------------- writing

    def write_weights(self, directory: Path, weight_name: str | None = None, format: str = "diffusers") -> Path:
        """The adapter (and pivotal tuning's embeddings) in ``directory``: the output folder or a checkpoint."""
        s, out = self.settings, self.output_dir
        meta = {"base_model": self.config.pretrained_model_name_or_path, "trigger_words": self.triggers, "training": {
            k: s[k] for k in ("adapter", "rank", "alpha", "resolution", "max_train_steps", "unet_targets",
                              "train_text_encoder", "text_encoder_targets", "seed", "fp8_base")}}  # fmt: skip
        if directory == out:
            self.run_files.claim(weight_name or DEFAULT_WEIGHT_NAME)
        if self.new_tokens and format == "diffusers":  # the new tokens' embeddings beside the adapter (also in checkpoints)
            emb = directory / embeddings_name(self.export_stem)
            if directory == out:
                self.run_files.claim(emb.name)
            abstraction = {w: "".join(ts) for w, ts in self.new_tokens.items()}
            tokens = [t for ts in self.new_tokens.values() for t in ts]
            write_embeddings(emb, new_token_rows(self.components), tokens, abstraction)
        if getattr(self, "full", None):  # the change of the fine-tuned weights, as an exact LoRA named FT
            return self.full.save(directory, weight_name, format, meta)
        return save_adapter(self.models, directory, ADAPTER_NAME, weight_name=weight_name, format=format, metadata=meta)

    def averaged(self) -> contextlib.AbstractContextManager:
        """With ``--use_ema``, the adapter holds its moving average within the block; otherwise nothing changes."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def write_averaged_weights(self, directory: Path) -> Path:
        """``write_weights`` of the adapter a user loads: its moving average with ``--use_ema``."""
        with self.averaged():
            return self.write_weights(directory)

    def validate(self, step: int) -> None:
        """Render the validation prompt with the adapter as it is at ``step`` (its average with ``--use_ema``; main
        process) and save the images."""
        c, comps = self.config, self.components
        if self.main_process:
            pipe = validation_pipeline(comps, comps.unet, self.device)
            movable = [comps.text_encoder, comps.text_encoder_2] if self.text_offload else []
            movable += [comps.vae] if c.cache_latents and self.offload else []
            with on_device(movable, self.device, bool(movable)), self.averaged():
                images = render(
                    pipe, c.validation_prompt, c.num_validation_images, c.seed, c.resolution,
                    c.validation_inference_steps, c.validation_guidance_scale,
                )  # fmt: skip
            self.run_files.claim(validation_folder(step))
            self.validated[step] = save_images(images, self.output_dir, step)
            log_images(self.accelerator.trackers, images, c.validation_prompt, step)
        self.accelerator.wait_for_everyone()

    def save_checkpoint(self, global_step: int, micro: int) -> None:
        """Write checkpoint-<global_step> (main process), then wait for every process."""
        c, acc = self.config, self.accelerator
        if self.main_process:
            state = TrainingState(
                global_step, micro, acc.num_processes, c.train_batch_size, c.gradient_accumulation_steps, c.seed,
                adapter_settings(self.settings), self.fingerprint,
            )  # fmt: skip
            self.run_files.claim(f"checkpoint-{global_step}")
            save_checkpoint(
                self.output_dir, state, self.named, self.optimizer, self.lr_scheduler, acc.scaler, self.write_averaged_weights,
                c.checkpoints_total_limit, lambda ckpt: self.run_files.owns(ckpt.name),
                self.ema.state_dict() if self.ema is not None else None,
            )  # fmt: skip
        acc.wait_for_everyone()

    # ---------------------------------------------------------------------------------------------- steps

    def stop_requested(self, request) -> bool:
        """True if a process got SIGTERM/SIGINT: every process stops at the same step, whichever got the signal."""
        stop = request.signum is not None
        if self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(torch.tensor(float(stop), device=self.device), reduction="sum")
            stop = bool(total > 0)
        return stop

    def train(self) -> None:
        """The optimizer steps from ``start_step`` to ``max_steps``; SIGTERM/SIGINT finish the step, save a
        checkpoint and stop with ``TrainingInterrupted``."""
        from tqdm.auto import tqdm

        c, acc = self.config, self.accelerator
        layout = (c.train_batch_size, acc.num_processes, acc.process_index, c.seed, self.start_micro)
        if self.buckets:
            sampler = BucketBatchSampler(self.dataset.bucket_of, *layout)
        else:
            sampler = MicroBatchSampler(len(self.dataset), *layout)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=sampler, collate_fn=collate, num_workers=c.dataloader_num_workers
        )
        self.batches = iter(loader)
        self.step_log = StepLog(self.output_dir, self.start_step) if self.main_process else None
        self.progress = tqdm(
            total=self.max_steps, initial=self.start_step, desc="steps", disable=not self.main_process, dynamic_ncols=True
        )
        self.micro = self.start_micro
        self.started, self.losses = time.monotonic(), []
        with stop_on_signals() as request:
            for step in range(self.start_step, self.max_steps):
                value = self.step(step)
                self._after_step(step + 1, value, request)
        self.progress.close()

    def step(self, step: int) -> float:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches; returns the mean loss (all
        processes). A loss that is not finite stops the run before the optimizer sees it."""
        c, acc = self.config, self.accelerator
        ga = c.gradient_accumulation_steps
        loss_sum = torch.zeros((), device=self.device)
        if not self.ti_frozen and step >= self.ti_until:
            self.freeze_prompts()
            self.ti_frozen = True
        for _ in range(ga):
            torch.manual_seed(derive_seed(c.seed, STEP_NOISE, self.micro, acc.process_index))
            batch = self.draw_captions(next(self.batches))
            loss = micro_batch_loss(batch, self.step_components, self.latents, self.prompts, c, acc.autocast)
            acc.backward(loss / ga)
            loss_sum += loss.detach()
            self.micro += 1
        average_gradients(self.params, acc)
        mean_loss = acc.reduce(loss_sum / ga, reduction="mean") if acc.num_processes > 1 else loss_sum / ga
        value = float(mean_loss)
        if not math.isfinite(value):
            self._stop_on_bad_loss(step + 1, value)
        if c.max_grad_norm > 0:
            acc.clip_grad_norm_(self.params, c.max_grad_norm)
        self.optimizer.step()
        if not self.optimizer.step_was_skipped:
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(step + 1)
        return value

    def draw_captions(self, batch: dict) -> dict:
        """The micro-batch with its instance captions dropped or shuffled (``--caption_dropout_rate``,
        ``--shuffle_caption``), drawn from the seed, the epoch and each sample's index."""
        c = self.config
        if c.caption_dropout_rate or c.shuffle_caption:
            batch["captions"] = draw_batch_captions(
                batch["captions"], batch["index"].tolist(), c.seed, self.micro // self.per_epoch,
                c.caption_dropout_rate, c.shuffle_caption, c.keep_tokens,
            )  # fmt: skip
        return batch

    def _stop_on_bad_loss(self, step: int, value: float) -> None:
        if self.step_log is not None:
            self.step_log.write(step, value, self.lr_scheduler.get_last_lr()[0])
        self.progress.close()
        self.accelerator.end_training()
        kept = list_checkpoints(self.output_dir)
        raise TrainingError(
            f"the loss became {value} at step {step}; training stopped and nothing was saved for this step. "
            + (f"The last checkpoint, {kept[-1]}, is intact: " if kept else "No checkpoint was written yet: ")
            + "lower --learning_rate, keep --max_grad_norm, try --mixed_precision bf16, then "
            + ("--resume_from_checkpoint latest." if kept else "start again.")
        )

    def _after_step(self, global_step: int, value: float, request) -> None:
        """Log the step, then checkpoint, validate or stop as the config and the signals say."""
        c = self.config
        lr = self.lr_scheduler.get_last_lr()[0]
        self.progress.update(1)
        self.progress.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
        self.losses.append(value)
        self.accelerator.log({"loss": value, "lr": lr}, step=global_step)
        if self.step_log is not None:
            self.step_log.write(global_step, value, lr)
        stop = self.stop_requested(request)
        saved = stop or bool(c.checkpointing_steps and global_step % c.checkpointing_steps == 0)
        if saved:
            self.save_checkpoint(global_step, self.micro)
        if not stop and c.validation_prompt and c.validation_steps and global_step % c.validation_steps == 0:
            self.validate(global_step)
            stop = self.stop_requested(request)  # a signal during validation stops here, not a step later
        if not stop:
            return
        if not saved:
            self.save_checkpoint(global_step, self.micro)
        self.progress.close()
        self.accelerator.end_training()
        name = signal.Signals(request.signum).name if request.signum else "a signal on another process"
        raise TrainingInterrupted(
            f"stopped by {name} after step {global_step} of {self.max_steps}; saved "
            f"{self.output_dir / f'checkpoint-{global_step}'}. Continue with the same command and --resume_from_checkpoint latest",
            request.signum or signal.SIGTERM,
        )

    # ---------------------------------------------------------------------------------------------- outputs

    def finish(self) -> Path:
        """The adapter and its exports, the last validation, the model card and the Hub upload."""
        acc, out = self.accelerator, self.output_dir
        if acc.num_processes > 1 and not adapters_in_sync(self.params, acc):
            raise TrainingError(f"the {acc.num_processes} processes ended with different adapters; nothing was saved")
        acc.wait_for_everyone()
        if self.main_process:
            with self.averaged():
                self._write_outputs()
        if self.config.validation_prompt and self.max_steps not in self.validated:
            self.validate(self.max_steps)
        if self.main_process:
            self._write_card()
            if self.config.push_to_hub:
                sent = upload_run(out, self.repo_id, self.run_files, self.config.hub_token)
                print(f"uploaded {len(sent)} files to https://huggingface.co/{self.repo_id}: {', '.join(sent)}", flush=True)
            report = final_report(
                self.config, out, time.monotonic() - self.started, (self.start_step, self.max_steps), self.losses,
                self.validated.get(self.max_steps, []), self.card, self.next_steps,
            )  # fmt: skip
            print(report, flush=True)
        acc.wait_for_everyone()
        acc.end_training()
        return out

    def _write_outputs(self) -> None:
        out = self.output_dir
        try:
            self.write_weights(out)
            for name, fmt in exports(self.config, self.export_stem).items():
                self.write_weights(out, name, fmt)
        except OSError as err:
            kept = list_checkpoints(out)
            raise TrainingError(
                f"could not write the trained adapter in {out} ({err}). "
                + (f"The last checkpoint, {kept[-1]}, is intact: free some space, then continue with "
                   "--resume_from_checkpoint latest" if kept else "No checkpoint was written")
            ) from err  # fmt: skip

    def _write_card(self) -> None:
        out = self.output_dir
        self.repo_id = self.repo_id or str(out)
        images = [str(p.relative_to(out).as_posix()) for p in self.validated.get(self.max_steps, [])]
        self.card = card = next((n for n in CARD_NAMES if not self.run_files.conflicts([n])), None)
        if card is None:
            logger.warning("%s: README.md and model_card.md are not this run's; no model card was written", out)
            return
        if card != CARD_NAMES[0]:
            logger.warning("%s/README.md was not written by a run, so it is kept; the model card is %s", out, card)
        stem = self.export_stem
        text = model_card(self.settings, self.repo_id, self.triggers, images, str(self.counted), list(exports(self.config, stem)),
                          embeddings_name(stem))  # fmt: skip
        write_model_card(self.run_files.claim(card), text)
