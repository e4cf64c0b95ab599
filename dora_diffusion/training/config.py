"""``TrainConfig``: every flag of ``train_dreambooth_dora.py``, typed and frozen, read once from the parsed arguments.

What each flag means is in its ``--help`` (``args.py``); a field here is the value after ``parse_args`` resolved its
default. A run never changes its config: the values that need the data or the machine (the schedule from
``--num_train_epochs``, the default validation prompt, the mixed precision a device supports) are filled in once,
by ``resolved``, which returns a new config.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class TrainConfig:
    """The run's settings (field names are the flags', without ``--``)."""

    # model
    pretrained_model_name_or_path: str
    pretrained_vae_model_name_or_path: str | None
    revision: str | None
    variant: str | None
    cache_dir: str | None
    # data
    dataset: str
    dataset_config_name: str | None
    dataset_revision: str | None
    image_column: str
    caption_column: str | None
    instance_prompt: str | None
    trigger: str | None
    repeats: int
    resolution: int | None  # None until read from the base model's config (TrainingRun.setup)
    center_crop: bool
    random_flip: bool
    buckets: bool
    bucket_step: int
    min_bucket_side: int | None
    max_bucket_side: int | None
    dataloader_num_workers: int
    # prior preservation
    with_prior_preservation: bool
    class_prompt: str | None
    class_data_dir: str | None
    num_class_images: int
    prior_loss_weight: float
    sample_batch_size: int
    prior_generation_steps: int
    # adapter
    adapter: str
    rank: int
    alpha: float
    alpha_is_rank: bool  # --alpha was not given (alpha = rank)
    dropout: float
    rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    unet_targets: str | list[str]
    train_text_encoder: bool
    text_encoder_targets: str | list[str]
    text_encoder_lr: float
    # optimisation
    optimizer: str
    learning_rate: float
    magnitude_lr: float | None
    scale_lr: bool
    adam_beta1: float
    adam_beta2: float
    adam_epsilon: float
    adam_weight_decay: float
    prodigy_beta3: float | None
    prodigy_decouple: bool
    prodigy_use_bias_correction: bool
    prodigy_safeguard_warmup: bool
    lr_scheduler: str
    lr_warmup_steps: int
    lr_num_cycles: int
    lr_power: float
    max_grad_norm: float
    train_batch_size: int
    gradient_accumulation_steps: int
    max_train_steps: int | None  # None until resolved from --num_train_epochs
    num_train_epochs: int | None
    snr_gamma: float | None
    debiased_estimation_loss: bool
    mask_dir: str | None
    noise_offset: float
    cache_latents: bool
    mixed_precision: str | None  # None until resolved on the device
    gradient_checkpointing: bool
    allow_tf32: bool
    seed: int
    # validation and logging
    validation_prompt: str | None  # None: no validation (once resolved)
    num_validation_images: int
    validation_steps: int | None
    validation_epochs: int | None
    validation_inference_steps: int
    validation_guidance_scale: float
    report_to: str
    logging_dir: str
    # checkpoints and output
    output_dir: str
    overwrite_output_dir: bool
    checkpointing_steps: int
    checkpoints_total_limit: int | None
    resume_from_checkpoint: str | None
    allow_dataset_change: bool
    export_kohya: bool
    export_comfyui: bool
    push_to_hub: bool
    hub_model_id: str | None
    hub_token: str | None
    hub_public: bool
    hub_private_repo: bool
    local_rank: int
    # diffusers' flags, accepted as they are
    use_dora: bool
    use_8bit_adam: bool
    enable_xformers_memory_efficient_attention: bool
    # pivotal tuning
    train_text_encoder_ti: bool
    train_text_encoder_ti_frac: float
    token_abstraction: str
    num_new_tokens_per_abstraction: int
    # options of other trainers (kohya, diffusers, SimpleTuner): args.py _other_trainers_flags
    use_ema: bool
    ema_decay: float
    loraplus_lr_ratio: float | None
    caption_dropout_rate: float
    shuffle_caption: bool
    keep_tokens: int
    min_timestep: int | None
    max_timestep: int | None
    loss_type: str
    huber_c: float
    huber_schedule: str
    # torch.compile (args.py _compile_flags)
    compile: bool
    dynamo_backend: str | None
    # float8 base (training/fp8_base.py)
    fp8_base: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainConfig:
        """The config of parsed flags (``parse_args``); a flag the config lacks is an error, not dropped."""
        names = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(vars(args)) - names)
        if extra:
            raise TypeError(f"TrainConfig has no field for {', '.join(extra)}; add it to training/config.py")
        return cls(**{name: getattr(args, name) for name in names})

    def resolved(self, **values) -> TrainConfig:
        """The same config with ``values`` filled in (``max_train_steps``, ``validation_prompt``, ...)."""
        return dataclasses.replace(self, **values)
