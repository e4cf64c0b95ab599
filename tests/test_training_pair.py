"""``--adapter dora,lora``: a DoRA and a LoRA trained as a pair on the tiny SDXL pipeline (CPU, 64 px, 2 steps).

Each half must be the separate run ``--adapter dora`` / ``--adapter lora`` with the same seed and other flags, bit for
bit; a pair stopped in its second half and resumed must equal the uninterrupted pair without training the finished
half again; an existing run in ``<out>/dora`` is never trained over.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dora_diffusion.testing import make_toy_imagefolder, save_tiny_sdxl_pipeline
from dora_diffusion.training import CheckpointError, OutputDirError, TrainingInterrupted, main, parse_args
from dora_diffusion.training import pair as pair_module
from dora_diffusion.training.output.steplog import read_step_log
from dora_diffusion.training.step import step as training_step

WEIGHTS = "pytorch_lora_weights.safetensors"
PROMPT = "a photo of TOK toy"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pair")
    save_tiny_sdxl_pipeline(root / "model")
    make_toy_imagefolder(root / "data", n=3)
    return root


def argv(work: Path, output: str, adapter: str, *extra: str, validation: bool = True) -> list[str]:
    """Random flips and dropout (so the random state matters), 2 steps with a checkpoint after each, cached latents
    (the second half takes the first one's cache)."""
    shown = ["--validation_prompt", PROMPT, "--num_validation_images", "1", "--validation_inference_steps", "2"]
    return [
        "--pretrained_model_name_or_path", str(work / "model"), "--dataset", str(work / "data"),
        "--output_dir", str(work / output), "--adapter", adapter, "--resolution", "64", "--rank", "4",
        "--dropout", "0.1", "--random_flip", "--learning_rate", "1e-3", "--gradient_accumulation_steps", "1",
        "--max_train_steps", "2", "--checkpointing_steps", "1", "--report_to", "none", "--cache_latents",
        "--no_gradient_checkpointing",
        *(shown if validation else ["--validation_prompt", "none"]), *extra,
    ]  # fmt: skip


def run(args: list[str]) -> tuple[Path, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        path = main(args)
    return path, out.getvalue()


@pytest.fixture(scope="module")
def runs(work):
    """The pair, and the two separate runs it must equal."""
    pair = run(argv(work, "pair", "dora,lora", "--export_kohya"))
    single = {k: run(argv(work, f"single-{k}", k, "--export_kohya"))[0] for k in ("dora", "lora")}
    return pair, single


def assert_same_tensors(a: Path, b: Path) -> dict:
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys()
    for key in x:
        assert torch.equal(x[key], y[key]), key
    return x


@pytest.mark.exactness
def test_each_half_is_the_separate_run_bit_for_bit(runs, work):
    (out, stdout), single = runs
    assert out == work / "pair"
    for kind in ("dora", "lora"):
        half = out / kind
        tensors = assert_same_tensors(half / WEIGHTS, single[kind] / WEIGHTS)
        assert any("magnitude" in k for k in tensors) == (kind == "dora")  # the method is the difference
        assert_same_tensors(half / "checkpoint-1" / WEIGHTS, single[kind] / "checkpoint-1" / WEIGHTS)
        assert [r["loss"] for r in read_step_log(half)] == [r["loss"] for r in read_step_log(single[kind])]
        ours, theirs = (np.asarray(Image.open(d / "validation" / "step-2" / "00.png")) for d in (half, single[kind]))
        assert np.array_equal(ours, theirs)
        settings = [json.loads((d / "training_args.json").read_text()) for d in (half, single[kind])]
        assert {k for k in settings[0] if settings[0][k] != settings[1][k]} == {"output_dir"}
        assert (half / "README.md").is_file()
        # exports named after the pair and the half, not the half's folder (two pairs' dora_kohya would collide)
        assert_same_tensors(half / f"pair-{kind}_kohya.safetensors", single[kind] / f"single-{kind}_kohya.safetensors")
        assert not (half / f"{kind}_kohya.safetensors").exists()
        assert f"- `pair-{kind}_kohya.safetensors`: kohya" in (half / "README.md").read_text()
    losses = {k: [r["loss"] for r in read_step_log(out / k)] for k in ("dora", "lora")}
    assert losses["dora"] != losses["lora"]
    grid = Image.open(out / "pair_grid.png")
    assert "a photo of TOK toy" in grid.text["parameters"]
    assert f"grid: {out / 'pair_grid.png'} (base | DoRA | LoRA, seed 0, 'a photo of TOK toy')" in stdout
    model = work / "model"
    assert stdout.rstrip().endswith(
        f"open both in the page: python app.py --base {model} --adapter dora={out / 'dora'} --adapter lora={out / 'lora'}"
    )
    record = json.loads((out / "pair.json").read_text())
    assert sorted(record["finished"]) == ["dora", "lora"]


@pytest.mark.exactness
def test_a_pair_stopped_in_its_second_half_resumes_to_the_uninterrupted_pair(runs, work, monkeypatch):
    """SIGTERM in step 1 of the LoRA half: checkpoint-1 is saved, pair.json says the DoRA finished; the resumed pair
    trains only the LoRA's step 2 and equals the uninterrupted pair bit for bit."""
    (out, _), _ = runs
    real = training_step.denoising_loss
    calls = {"n": 0}

    def counted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3 and kill:  # DoRA's 2 steps, then the LoRA's first
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    def guard(signum, frame):
        raise AssertionError("SIGTERM reached the test's own handler: training installed none")

    monkeypatch.setattr(training_step, "denoising_loss", counted)
    previous = signal.signal(signal.SIGTERM, guard)
    kill = True
    try:
        with pytest.raises(TrainingInterrupted, match=r"stopped by SIGTERM after step 1 of 2; saved .*lora/checkpoint-1\."):
            run(argv(work, "stopped", "dora,lora", validation=False))
    finally:
        signal.signal(signal.SIGTERM, previous)
    stopped = work / "stopped"
    assert calls["n"] == 3 and json.loads((stopped / "pair.json").read_text())["finished"].keys() == {"dora"}
    assert not (stopped / "lora" / WEIGHTS).exists()
    dora_file = (stopped / "dora" / WEIGHTS).stat()
    kill, calls["n"] = False, 0
    _, stdout = run(argv(work, "stopped", "dora,lora", "--resume_from_checkpoint", "latest", validation=False))
    assert calls["n"] == 1  # the LoRA's step 2 only
    assert "dora: finished in an earlier run of this pair" in stdout and "at step 1" in stdout
    assert (stopped / "dora" / WEIGHTS).stat().st_mtime_ns == dora_file.st_mtime_ns
    for kind in ("dora", "lora"):
        assert_same_tensors(stopped / kind / WEIGHTS, out / kind / WEIGHTS)
    assert "grid: none (--validation_prompt none)" in stdout


def test_a_single_run_in_the_pairs_folder_is_never_trained_over(runs, work, monkeypatch):
    """``<out>/dora`` holding a separate run: the pair stops before any model loads and writes nothing; a single
    run's folder is no pair folder."""
    _, single = runs
    out = work / "taken"
    shutil.copytree(single["dora"], out / "dora")
    before = {p: p.read_bytes() for p in (out / "dora").rglob("*") if p.is_file()}

    def no_loading(*args, **kwargs):
        raise AssertionError("models loaded before the output folders were checked")

    monkeypatch.setattr(pair_module.TrainingRun, "_components", no_loading)
    named = re.escape(f"the dora half of --adapter dora,lora: --output_dir {out / 'dora'} already holds an earlier run")
    with pytest.raises(OutputDirError, match=named):
        run(argv(work, "taken", "dora,lora"))
    assert sorted(p.name for p in out.iterdir()) == ["dora"]
    assert {p: p.read_bytes() for p in (out / "dora").rglob("*") if p.is_file()} == before
    with pytest.raises(OutputDirError, match="holds a single run"):
        run(argv(work, "single-lora", "dora,lora"))
    with pytest.raises(CheckpointError, match="the dora half of --adapter dora,lora: --resume_from_checkpoint latest: .* does not exist, so there is nothing to resume"):
        run(argv(work, "nothing", "dora,lora", "--resume_from_checkpoint", "latest"))
    assert not (work / "nothing").exists()


@pytest.mark.parametrize("extra", [(), ("--overwrite_output_dir",), ("--resume_from_checkpoint", "latest")])
def test_a_pairs_folder_is_never_a_single_runs(runs, work, monkeypatch, extra):
    """``--adapter dora --output_dir <a pair's folder>``: refused before any model loads, with or without
    --overwrite_output_dir or --resume_from_checkpoint (it would write beside the halves, or delete the pair's grid);
    nothing in the pair's folder changes."""
    before = {p: p.read_bytes() for p in (work / "pair").rglob("*") if p.is_file()}

    def no_loading(*args, **kwargs):
        raise AssertionError("models loaded before the output folder was checked")

    monkeypatch.setattr(pair_module.TrainingRun, "_components", no_loading)
    with pytest.raises(OutputDirError) as err:
        run(argv(work, "pair", "dora", *extra))
    assert str(err.value) == (
        f"--output_dir {work / 'pair'} holds a DoRA/LoRA pair (--adapter dora,lora: dora/, lora/, pair.json); a single "
        "run would write its files beside the pair's halves. Choose another --output_dir, or continue the pair with "
        "--adapter dora,lora --resume_from_checkpoint latest"
    )
    assert {p: p.read_bytes() for p in (work / "pair").rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    "flags, adapter, output_dir, error",
    [
        (["--adapter", "dora,lora"], "dora,lora", "data-sdxl-dora-lora", None),
        (["--adapter", "LoRA, DoRA"], "lora,dora", "data-sdxl-dora-lora", None),
        (["--adapter", "lora"], "lora", "data-sdxl-lora", None),
        (["--adapter", "dora,dora"], None, None, "argument --adapter: 'dora,dora': choose dora, lora, or dora,lora"),
        (["--adapter", "dora,lora,dora"], None, None, "choose dora, lora, or dora,lora"),
        (["--adapter", "dora,lora", "--resume_from_checkpoint", "out/checkpoint-2"], None, None,
         "a pair resumes each half from its own latest checkpoint; pass --resume_from_checkpoint latest"),
    ],
)  # fmt: skip
def test_adapter_flag(flags, adapter, output_dir, error, capsys):
    argv = ["--dataset", "data", "--pretrained_model_name_or_path", "model", "--resolution", "64", *flags]
    if error is None:
        args = parse_args(argv)
        assert (args.adapter, args.output_dir) == (adapter, output_dir)
        return
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert error in capsys.readouterr().err


def test_the_grid_is_scored_by_the_toy_world_scorer_on_the_toy_world_and_by_clip_elsewhere(work):
    from dora_diffusion.compare.scores import ClipScorer, ToyWorldScorer
    from dora_diffusion.toyworld import PIPELINE_DIR

    def config(base, dataset):
        return pair_module.TrainConfig.from_args(parse_args(["--pretrained_model_name_or_path", str(base), "--dataset", str(dataset), "--resolution", "64"]))

    assert isinstance(pair_module.grid_scorer(config(PIPELINE_DIR, work / "data"), torch.device("cpu")), ToyWorldScorer)
    (work / "photos").mkdir()
    Image.new("RGB", (8, 8)).save(work / "photos" / "a.png")
    clip = pair_module.grid_scorer(config(work / "model", work / "photos"), torch.device("cpu"))
    assert isinstance(clip, ClipScorer) and clip.metrics("a photo") == ("CLIP-T", "CLIP-I")  # the photos are the instances
    clip = pair_module.grid_scorer(config(work / "model", "owner/hub-dataset"), torch.device("cpu"))
    assert clip.metrics("a photo") == ("CLIP-T",)


def test_each_half_is_the_single_run_of_its_folder_and_hub_repo():
    args = ["--dataset", "owner/dogs", "--pretrained_model_name_or_path", "model", "--resolution", "64", "--use_dora"]
    config = pair_module.TrainConfig.from_args(parse_args([*args, "--adapter", "lora,dora", "--push_to_hub"]))
    halves = {k: pair_module.half_config(config, k) for k in ("dora", "lora")}
    assert [(h.adapter, h.output_dir, h.hub_model_id, h.use_dora) for h in halves.values()] == [
        ("dora", str(Path("dogs-sdxl-dora-lora") / "dora"), "dogs-sdxl-dora", True),
        ("lora", str(Path("dogs-sdxl-dora-lora") / "lora"), "dogs-sdxl-lora", False),
    ]
    assert [pair_module.half_export_stem(Path(h.output_dir).parent, h.adapter) for h in halves.values()] == ["dogs-sdxl-dora", "dogs-sdxl-lora"]
    assert pair_module.half_export_stem(Path("runs") / "mine", "lora") == "mine-lora"
    assert pair_module.half_export_stem(Path("-dora-lora"), "dora") == "-dora-lora-dora"
    config = pair_module.TrainConfig.from_args(parse_args([*args, "--adapter", "dora,lora", "--push_to_hub", "--hub_model_id", "me/dogs"]))
    assert pair_module.half_config(config, "lora").hub_model_id == "me/dogs-lora"
    # latest continues the pair: once a half finished or holds a checkpoint, a half with no run yet starts
    for value, started, half in [("latest", True, "auto"), ("latest", False, "latest"), ("auto", False, "auto"), (None, True, None)]:
        flags = ["--resume_from_checkpoint", value] if value else []
        config = pair_module.TrainConfig.from_args(parse_args([*args, "--adapter", "dora,lora", *flags]))
        assert pair_module.half_config(config, "lora", started).resume_from_checkpoint == half


def test_a_pivotal_pairs_files_are_named_after_the_pair_and_the_half(work):
    """Pivotal tuning in a pair: each half's embeddings are ``<pair>-<kind>_emb.safetensors`` (``dora_emb`` from two
    pairs would overwrite each other in one embeddings folder), named so in its card, and loaded with its adapter."""
    from dora_diffusion.pipeline.embeddings import find_embeddings

    ti = ["--train_text_encoder_ti", "--text_encoder_lr", "1e-2", "--instance_prompt", PROMPT]
    out, _ = run(argv(work, "ti-dora-lora", "dora,lora", *ti, validation=False))
    for kind in ("dora", "lora"):
        emb = out / kind / f"ti-{kind}_emb.safetensors"
        assert find_embeddings(out / kind) == emb and load_file(emb)["clip_l"].shape == (2, 32)
        assert f"`ti-{kind}_emb.safetensors`" in (out / kind / "README.md").read_text()
        assert find_embeddings(out / kind / "checkpoint-1") == out / kind / "checkpoint-1" / emb.name
