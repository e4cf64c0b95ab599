"""A new user's first hour with train_dreambooth_dora.py (issue 29): the flags' errors and --help, the default
--resolution (the base model's own size), resuming with nothing to resume, a dataset that is nowhere, and what the end
of a run prints. On the tiny pipeline (64 px, 1 step); most checks stop before any model loads."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

from dora_diffusion.testing import make_toy_imagefolder, save_tiny_sdxl_pipeline
from dora_diffusion.training import CheckpointError, DatasetError, OutputDirError, main
from dora_diffusion.training.args import SDXL_BASE, SDXL_FP16_FIX_VAE, build_parser, parse_args
from dora_diffusion.training.models import native_resolution
from dora_diffusion.training.output.model_card import model_card
from hub_fixtures import fill_hub_cache


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("firsthour")
    save_tiny_sdxl_pipeline(root / "model")
    make_toy_imagefolder(root / "data", n=2)
    return root


def argv(work: Path, output: str, *extra: str) -> list[str]:
    """One step, no --resolution, no validation, no checkpoint."""
    return [
        "--pretrained_model_name_or_path", str(work / "model"), "--dataset", str(work / "data"),
        "--output_dir", str(work / output), "--max_train_steps", "1", "--gradient_accumulation_steps", "1",
        "--checkpointing_steps", "0", "--report_to", "none", "--validation_prompt", "none", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(work) -> tuple[Path, str]:
    """The one training run of this file: no --resolution, one validation image of one step."""
    return run(argv(work, "report-sdxl-dora", *VALIDATION))


VALIDATION = ("--validation_prompt", "a TOK toy", "--num_validation_images", "1", "--validation_inference_steps", "1")


def run(args: list[str]) -> tuple[Path, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        path = main(args)
    return path, out.getvalue()


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` (hidden ones too) with its bytes (None for a folder)."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


# ---------------------------------------------------------------- the flags
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--rnak", "8"], "unrecognized arguments: --rnak 8 (--rnak: did you mean --rank?)"),
        (["--max_train_step", "3"], "unrecognized arguments: --max_train_step 3 (--max_train_step: did you mean --max_train_steps or --max_timestep?)"),
        (["--learning_rat=1e-4"], "(--learning_rat: did you mean --learning_rate?)"),
        (["--rank", "0"], "argument --rank: must be an integer from 1 to 4096, got '0'"),
        (["--zzz"], "unrecognized arguments: --zzz\n"),
    ],
)
def test_a_flag_error_is_one_line_and_a_pointer_to_help(flags, message, capsys):
    """No abbreviation is expanded (--max_train_step is not --max_train_steps), the nearest flags are named, and the
    error is two lines, not the 80-line usage."""
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--dataset", "d", *flags])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err
    assert err.splitlines()[-1] == "See `python train_dreambooth_dora.py --help` for every flag and its default."
    assert len(err.splitlines()) == 2 and "usage:" not in err


def test_a_missing_dataset_is_reported_with_the_typos_beside_it(capsys):
    """``--rnak 8`` without ``--dataset``: both mistakes in one line (argparse stops at the missing flag, so the typo
    showed only after the user had fixed it)."""
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--rnak", "8", "--rank=4", "--learning_rat", "1e-4"])
    err = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and len(err) == 2
    assert err[0] == (
        "train_dreambooth_dora.py: error: the following arguments are required: --dataset/--dataset_name/"
        "--instance_data_dir; and unrecognized arguments: --rnak --learning_rat (--rnak: did you mean --rank?; "
        "--learning_rat: did you mean --learning_rate?)"
    )


def test_help_shows_every_default():
    text = " ".join(build_parser().format_help().split())
    for shown in ("--rank RANK Rank r of the low-rank update. (default: 8)",
                  "(prodigy: use 1.0). (default: 0.0001)", "Images per process per micro-batch. (default: 1)",
                  "(0: never). (default: 250)", "DoRA (magnitude + direction) or plain LoRA; full:",
                  "Default: the base model's own size", "Micro-batches per optimizer step. (default: 4)",
                  "dora,lora: both as a pair. (default: dora)"):  # fmt: skip
        assert shown in text, shown
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: {})" not in text


# ---------------------------------------------------------------- --resolution
def test_default_resolution_is_the_base_models_own_size(tmp_path, monkeypatch):
    """Read from the configs alone: the toy world's 64 px, SDXL's 1024 px (unet sample_size 128 x VAE scale 8, from a
    Hub cache holding only the two config.json files, so no weights could have been loaded)."""
    from dora_diffusion.toyworld import PIPELINE_DIR, RESOLUTION

    assert parse_args(["--dataset", "d"]).resolution == 1024  # SDXL base, known without a download (NATIVE_RESOLUTIONS)
    assert parse_args(["--dataset", "d", "--pretrained_model_name_or_path", "me/other"]).resolution is None
    toy = parse_args(["--dataset", "d", "--pretrained_model_name_or_path", str(PIPELINE_DIR)])
    assert native_resolution(toy) == RESOLUTION == 64
    unet, vae = tmp_path / "sdxl", tmp_path / "vae"
    (unet / "unet").mkdir(parents=True)
    (unet / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", "sample_size": 128}))
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512]}))
    fill_hub_cache(tmp_path / "hub", SDXL_BASE, unet)
    fill_hub_cache(tmp_path / "hub", SDXL_FP16_FIX_VAE, vae)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sdxl = parse_args(["--dataset", "d", "--cache_dir", str(tmp_path / "hub")])
    assert sdxl.pretrained_vae_model_name_or_path == SDXL_FP16_FIX_VAE
    assert native_resolution(sdxl) == 1024


def test_without_resolution_the_tiny_model_trains_at_64_px(trained):
    out, stdout = trained
    assert "--resolution 64: the base model's own size" in stdout and "images          64px" in stdout
    assert json.loads((out / "training_args.json").read_text())["resolution"] == 64
    with safe_open(out / "pytorch_lora_weights.safetensors", "pt") as f:
        assert json.loads(f.metadata()["dora_diffusion"])["training"]["resolution"] == 64


# ---------------------------------------------------------------- an earlier run in the folder
def test_refusal_names_the_resolution_and_warns_far_from_the_native_size(work, trained, caplog):
    """The folder of a run at 1024 px (the old default): a new run there without --resolution (64 px now) is
    refused naming 'resolution: 1024 -> 64'; --resolution 256 warns that it is far from the model's 64 px."""
    out = work / "reused"
    shutil.copytree(trained[0], out)
    settings = json.loads((out / "training_args.json").read_text())
    (out / "training_args.json").write_text(json.dumps({**settings, "resolution": 1024}))
    before = snapshot(out)
    with pytest.raises(OutputDirError) as err:
        main(argv(work, "reused", *VALIDATION))
    assert "already holds an earlier run (its settings differ: resolution: 1024 -> 64). It has no checkpoint" in str(err.value)
    with caplog.at_level(logging.WARNING, logger="dora_diffusion"), pytest.raises(OutputDirError, match="resolution: 1024 -> 256"):
        main(argv(work, "reused", *VALIDATION, "--resolution", "256"))
    assert "--resolution 256 is far from the base model's own size, 64 px: it costs about 16x the compute" in caplog.text
    assert snapshot(out) == before


def test_latest_with_nothing_to_resume_stops_and_writes_nothing(work, trained):
    """A run killed before its first checkpoint left its settings, manifest and log: --resume_from_checkpoint
    latest stops (was: a new run over them) and the folder stays byte for byte as it was."""
    done = trained[0]
    killed = work / "killed"
    killed.mkdir()
    for name in ("training_args.json", "run_files.json", "training_log.jsonl"):
        shutil.copy(done / name, killed / name)
    before = snapshot(killed)
    with pytest.raises(CheckpointError) as err:
        main(argv(work, "killed", "--resume_from_checkpoint", "latest"))
    assert str(err.value) == (
        f"--resume_from_checkpoint latest: {killed} holds an earlier run (trained at --resolution 64) (training_args.json, "
        "run_files.json, training_log.jsonl) but no checkpoint to continue from, so there is nothing to resume and "
        "nothing was started or written. Drop --resume_from_checkpoint to see what differs, pass --overwrite_output_dir "
        "(without --resume_from_checkpoint) to delete that run's files and start over, or choose another --output_dir"
    )
    assert snapshot(killed) == before


def test_latest_in_a_missing_or_empty_folder_stops_and_auto_starts(work):
    """`latest` asks to continue a run: with no checkpoint anywhere it stops and writes nothing, not even the folder
    (was: a new run). `auto` is the diffusers idiom (one command for the first start and every restart): in a
    folder with no run yet it starts one."""
    missing, empty = work / "never-made", work / "made-empty"
    empty.mkdir()
    for folder in (missing, empty):
        with pytest.raises(CheckpointError) as err:
            main(argv(work, folder.name, "--resume_from_checkpoint", "latest"))
        state = "does not exist" if folder is missing else "holds no checkpoint-N folder and no run"
        assert str(err.value).startswith(f"--resume_from_checkpoint latest: {folder} {state}, so there is nothing to "
                                         "resume; nothing was started or written. Drop --resume_from_checkpoint")
    assert not missing.exists() and list(empty.iterdir()) == []
    path, stdout = run(argv(work, "never-made", "--resume_from_checkpoint", "auto"))
    assert f"--resume_from_checkpoint auto: {missing} holds no run yet; starting a new one" in stdout
    assert (missing / "pytorch_lora_weights.safetensors").is_file() and path == missing


# ---------------------------------------------------------------- the dataset and the end of the run
@pytest.mark.parametrize("name, where", [("nobody/photos", "no folder nobody/photos (nor nobody)"), ("data/photos", "no folder 'photos' in data/")])
def test_a_dataset_that_is_nowhere_is_one_line(work, monkeypatch, name, where):
    """An 'owner/name' that is no local folder and no Hub dataset this machine can reach: one line naming both (was:
    a multi-line ConnectError chain); data/photos with data/ present says the folder it lacks."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(work / "empty-cache"))
    monkeypatch.chdir(work)
    with pytest.raises(DatasetError) as err:
        main(argv(work, "nowhere") + ["--dataset", name])
    text = str(err.value)
    assert text.startswith(f"--dataset {name}: there is {where}, and as a Hub dataset id it is not in the Hugging Face "
                           "cache and the Hub cannot be reached (HF_HUB_OFFLINE=1). Check the folder's path")  # fmt: skip
    assert "\n" not in text and not (work / "nowhere").exists()


def test_a_dead_network_is_not_waited_on(work, tmp_path, monkeypatch, recwarn):
    """No network and no HF_HUB_OFFLINE: the default base's configs are looked up in the Hub cache only (the Hub client
    retries a dead network for about 25 s a file: a typo in --dataset took 41 s to report), and huggingface_hub's
    deprecation warning about an argument diffusers passes it is not shown to the user."""
    import socket
    import time

    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)

    def dead(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    slept: list[float] = []
    monkeypatch.setattr(socket, "getaddrinfo", dead)
    monkeypatch.setattr(time, "sleep", slept.append)
    monkeypatch.chdir(work)
    with pytest.raises(DatasetError) as err:
        main(["--dataset", "nobody/photos", "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "hub")])
    assert str(err.value).startswith("--dataset nobody/photos: there is no folder nobody/photos (nor nobody), and as a Hub")
    assert slept == []  # no retry waited on
    assert [str(w.message) for w in recwarn if "local_dir_use_symlinks" in str(w.message)] == []
    assert not (tmp_path / "out").exists()


def test_end_of_run_report_and_card_snippet(work, trained):
    out, stdout = trained
    tail = stdout[stdout.index(f"saved {out / 'pytorch_lora_weights.safetensors'}"):].splitlines()
    assert tail[1].startswith("steps 1-1 took ") and " s (training and validation); final loss " in tail[1]
    assert float(tail[1].split("final loss ")[1].split()[0]) > 0
    assert tail[2] == f"validation images: {out / 'validation' / 'step-1'} (1 x 'a TOK toy')"
    assert tail[3] == f"model card: {out / 'README.md'}"
    assert tail[-1] == (f"  open both in the page: python app.py --base {work / 'model'} --adapter dora={out} "
                        f"--adapter lora={work / 'report-sdxl-lora'}")  # fmt: skip
    assert f"--adapter lora --output_dir {work / 'report-sdxl-lora'}" in tail[-2]
    card = (out / "README.md").read_text()
    assert 'torch_dtype=torch.float32).to(device)' in card and "float16" not in card and '.to("cuda")' not in card


@pytest.mark.parametrize("precision, line", [
    ("fp16", 'torch_dtype=torch.float16).to("cuda")'), ("bf16", 'torch_dtype=torch.bfloat16).to("cuda")'),
    ("no", 'device = "cuda" if torch.cuda.is_available() else "cpu"'),
])  # fmt: skip
def test_card_snippet_follows_the_runs_precision(precision, line):
    settings = {"pretrained_model_name_or_path": SDXL_BASE, "adapter": "dora", "mixed_precision": precision, "rank": 4}
    card = model_card(settings, "me/x", ["TOK"], [], "params")
    assert line in card and card.count("from_pretrained(") == 1


# ---------------------------------------------------------------- dora-diffusion inspect / convert
def test_inspect_shows_base_and_trigger_words_and_convert_keeps_them(work, trained, capsys):
    """`inspect` reads the base model and trigger words from the file's metadata (was: 'base model: unknown'), also
    after `convert --to Kohya` (the format's name in any case) and back."""
    from dora_diffusion.cli import main as cli

    out = trained[0]
    kohya, back = work / "k.safetensors", work / "d.safetensors"
    assert cli(["convert", str(out), str(kohya), "--to", "Kohya"]) == 0
    assert cli(["convert", str(kohya), str(back), "--to", "DIFFUSERS"]) == 0
    capsys.readouterr()
    for path in (out, kohya, back):
        assert cli(["inspect", str(path)]) == 0
        rows = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
        assert rows["trigger words"].strip() == "TOK"
        assert rows["base model"].strip().startswith(f"{work / 'model'} (from the file's metadata; by its shapes: ")
