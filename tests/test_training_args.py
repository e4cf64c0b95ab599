"""Flags of train_dreambooth_dora.py: the headline defaults, the VAE rule, and errors that name the flag."""

from __future__ import annotations

import pytest

from dora_diffusion.training import args as targs
from dora_diffusion.training import parse_args


def test_headline_defaults():
    a = parse_args(["--dataset", "linoyts/3d_icon"])
    assert a.pretrained_model_name_or_path == "stabilityai/stable-diffusion-xl-base-1.0"
    assert a.pretrained_vae_model_name_or_path == "madebyollin/sdxl-vae-fp16-fix"
    assert (a.resolution, a.adapter, a.rank, a.alpha, a.unet_targets) == (1024, "dora", 8, 8.0, "attn")
    assert (a.optimizer, a.learning_rate, a.train_batch_size, a.gradient_accumulation_steps) == ("adamw", 1e-4, 1, 4)
    assert (a.max_train_steps, a.gradient_checkpointing, a.seed) == (500, True, 0)
    assert a.output_dir == "3d_icon-sdxl-dora"
    assert a.caption_column is None  # detected from the dataset's columns
    assert a.mixed_precision is None  # resolved on the device (test below)
    assert a.report_to == ("tensorboard" if targs._installed("tensorboard") else "none")


@pytest.mark.parametrize("flag", ["--dataset", "--dataset_name", "--instance_data_dir"])
def test_dataset_aliases(flag):
    assert parse_args([flag, "./photos"]).dataset == "./photos"


def test_output_dir_and_alpha_follow_other_flags():
    a = parse_args(["--dataset", "/data/my dogs/", "--adapter", "lora", "--rank", "16"])
    assert a.output_dir == "my-dogs-sdxl-lora"
    assert a.alpha == 16.0
    assert parse_args(["--dataset", "x", "--num_train_epochs", "3"]).max_train_steps is None  # from epochs later


@pytest.mark.parametrize(
    ("base", "vae", "expected"),
    [
        ("stabilityai/stable-diffusion-xl-base-1.0", None, "madebyollin/sdxl-vae-fp16-fix"),
        ("/models/tiny-sdxl", None, None),  # a local base keeps its own vae
        ("someone/sdxl-finetune", None, None),
        ("stabilityai/stable-diffusion-xl-base-1.0", "none", None),
        ("stabilityai/stable-diffusion-xl-base-1.0", "None", None),
        ("/models/tiny-sdxl", "my/vae", "my/vae"),
    ],
)
def test_vae_rule(base, vae, expected):
    assert targs.resolve_vae(base, vae) == expected


def test_mixed_precision_default(monkeypatch, tmp_path):
    import accelerate.commands.config.config_args as config_args

    config = tmp_path / "default_config.yaml"
    monkeypatch.setattr(config_args, "default_config_file", str(config))
    none = {}
    assert targs.resolve_mixed_precision(None, "cpu", none) == "no"
    assert targs.resolve_mixed_precision("fp16", "cpu", none) == "fp16"
    # bf16 only where the GPU has it in hardware: compute capability 8 (Ampere) or more, not V100/T4/Turing
    monkeypatch.setattr("torch.cuda.is_bf16_supported", lambda including_emulation=True: True)
    for capability, expected in (((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp16"), ((7, 0), "fp16")):
        monkeypatch.setattr("torch.cuda.get_device_capability", lambda device=None, c=capability: c)
        assert targs.resolve_mixed_precision(None, "cuda", none) == expected
    # accelerate launch's choice (its flag or its config) wins over the machine default, the script flag over both
    assert targs.resolve_mixed_precision(None, "cuda", {"ACCELERATE_MIXED_PRECISION": "bf16"}) == "bf16"
    assert targs.resolve_mixed_precision("no", "cuda", {"ACCELERATE_MIXED_PRECISION": "bf16"}) == "no"
    # 'no' from accelerate launch is also its default when nothing chose: only a config file saying no counts
    assert targs.resolve_mixed_precision(None, "cuda", {"ACCELERATE_MIXED_PRECISION": "no"}) == "fp16"
    config.write_text("compute_environment: LOCAL_MACHINE\nmixed_precision: 'no'\n")
    assert targs.resolve_mixed_precision(None, "cuda", {"ACCELERATE_MIXED_PRECISION": "no"}) == "no"
    config.write_text("mixed_precision: bf16\n")
    assert targs.resolve_mixed_precision(None, "cuda", none) == "bf16"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--resolution", "1001"], "--resolution 1001 is not a positive multiple of 8"),
        (["--resolution", "0"], "argument --resolution: must be an integer from 8 to 16384, got '0'"),
        (["--rank", "0"], "argument --rank: must be an integer from 1 to 4096, got '0'"),
        (["--dropout", "1.0"], "--dropout must be in [0, 1)"),
        (["--with_prior_preservation"], "--with_prior_preservation needs --class_prompt and --class_data_dir"),
        (["--overwrite_output_dir", "--resume_from_checkpoint", "latest"], "contradict each other"),
        (["--alpha", "nan"], "--alpha must be a finite number, got nan"),
        (["--learning_rate", "inf"], "--learning_rate must be a finite number, got inf"),
        (["--max_grad_norm", "nan"], "--max_grad_norm must be a finite number"),
        (["--learning_rate", "0"], "--learning_rate must be positive"),
        (["--unet_targets", "re:("], "--unet_targets re:( is not a valid regular expression"),
        (["--text_encoder_targets", "re:[a"], "--text_encoder_targets re:[a is not a valid regular expression"),
        (["--unet_targets", " , "], "--unet_targets is an empty target list"),
    ],
)
def test_bad_flags_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--dataset", "x", *argv])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seed", "9" * 5000], "argument --seed: must be an integer from 0 to 4294967295, got '999999999999'... (5000 characters)"),
        (["--seed", "4294967296"], "argument --seed: must be an integer from 0 to 4294967295, got '4294967296'"),
        (["--seed", "-1"], "argument --seed: must be an integer from 0 to 4294967295, got '-1'"),
        (["--max_train_steps", "-3"], "argument --max_train_steps: must be an integer from 1 to 100000000, got '-3'"),
        (["--max_train_steps", "1" + "0" * 30], "argument --max_train_steps: must be an integer from 1 to 100000000, got '1" + "0" * 30 + "'"),
        (["--checkpointing_steps", "-1"], "argument --checkpointing_steps: must be an integer from 0 to 100000000, got '-1'"),
        (["--lr_warmup_steps", "-5"], "argument --lr_warmup_steps: must be an integer from 0 to 100000000, got '-5'"),
        (["--rank", "100000000000"], "argument --rank: must be an integer from 1 to 4096, got '100000000000'"),
        (["--rank_pattern", '{"to_k": 100000}'], "argument --rank_pattern: 'to_k': rank 100000 is not a whole number from 1 to 4096"),
        (["--train_batch_size", "1e3"], "argument --train_batch_size: must be an integer from 1 to 4096, got '1e3'"),
        (["--num_validation_images", "10000000"], "argument --num_validation_images: must be an integer from 1 to 1024"),
        (["--adam_beta1", "1.5"], "--adam_beta1 must be in [0.0, 1.0), got 1.5"),
        (["--max_grad_norm", "-1"], "--max_grad_norm must be in [0.0, inf), got -1.0"),
        (["--snr_gamma", "0"], "--snr_gamma must be positive (5.0 is usual), got 0.0"),
        (["--learning_rate", "nan"], "--learning_rate must be a finite number, got nan"),
    ],
)
def test_absurd_numbers_are_refused_naming_the_flag_and_range(argv, message, capsys):
    """Each value fails at parse time (before anything loads), with one short line naming the flag and the range;
    a 5000-digit seed is not echoed back (and does not reach torch's generator after training)."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--dataset", "x", *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and len(err.splitlines()[-1]) < 200


def test_dataset_is_required(capsys):
    with pytest.raises(SystemExit):
        parse_args([])
    assert "--dataset" in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "package"), [(["--optimizer", "prodigy"], "prodigyopt"), (["--optimizer", "adamw8bit"], "bitsandbytes"), (["--report_to", "wandb"], "wandb")])
def test_missing_optional_package_is_a_clear_error(flags, package, monkeypatch, capsys):
    monkeypatch.setattr(targs, "_installed", lambda module: False)
    with pytest.raises(SystemExit):
        parse_args(["--dataset", "x", *flags])
    assert f"needs the optional package {package}: pip install {package}" in capsys.readouterr().err


def test_report_to_defaults_to_none_without_tensorboard(monkeypatch):
    monkeypatch.setattr(targs, "_installed", lambda module: False)
    assert parse_args(["--dataset", "x"]).report_to == "none"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("attn", "attn"), ("attn_ff", "attn_ff"), ("to_q,to_v", ["to_q", "to_v"]), ("to_q", ["to_q"]), ("re:.*attn2.*to_k", ".*attn2.*to_k")],
)
def test_targets(value, expected):
    assert targs.parse_targets(value) == expected


def test_on_off_flags():
    assert parse_args(["--dataset", "x", "--no_gradient_checkpointing"]).gradient_checkpointing is False
    assert parse_args(["--dataset", "x", "--gradient_checkpointing"]).gradient_checkpointing is True
    assert parse_args(["--dataset", "x", "--no_prodigy_decouple"]).prodigy_decouple is False



def test_diffusers_flag_names():
    """Flags of diffusers' SDXL DreamBooth scripts, pasted as they are."""
    args = targs.parse_args(
        ["--dataset_name", "d", "--lora_dropout", "0.1", "--output_kohya_format", "--use_dora", "--rank", "8",
         "--enable_xformers_memory_efficient_attention", "--validation_epochs", "3", "--caption_column", "prompt",
         "--gradient_checkpointing", "--num_validation_images", "2", "--train_text_encoder", "--instance_prompt", "a TOK"]
    )  # fmt: skip
    assert (args.dataset, args.dropout, args.export_kohya, args.adapter, args.rank) == ("d", 0.1, True, "dora", 8)
    assert (args.validation_epochs, args.caption_column, args.gradient_checkpointing) == (3, "prompt", True)
    assert (args.num_validation_images, args.train_text_encoder, args.instance_prompt) == (2, True, "a TOK")
    assert targs.notices(args) == ["--enable_xformers_memory_efficient_attention: not needed, attention uses PyTorch's SDPA"]
    ti = targs.parse_args(["--dataset", "d", "--train_text_encoder_ti", "--train_text_encoder_ti_frac", "0.25"])
    assert (ti.train_text_encoder_ti, ti.train_text_encoder_ti_frac, ti.token_abstraction) == (True, 0.25, "TOK")
    assert ti.num_new_tokens_per_abstraction == 2 and targs.notices(ti) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--use_dora", "--adapter", "lora"], "--use_dora and --adapter lora contradict each other"),
        (["--use_8bit_adam", "--optimizer", "prodigy"], "--use_8bit_adam and --optimizer prodigy contradict"),
        (["--validation_epochs", "0"], "argument --validation_epochs: must be an integer from 1 to 100000000, got '0'"),
    ],
)
def test_diffusers_flag_conflicts(argv, message, capsys):
    with pytest.raises(SystemExit):
        targs.parse_args(["--dataset", "d", *argv])
    assert message in capsys.readouterr().err


def test_use_8bit_adam(monkeypatch, capsys):
    monkeypatch.setattr(targs, "_installed", lambda module: module != "bitsandbytes")
    with pytest.raises(SystemExit):
        targs.parse_args(["--dataset", "d", "--use_8bit_adam"])
    assert "--use_8bit_adam needs the optional package bitsandbytes: pip install bitsandbytes" in capsys.readouterr().err
    monkeypatch.setattr(targs, "_installed", lambda module: True)
    assert targs.parse_args(["--dataset", "d", "--use_8bit_adam"]).optimizer == "adamw8bit"


def test_epochs_to_steps():
    """23 images, batch 3, accumulation 2: 8 micro-batches = 4 steps per epoch."""
    from dora_diffusion.training.plan import resolve_schedule

    args = targs.parse_args(["--dataset", "d", "--train_batch_size", "3", "--gradient_accumulation_steps", "2",
                             "--num_train_epochs", "5", "--validation_epochs", "2"])  # fmt: skip
    schedule = resolve_schedule(args, 23, 1)  # the schedule is returned; the parsed flags stay as they were
    assert schedule.per_epoch == 8
    assert (schedule.max_train_steps, schedule.validation_steps) == (20, 8)
    args = targs.parse_args(["--dataset", "d", "--validation_epochs", "2", "--validation_steps", "7"])
    schedule = resolve_schedule(args, 23, 2)
    assert (schedule.max_train_steps, schedule.validation_steps) == (500, 7)  # --validation_steps wins


def test_hub_repo_is_private_unless_hub_public(capsys):
    """Issue 27: private by default; --hub_public opens it; transformers' --hub_private_repo is accepted (diffusers'
    SDXL scripts have no such flag); both together is an error."""
    assert targs.parse_args(["--dataset", "d"]).hub_public is False
    assert targs.parse_args(["--dataset", "d", "--hub_public"]).hub_public is True
    assert targs.parse_args(["--dataset", "d", "--hub_private_repo"]).hub_public is False
    with pytest.raises(SystemExit):
        targs.parse_args(["--dataset", "d", "--hub_public", "--hub_private_repo"])
    assert "--hub_public and --hub_private_repo contradict each other" in capsys.readouterr().err
