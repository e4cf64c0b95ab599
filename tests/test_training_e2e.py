"""train_dreambooth_dora end to end on the tiny SDXL pipeline (CPU, 64 px, 2-4 steps).

The tiny pipeline is saved to a temporary folder and trained on a 3-image toy imagefolder through the real
code paths (``from_pretrained`` on a local folder, ``datasets.load_dataset`` on a local imagefolder).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import dora_diffusion  # noqa: F401
from diffusers import DDPMScheduler

from dora_diffusion.core.inject import adapted_layers
from dora_diffusion.core.layers import AdaptedLayer
from dora_diffusion.testing import build_tiny_sdxl_pipeline, make_toy_imagefolder, save_tiny_sdxl_pipeline
from dora_diffusion.training import CheckpointError, DatasetError, OutputDirError, TrainingError, list_checkpoints, main
from dora_diffusion.training import run as training_loop
from dora_diffusion.training.step import step as training_step
from dora_diffusion.training.models import ADAPTER_NAME, Components, add_training_adapters, named_trainable
from dora_diffusion.training.step.optim import param_groups
from dora_diffusion.training.output.steplog import read_step_log
from helpers import FakeHub, max_diff, render

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dreambooth")
    save_tiny_sdxl_pipeline(root / "model")
    make_toy_imagefolder(root / "data", n=3)
    return root


def argv(work: Path, output: str, *extra: str, steps: int = 4) -> list[str]:
    """Flags shared by the runs: random flips and dropout (so RNG matters), warm-up (so the schedule state
    matters), accumulation over an epoch boundary (3 images, 2 per step); no validation unless ``extra`` asks."""
    return [
        "--pretrained_model_name_or_path", str(work / "model"),
        "--dataset", str(work / "data"),
        "--output_dir", str(work / output),
        "--cache_dir", str(work / "cache"),
        "--resolution", "64",
        "--rank", "4",
        "--dropout", "0.1",
        "--random_flip",
        "--learning_rate", "1e-3",
        "--lr_scheduler", "constant_with_warmup",
        "--lr_warmup_steps", "3",
        "--gradient_accumulation_steps", "2",
        "--max_train_steps", str(steps),
        "--checkpointing_steps", "2",
        "--report_to", "none",
        "--validation_prompt", "none",  # validation costs 4 images x 25 steps a run; tests that check it pass VALIDATION
        *extra,
    ]  # fmt: skip


def run(args: list[str]) -> tuple[Path, str]:
    """``main(args)`` with its stdout captured."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        path = main(args)
    return path, out.getvalue()


VALIDATION = ["--validation_prompt", "a photo of TOK toy", "--num_validation_images", "2", "--validation_inference_steps", "2"]


def _kohya_available() -> bool:
    try:
        import dora_diffusion.formats.kohya  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def dora_run(work):
    kohya = ["--export_kohya", "--export_comfyui"] if _kohya_available() else []
    return run(argv(work, "dora", *VALIDATION, *kohya))


FOREIGN = {"notes.txt": "my notes", "photos/me.jpg": "a photo of me", ".env": "HF_TOKEN=hf_secret"}
"""The user's files in the output folder before the pushing run: never uploaded."""


@pytest.fixture(scope="module")
def lora_run(work):
    """LoRA with cached latents, validation every 2 steps, tensorboard if installed, and a Hub push to a stand-in
    for ``huggingface_hub.HfApi``, from an output folder that already holds the user's files."""
    import huggingface_hub

    hub = FakeHub()
    for rel, text in FOREIGN.items():
        (work / "lora" / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / "lora" / rel).write_text(text)
    tracker = "tensorboard" if _installed("tensorboard") else "none"
    extra = ["--adapter", "lora", "--cache_latents", "--no_gradient_checkpointing", "--validation_steps", "2", "--push_to_hub", "--hub_model_id", "tiny-lora"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub, "HfApi", hub)
        mp.setattr(huggingface_hub, "create_repo", lambda repo_id, token=None, **kw: hub(token).create_repo(repo_id, **kw))
        mp.setattr(huggingface_hub, "upload_folder", hub.upload_folder)  # what 0781584 called
        path, out = run(argv(work, "lora", *VALIDATION, *extra, "--report_to", tracker))
    return path, out, hub, tracker


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def render_with(adapter_dir: Path, weight_name: str | None = None):
    pipe = build_tiny_sdxl_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_dora_weights(adapter_dir, weight_name=weight_name)
    return render(pipe)


PROBE = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


def merged_in_plain_torch(path: Path, scale: float):
    """A fresh tiny pipeline whose UNet weights are ``diag(m / ||W0 + sBA||) (W0 + sBA)`` (paper Eq. 5), computed
    here in fp64 from a diffusers DoRA file's tensors (``run``: rank 4, alpha 4)."""
    pipe = build_tiny_sdxl_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    sd = load_file(path)
    with torch.no_grad():
        for key in [k for k in sd if k.endswith(".lora_A.weight")]:
            name = key.removeprefix("unet.").removesuffix(".lora_A.weight")
            w0 = pipe.unet.get_submodule(name).weight
            w = w0.double() + scale * sd[f"unet.{name}.lora_B.weight"].double() @ sd[key].double()
            m = sd[f"unet.{name}.lora_magnitude_vector"].double()
            w0.copy_((m / w.norm(dim=1))[:, None] * w)
    return pipe


def param_name_to_file_key(name: str) -> str:
    """``unet.<module>.adapters.default.A`` (checkpoint) -> ``unet.<module>.lora_A.weight`` (diffusers file)."""
    return (
        name.replace(".adapters.default.A", ".lora_A.weight")
        .replace(".adapters.default.B", ".lora_B.weight")
        .replace(".adapters.default.magnitude", ".lora_magnitude_vector")
    )


# ---------------------------------------------------------------- the training step
def _args(**kw) -> argparse.Namespace:
    base = dict(rank=4, alpha=4.0, adapter="dora", dropout=0.0, rslora=False, unet_targets="attn",
                text_encoder_targets="attn", train_text_encoder=False, learning_rate=1e-4, text_encoder_lr=5e-6,
                optimizer="adamw", adam_weight_decay=1e-2)  # fmt: skip
    return argparse.Namespace(**{**base, **kw})


def test_training_step_uses_the_detached_norm_dora_layers(monkeypatch):
    """Every adapted UNet layer takes the lean DoRA autograd path; the norm carries no gradient;
    gradients reach B and m (A gets none while B = 0, as the math says)."""
    pipe = build_tiny_sdxl_pipeline()
    comps = Components(pipe.tokenizer, pipe.tokenizer_2, pipe.text_encoder, pipe.text_encoder_2, pipe.vae, pipe.unet,
                       DDPMScheduler.from_config(pipe.scheduler.config))  # fmt: skip
    comps.unet.requires_grad_(False)
    models = add_training_adapters(comps, _args())
    layers = adapted_layers(comps.unet)
    calls = []
    real = AdaptedLayer.forward

    def spy(self, x):
        calls.append(self.forward_path(x).startswith("lean_"))
        return real(self, x)

    monkeypatch.setattr(AdaptedLayer, "forward", spy)
    comps.unet.train()
    pred = comps.unet(torch.randn(1, 4, 8, 8), torch.tensor([500]), encoder_hidden_states=torch.randn(1, 77, 80),
                      added_cond_kwargs={"text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}).sample  # fmt: skip
    pred.pow(2).mean().backward()
    assert len(calls) == len(layers) and all(calls)  # one lean DoRA step per adapted layer
    layer = next(iter(layers.values()))
    assert not layer.adapters[ADAPTER_NAME].norm().requires_grad
    named = dict(named_trainable(models))
    assert all(p.grad is not None and p.grad.abs().max() > 0 for n, p in named.items() if n.endswith((".B", ".magnitude")))
    assert all(p.grad.abs().max() == 0 for n, p in named.items() if n.endswith(".A"))


def test_adapters_are_fp32_on_a_bf16_base():
    pipe = build_tiny_sdxl_pipeline(dtype=torch.bfloat16)
    comps = Components(pipe.tokenizer, pipe.tokenizer_2, pipe.text_encoder, pipe.text_encoder_2, pipe.vae, pipe.unet, None)
    for m in (comps.unet, comps.text_encoder, comps.text_encoder_2):
        m.requires_grad_(False)
    named = named_trainable(add_training_adapters(comps, _args(train_text_encoder=True)))
    assert named and {p.dtype for _, p in named} == {torch.float32}
    assert {p.dtype for p in comps.unet.parameters() if not p.requires_grad} == {torch.bfloat16}


def test_magnitudes_get_no_weight_decay():
    pipe = build_tiny_sdxl_pipeline()
    comps = Components(pipe.tokenizer, pipe.tokenizer_2, pipe.text_encoder, pipe.text_encoder_2, pipe.vae, pipe.unet, None)
    for m in (comps.unet, comps.text_encoder, comps.text_encoder_2):
        m.requires_grad_(False)
    named = named_trainable(add_training_adapters(comps, _args(train_text_encoder=True)))
    groups = {g["name"]: g for g in param_groups(named, _args(train_text_encoder=True))}
    assert set(groups) == {"unet.lowrank", "unet.magnitude", "text_encoders.lowrank", "text_encoders.magnitude"}
    assert (groups["unet.magnitude"]["weight_decay"], groups["unet.lowrank"]["weight_decay"]) == (0.0, 1e-2)
    assert (groups["unet.lowrank"]["lr"], groups["text_encoders.lowrank"]["lr"]) == (1e-4, 5e-6)
    assert sum(len(g["params"]) for g in groups.values()) == len(named)


# ---------------------------------------------------------------- DoRA
def test_dora_trains_and_loads(dora_run, base_images):
    out, stdout = dora_run
    weights = load_file(out / WEIGHTS)
    assert any(k.endswith("lora_magnitude_vector") for k in weights)
    assert all(k.startswith("unet.") for k in weights)
    # the file holds exactly the trained parameters of the last step
    state = load_file(out / "checkpoint-4" / "adapter_state.safetensors")
    assert {param_name_to_file_key(k) for k in state} == set(weights)
    for name, tensor in state.items():
        assert torch.equal(weights[param_name_to_file_key(name)], tensor), name
    # loaded into a fresh pipeline, it changes the images
    assert max_diff(render_with(out), base_images) > 1e-3
    # intermediate checkpoints load too, as their own tensors say (not as the final weights, not as the base)
    ckpt = render_with(out / "checkpoint-2")
    diff = max_diff(ckpt, render(merged_in_plain_torch(out / "checkpoint-2" / WEIGHTS, scale=4 / 4)))
    moved = max_diff(ckpt, base_images)
    print(f"checkpoint-2 vs plain-torch merge of its file: {diff:.2e}; vs the base model: {moved:.2e}")
    assert diff <= 1e-4 and moved > 10 * diff
    assert not torch.equal(load_file(out / "checkpoint-2" / WEIGHTS)["unet." + PROBE + ".lora_B.weight"],
                           weights["unet." + PROBE + ".lora_B.weight"])  # fmt: skip


def test_dora_loss_curve_is_finite(dora_run):
    out, _ = dora_run
    rows = read_step_log(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
    assert [r["lr"] for r in rows] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3])  # warm-up of 3 steps


def test_parameter_count_is_lora_plus_magnitudes(dora_run, lora_run):
    pattern = r"trainable parameters: ([\d,]+) = ([\d,]+) low-rank \(A, B\) \+ ([\d,]+) magnitude in (\d+) layers"
    dora = [int(g.replace(",", "")) for g in re.search(pattern, dora_run[1]).groups()]
    lora = [int(g.replace(",", "")) for g in re.search(pattern, lora_run[1]).groups()]
    unet = build_tiny_sdxl_pipeline().unet
    targets = [m for n, m in unet.named_modules() if n.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    rank = 4
    assert lora == [sum(rank * (m.in_features + m.out_features) for m in targets), dora[1], 0, len(targets)]
    assert dora[0] == lora[0] + sum(m.out_features for m in targets)
    assert dora[2] == sum(m.out_features for m in targets)


def test_summary_is_printed(dora_run):
    _, stdout = dora_run
    head = stdout.split("trainable parameters")[0]
    for expected in ("DreamBooth DoRA training for SDXL", "the base model's own", "3 images, captions from 'prompt'",
                     "trigger words   TOK", "DoRA rank 4, alpha 4", "1 x 2 accumulation x 1 process = 2 images per step",
                     "gradient checkpointing on"):  # fmt: skip
        assert expected in head
    assert len(head.splitlines()) <= 25


def test_validation_images_and_model_card(dora_run):
    out, _ = dora_run
    images = sorted((out / "validation" / "step-4").iterdir())
    assert [p.name for p in images] == ["00.png", "01.png"]
    assert Image.open(images[0]).size == (64, 64)
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers\n")  # no base_model: the base is a local folder
    assert "A DoRA adapter for `model`" in card and str(out.parent / "model") not in card  # a local base: its name
    for expected in ("Trigger words: `TOK`", "pipe.load_dora_weights(", "![validation image 0](validation/step-4/00.png)",
                     "| rank | `4` |", "| adapter | `dora` |", "- dora\n", "url: \"validation/step-4/01.png\""):  # fmt: skip
        assert expected in card


def test_kohya_export(dora_run, base_images):
    pytest.importorskip("dora_diffusion.formats.kohya", reason="dora_diffusion/formats/kohya.py is not there yet")
    out, _ = dora_run
    kohya = out / "dora_kohya.safetensors"
    keys = list(load_file(kohya))
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert any(k.endswith(".dora_scale") for k in keys)
    assert max_diff(render_with(out, "dora_kohya.safetensors"), render_with(out)) < 1e-4


def test_comfyui_export(dora_run, base_images):
    """--export_comfyui writes <name>_comfyui.safetensors beside the kohya file: kohya names, dora_scale for ComfyUI's
    rule (so not the kohya file's m); it is in run_files.json and the model card, and loaded back on the same base it
    renders as the diffusers file."""
    pytest.importorskip("dora_diffusion.formats.comfyui")
    out, _ = dora_run
    comfy, kohya = load_file(out / "dora_comfyui.safetensors"), load_file(out / "dora_kohya.safetensors")
    assert comfy.keys() == kohya.keys()
    with safe_open(str(out / "dora_comfyui.safetensors"), "pt") as f:
        assert f.metadata()["dora_diffusion.dora_scale"] == "comfyui"
    scales = [k for k in comfy if k.endswith(".dora_scale")]
    assert scales and all(torch.equal(comfy[k], kohya[k]) for k in comfy if k not in scales)
    assert max((comfy[k] - kohya[k]).abs().max().item() for k in scales) > 1e-6  # d = m (|W0| + eps) / |W0 + sBA|
    manifest = json.loads((out / "run_files.json").read_text())["files"]
    assert {"dora_comfyui.safetensors", "dora_kohya.safetensors"} <= set(manifest)
    card = (out / "README.md").read_text()
    assert "- `dora_comfyui.safetensors`: for ComfyUI and Forge" in card and "- `dora_kohya.safetensors`: kohya" in card
    diff = max_diff(render_with(out, "dora_comfyui.safetensors"), render_with(out))
    assert diff < 1e-5, diff


def test_resume_gives_identical_tensors(work, dora_run):
    """4 steps straight == 2 steps, then --resume_from_checkpoint latest for 2 more."""
    run(argv(work, "resumed", steps=2))
    assert [p.name for p in list_checkpoints(work / "resumed")] == ["checkpoint-2"]
    _, stdout = run(argv(work, "resumed", "--resume_from_checkpoint", "latest", steps=4))
    assert "resumed from" in stdout and "at step 2" in stdout
    straight, resumed = load_file(dora_run[0] / WEIGHTS), load_file(work / "resumed" / WEIGHTS)
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    assert [r["step"] for r in read_step_log(work / "resumed")] == [1, 2, 3, 4]


def test_sigterm_saves_a_checkpoint_and_the_resume_is_bit_identical(work, dora_run, monkeypatch):
    """SIGTERM in the middle of step 3 (checkpoints every 2): the step finishes, checkpoint-3 is saved, the run stops
    with TrainingInterrupted and puts back the handler it found; resuming gives the uninterrupted 4-step run's weights
    bit for bit (was: steps after checkpoint-2 lost)."""
    from dora_diffusion.training import TrainingInterrupted

    real = training_step.denoising_loss
    calls = {"n": 0}

    def sigterm_in_step_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # the first micro-batch of step 3 (2 per step)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    def guard(signum, frame):
        raise AssertionError("SIGTERM reached the test's own handler: training installed none")

    previous = signal.signal(signal.SIGTERM, guard)  # without training's handler, SIGTERM must not end pytest
    try:
        monkeypatch.setattr(training_step, "denoising_loss", sigterm_in_step_3)
        with pytest.raises(TrainingInterrupted) as err:
            run(argv(work, "sigterm"))
        assert signal.getsignal(signal.SIGTERM) is guard
    finally:
        signal.signal(signal.SIGTERM, previous)
    out = work / "sigterm"
    assert str(err.value) == (
        f"stopped by SIGTERM after step 3 of 4; saved {out / 'checkpoint-3'}. Continue with the same command and "
        "--resume_from_checkpoint latest"
    )
    assert err.value.signum == signal.SIGTERM and calls["n"] == 6  # step 3 finished, step 4 never started
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-3"]
    assert not (out / WEIGHTS).exists() and [r["step"] for r in read_step_log(out)] == [1, 2, 3]
    monkeypatch.setattr(training_step, "denoising_loss", real)
    _, stdout = run(argv(work, "sigterm", "--resume_from_checkpoint", "latest"))
    assert "checkpoint-3 at step 3" in stdout
    straight, resumed = load_file(dora_run[0] / WEIGHTS), load_file(out / WEIGHTS)
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_sigterm_during_validation_stops_at_that_step(work, monkeypatch):
    """A signal while validation images render (which takes long on a GPU) saves the step just validated and stops,
    instead of training one more step inside the scheduler's grace period."""
    from dora_diffusion.training import TrainingInterrupted

    real = training_loop.render

    def render_then_sigterm(*args, **kwargs):
        images = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return images

    def guard(signum, frame):
        raise AssertionError("SIGTERM reached the test's own handler: training installed none")

    previous = signal.signal(signal.SIGTERM, guard)
    try:
        monkeypatch.setattr(training_loop, "render", render_then_sigterm)
        flags = [*VALIDATION, "--validation_steps", "1", "--gradient_accumulation_steps", "1", "--checkpointing_steps", "0",
                 "--no_gradient_checkpointing"]  # fmt: skip
        with pytest.raises(TrainingInterrupted, match=r"stopped by SIGTERM after step 1 of 3; saved .*checkpoint-1\."):
            run(argv(work, "sigval", *flags, steps=3))
    finally:
        signal.signal(signal.SIGTERM, previous)
    out = work / "sigval"
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"] and (out / "validation" / "step-1").is_dir()
    assert [r["step"] for r in read_step_log(out)] == [1]


def test_another_runs_checkpoint_with_other_settings_or_data_is_refused(work, dora_run, monkeypatch):
    """--resume_from_checkpoint <another folder's checkpoint>: other adapter settings or other images are refused
    before any model loads, naming what differs (was: a shape error, or silently accepted); --allow_dataset_change
    continues on the new images."""
    checkpoint = str(dora_run[0] / "checkpoint-2")
    other = make_toy_imagefolder(work / "data4", n=4)
    real = training_loop.load_components

    def no_models(args, dtype=None):
        raise AssertionError("models were loaded")

    monkeypatch.setattr(training_loop, "load_components", no_models)
    with pytest.raises(CheckpointError) as err:
        main(argv(work, "elsewhere", "--resume_from_checkpoint", checkpoint, "--rank", "8"))
    assert str(err.value).startswith(
        f"--resume_from_checkpoint {checkpoint}: it was trained with other adapter settings (rank: 4 -> 8, alpha: 4.0 -> 8.0)"
    )
    with pytest.raises(CheckpointError, match=r"trained with other adapter settings \(adapter: 'dora' -> 'lora'\)"):
        main(argv(work, "elsewhere", "--resume_from_checkpoint", checkpoint, "--adapter", "lora"))
    with pytest.raises(CheckpointError) as err:
        main(argv(work, "elsewhere", "--resume_from_checkpoint", checkpoint, "--dataset", str(other)))
    assert f"it was trained on other data than --dataset {other} holds (3 images -> 4 images; added '0003.png')" in str(err.value)
    with pytest.raises(CheckpointError, match=r"checkpoint-4: it is at step 4, past --max_train_steps 3; pass a larger"):
        main(argv(work, "elsewhere", "--resume_from_checkpoint", str(dora_run[0] / "checkpoint-4"), steps=3))
    assert not (work / "elsewhere").exists()
    monkeypatch.setattr(training_loop, "load_components", real)
    flags = ["--dataset", str(other), "--allow_dataset_change", "--no_gradient_checkpointing"]
    _, stdout = run(argv(work, "elsewhere", "--resume_from_checkpoint", checkpoint, *flags, steps=3))
    assert "checkpoint-2 at step 2" in stdout and [r["step"] for r in read_step_log(work / "elsewhere")] == [3]


def test_a_moved_dataset_is_the_same_data(work):
    """The images moved to another folder (same files): resuming in the same output folder goes ahead, since the
    checkpoint's fingerprint matches; only the path differs."""
    import shutil

    flags = ["--gradient_accumulation_steps", "1", "--no_gradient_checkpointing"]
    run(argv(work, "moved", *flags, steps=2))
    shutil.copytree(work / "data", work / "data_moved")
    _, stdout = run(argv(work, "moved", *flags, "--dataset", str(work / "data_moved"), "--resume_from_checkpoint", "latest", steps=3))
    assert "checkpoint-2 at step 2" in stdout and [r["step"] for r in read_step_log(work / "moved")] == [1, 2, 3]


def test_latest_without_a_checkpoint_does_not_train_over_a_finished_run(work):
    """A finished run without checkpoints: a second run there is refused naming --resolution, and
    --resume_from_checkpoint latest stops with an error instead of starting a new run over its weights."""
    flags = ["--checkpointing_steps", "0", "--gradient_accumulation_steps", "1"]
    out, _ = run(argv(work, "nockpt", *flags, steps=1))
    before = (out / WEIGHTS).read_bytes()
    with pytest.raises(OutputDirError) as err:
        main(argv(work, "nockpt", *flags, "--resolution", "128", steps=1))
    assert "already holds an earlier run (its settings differ: resolution: 64 -> 128). It has no checkpoint to continue from" in str(err.value)
    with pytest.raises(CheckpointError, match=r"holds an earlier run \(pytorch_lora_weights.safetensors\) but no intact checkpoint"):
        main(argv(work, "nockpt", *flags, "--resume_from_checkpoint", "latest", steps=1))
    assert (out / WEIGHTS).read_bytes() == before


def test_output_dir_of_another_run_is_refused(work, dora_run):
    with pytest.raises(OutputDirError, match="already holds an earlier run"):
        main(argv(work, "dora"))
    with pytest.raises(OutputDirError, match=r"different settings \(rank: 4 -> 8, alpha: 4.0 -> 8.0\)"):
        main(argv(work, "dora") + ["--rank", "8"])
    with pytest.raises(CheckpointError, match=r"checkpoint-4: it was trained with other adapter settings \(adapter: 'dora' -> 'lora'\)"):
        main(argv(work, "dora") + ["--adapter", "lora", "--resume_from_checkpoint", "latest"])


# ---------------------------------------------------------------- LoRA, text encoders
def test_lora_trains_and_loads(lora_run, base_images):
    out, _, _, _ = lora_run
    weights = load_file(out / WEIGHTS)
    assert weights and not any("magnitude" in k for k in weights)
    with safe_open(str(out / WEIGHTS), "pt") as f:
        assert '"unet.use_dora": false' in f.metadata()["lora_adapter_metadata"]
    assert max_diff(render_with(out), base_images) > 1e-3
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-2", "step-4"]


def test_validation_images_are_comparable_across_steps(lora_run):
    """Same seeds at every validation: the images change only because the adapter did."""
    out, _, _, _ = lora_run
    a = [torch.tensor(list(Image.open(out / "validation" / s / "00.png").getdata())) for s in ("step-2", "step-4")]
    b = torch.tensor(list(Image.open(out / "validation" / "step-4" / "01.png").getdata()))
    # two seeds differ a lot; one seed two steps apart differs little
    assert (a[0] - a[1]).abs().float().mean() < (a[1] - b).abs().float().mean()


def test_push_to_hub_sends_exactly_the_runs_files_to_a_private_repo(lora_run, work):
    """Issue 27: the upload sends the run's own files listed in run_files.json, never the user's files in the
    folder, checkpoints or tracker logs; the repo is created private; training_args.json goes without local paths."""
    out, stdout, hub, _ = lora_run
    assert hub.log == [("create", "tiny-lora", True, None), ("commit", "me/tiny-lora", "End of training", None)]
    sent = hub.sent["me/tiny-lora"]
    images = [f"validation/step-{s}/0{i}.png" for s in (2, 4) for i in (0, 1)]
    assert sorted(sent) == sorted(["README.md", "training_args.json", "training_log.jsonl", WEIGHTS, *images])
    manifest = json.loads((out / "run_files.json").read_text())["files"]
    assert all(any(rel == e or rel.startswith(e + "/") for e in manifest) for rel in sent)  # only recorded paths
    assert not set(FOREIGN) & set(sent) and {(out / rel).read_text() for rel in FOREIGN} == set(FOREIGN.values())
    for rel in set(sent) - {"training_args.json"}:
        assert sent[rel] == (out / rel).read_bytes()
    published = sent["training_args.json"].decode()
    assert str(work) not in published and "resolved_paths" not in published and str(work) in (out / "training_args.json").read_text()
    settings = json.loads(published)
    assert (settings["dataset"], settings["pretrained_model_name_or_path"], settings["output_dir"]) == ("data", "model", "lora")
    assert str(work) not in sent["README.md"].decode()
    assert "pipe.load_dora_weights('me/tiny-lora')" in sent["README.md"].decode()
    assert f"uploaded {len(sent)} files to https://huggingface.co/me/tiny-lora" in stdout


def test_tensorboard_tracker(lora_run):
    out, _, _, tracker = lora_run
    if tracker != "tensorboard":
        pytest.skip("tensorboard is not installed (optional)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [p.parent for p in (out / "logs").rglob("events.out.tfevents.*")]
    acc = EventAccumulator(str(events[0]), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4]
    assert sorted({e.step for e in acc.Images(acc.Tags()["images"][0])}) == [2, 4]


def test_text_encoder_training(work, base_images):
    out, _ = run(
        argv(work, "te", "--train_text_encoder", "--text_encoder_lr", "1e-3", "--checkpointing_steps", "0", steps=2)
    )
    weights = load_file(out / WEIGHTS)
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        assert any(k.startswith(comp + ".") and k.endswith("lora_magnitude_vector") for k in weights), comp
    first_b = [v for k, v in weights.items() if k.startswith("text_encoder.") and ".layers.0." in k and "lora_B" in k]
    assert first_b and all(b.abs().max() > 0 for b in first_b)  # the text encoders did train
    images = render_with(out)
    assert max_diff(images, base_images) > 1e-3
    pipe = build_tiny_sdxl_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    unet_only = {k: v for k, v in weights.items() if k.startswith("unet.")}
    pipe.load_dora_weights(unet_only)
    assert max_diff(render(pipe), images) > 1e-5  # the text-encoder part matters


# ---------------------------------------------------------------- prior preservation
def test_prior_preservation_generates_missing_class_images(work):
    """Also: a v-prediction base (scheduler config), bf16 mixed precision, Min-SNR and noise offset."""
    import json
    import shutil

    shutil.copytree(work / "model", work / "model_v")
    config_file = work / "model_v" / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "prediction_type": "v_prediction"}))
    class_dir = work / "class"
    class_dir.mkdir()
    make_toy_imagefolder(work / "one_class", n=1)
    (work / "one_class" / "0000.png").rename(class_dir / "existing.png")
    flags = ["--with_prior_preservation", "--class_prompt", "a toy", "--class_data_dir", str(class_dir),
             "--num_class_images", "3", "--sample_batch_size", "2", "--prior_generation_steps", "2",
             "--checkpointing_steps", "0", "--gradient_accumulation_steps", "1", "--no_gradient_checkpointing"]  # fmt: skip
    flags += ["--pretrained_model_name_or_path", str(work / "model_v"), "--mixed_precision", "bf16",
              "--snr_gamma", "5", "--noise_offset", "0.05"]  # fmt: skip
    out, stdout = run(argv(work, "prior", *flags, steps=2))
    assert "training target: v_prediction" in stdout and "precision       bf16 (adapter parameters fp32)" in stdout
    assert all(math.isfinite(r["loss"]) for r in read_step_log(out))
    made = sorted(p.name for p in class_dir.iterdir())
    assert len(made) == 3 and "existing.png" in made
    assert all(Image.open(class_dir / n).size == (64, 64) for n in made)
    assert "prior preservation x1 (3 x 'a toy')" in stdout
    assert len(read_step_log(out)) == 2 and (out / WEIGHTS).is_file()


def test_rank_pattern_magnitude_lr_debiased_and_masked_loss(work, base_images):
    """Per-module ranks and alphas land in the file's shapes and metadata; load_dora_weights and diffusers'
    load_lora_weights read the file back to the same images (and to other images than the base)."""
    masks = work / "masks"
    masks.mkdir(exist_ok=True)
    for i in range(3):
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (0, 0, 32, 64))  # learn the left half
        mask.save(masks / f"{i:04d}.png")
    flags = ["--rank_pattern", '{"down_blocks.2": 8, "to_k": 2}', "--alpha_pattern", '{"to_v": 3}',
             "--magnitude_lr", "1e-2", "--debiased_estimation_loss", "--mask_dir", str(masks), "--checkpointing_steps", "0"]  # fmt: skip
    out, stdout = run(argv(work, "features", *flags, steps=2))
    assert "ranks {'down_blocks.2': 8, 'to_k': 2}, alphas {'to_v': 3.0}" in stdout
    assert "debiased estimation 1/sqrt(SNR), masked by" in stdout and "magnitudes 0.01" in stdout
    sd = load_file(out / WEIGHTS)
    a = {k.removesuffix(".lora_A.weight"): v.shape[0] for k, v in sd.items() if k.endswith("lora_A.weight")}
    assert a["unet.down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_k"] == 8  # the longer key wins
    assert a["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"] == 2
    assert a["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"] == 4
    with safe_open(str(out / WEIGHTS), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])  # diffusers' flat "unet.<field>" keys
    assert meta["unet.rank_pattern"]["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"] == 2
    assert meta["unet.alpha_pattern"]["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v"] == 3.0
    assert meta["unet.alpha_pattern"]["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"] == 2.0  # alpha = rank
    ours = render_with(out)
    pipe = build_tiny_sdxl_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(out)
    theirs = render(pipe)
    assert max_diff(ours, theirs) < 1e-4 < max_diff(ours, base_images)


def test_class_images_split_across_processes_are_the_same_images(tmp_path):
    """Two processes render disjoint halves; together they are exactly the images one process renders."""
    from dora_diffusion.training.data.prior import generate_class_images, missing_class_indices
    from dora_diffusion.training.output.validation import NonFiniteImages

    pipe = build_tiny_sdxl_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "existing.png").write_bytes(b"")  # counted: numbering continues after it
    shares = [missing_class_indices(tmp_path / "one", 5, rank, 2) for rank in (0, 1)]
    assert shares == [[1, 3], [2, 4]]
    alone = generate_class_images(pipe, tmp_path / "alone", "a toy", [1, 2, 3, 4], 64, 0, 2, 2)
    split = [p for share in shares for p in generate_class_images(pipe, tmp_path / "split", "a toy", share, 64, 0, 2, 2)]
    assert sorted(p.name for p in split) == [p.name for p in alone]
    for p in alone:
        assert np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(tmp_path / "split" / p.name)))
    # a NaN image (fp16 overflow) stops the run instead of training the prior on black squares
    pipe.vae.decode = lambda z, return_dict=False: (torch.full((z.shape[0], 3, 64, 64), float("nan")),)
    with pytest.raises(NonFiniteImages, match="class images for prior preservation: 1 of 1 images of 'a toy' have NaN"):
        generate_class_images(pipe, tmp_path / "nan", "a toy", [0], 64, 0, 1, 2)
    assert not list((tmp_path / "nan").glob("*.png"))


def test_deepspeed_and_fsdp_are_refused_at_start(work, monkeypatch):
    for env in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        with monkeypatch.context() as mp:
            mp.setenv(env, "true")
            with pytest.raises(TrainingError, match="does not support") as err:
                main(argv(work, "sharded"))
        assert ("FSDP" if "FSDP" in env else "DeepSpeed") in str(err.value) and "--multi_gpu" in str(err.value)
        assert not (work / "sharded").exists()


def test_push_to_hub_fails_before_training(work, monkeypatch):
    """A missing token fails at the start, not after hours of training; nothing is written."""
    def no_token(repo_id, token=None, public=False):
        raise OSError("Invalid user token")

    monkeypatch.setattr(training_loop, "create_hub_repo", no_token)
    monkeypatch.setattr(training_loop, "load_components", lambda *a: pytest.fail("models loaded before the Hub check"))
    with pytest.raises(TrainingError, match="--push_to_hub: could not create the Hub repo 'nohub'.*Invalid user token"):
        main(argv(work, "nohub", "--push_to_hub"))
    assert not (work / "nohub").exists()


# ---------------------------------------------------------------- bad input
def test_nan_loss_stops_and_keeps_the_last_checkpoint(work, monkeypatch):
    real = training_step.denoising_loss
    calls = {"n": 0}

    def nan_on_third_step(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(training_step, "denoising_loss", nan_on_third_step)
    flags = ["--gradient_accumulation_steps", "1", "--checkpointing_steps", "1", "--no_gradient_checkpointing"]
    with pytest.raises(TrainingError, match=r"the loss became nan at step 3.*checkpoint-2, is intact.*--resume_from_checkpoint latest"):
        run(argv(work, "nan", *flags, steps=4))
    out = work / "nan"
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    assert not (out / WEIGHTS).exists()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".dora-run.lock"]  # no temporaries
    rows = read_step_log(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and math.isnan(rows[-1]["loss"])
    # the intact checkpoint resumes (the NaN came from the patched loss, now gone)
    monkeypatch.setattr(training_step, "denoising_loss", real)
    run(argv(work, "nan", *flags, "--resume_from_checkpoint", "latest", steps=3))
    assert (out / WEIGHTS).is_file()


def test_disk_full_at_the_final_write_names_the_intact_checkpoint(work, monkeypatch):
    """The final adapter cannot be written (disk full): one TrainingError naming the folder and the last checkpoint;
    --resume_from_checkpoint latest then writes the outputs from it without training again."""
    import errno

    out = work / "fullend"
    real = training_loop.save_adapter

    def full_in_output_dir(models, directory, *args, **kwargs):
        if Path(directory) == out:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(models, directory, *args, **kwargs)

    monkeypatch.setattr(training_loop, "save_adapter", full_in_output_dir)
    flags = ["--gradient_accumulation_steps", "1", "--no_gradient_checkpointing"]
    with pytest.raises(TrainingError) as err:
        run(argv(work, "fullend", *flags, steps=2))
    assert str(err.value) == (
        f"could not write the trained adapter in {out} ([Errno 28] No space left on device). The last checkpoint, "
        f"{out / 'checkpoint-2'}, is intact: free some space, then continue with --resume_from_checkpoint latest"
    )
    monkeypatch.setattr(training_loop, "save_adapter", real)
    _, stdout = run(argv(work, "fullend", *flags, "--resume_from_checkpoint", "latest", steps=2))
    assert "checkpoint-2 at step 2" in stdout
    assert load_file(out / WEIGHTS).keys() == load_file(out / "checkpoint-2" / WEIGHTS).keys()
    assert all(torch.equal(v, load_file(out / "checkpoint-2" / WEIGHTS)[k]) for k, v in load_file(out / WEIGHTS).items())


def test_bad_dataset_fails_before_loading_models(work, monkeypatch):
    def no_models(args):
        raise AssertionError("models were loaded")

    monkeypatch.setattr(training_loop, "load_components", no_models)
    folder = make_toy_imagefolder(work / "nocaptions", n=2, caption_column="description")
    with pytest.raises(DatasetError, match=r"columns found: \['image', 'description'\]"):
        main(argv(work, "bad1") + ["--dataset", str(folder)])
    with pytest.raises(DatasetError, match="no such folder"):
        main(argv(work, "bad2") + ["--dataset", str(work / "missing")])
    assert not (work / "bad1").exists() and not (work / "bad2").exists()


def test_script_reports_errors_without_a_traceback(work, monkeypatch, capsys):
    """The top-level script turns dataset / output-folder / training errors into one line and exit code 1."""
    import runpy

    monkeypatch.setattr(sys, "argv", ["train_dreambooth_dora.py", *argv(work, "bad3"), "--dataset", str(work / "missing")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "train_dreambooth_dora.py"), run_name="__main__")
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --dataset") and "no such folder" in err and "Traceback" not in err


# ---------------------------------------------------------------- several processes
def test_two_processes(work):
    """``accelerate launch --multi_gpu --num_processes 2`` on a machine without CUDA: two CPU processes (gloo).

    (``accelerate launch --cpu --num_processes 2`` starts a single process in accelerate 1.x unless
    mpirun is configured.)
    """
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO / "train_dreambooth_dora.py"),
        *argv(work, "ddp", "--gradient_accumulation_steps", "1", "--checkpointing_steps", "2", steps=2),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 x 1 accumulation x 2 processes = 2 images per step" in proc.stdout
    assert proc.stdout.count("DreamBooth DoRA training for SDXL") == 1  # only the main process prints
    out = work / "ddp"
    found = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.safetensors"))
    assert found == ["checkpoint-2/adapter_state.safetensors", "checkpoint-2/pytorch_lora_weights.safetensors", WEIGHTS]
    assert [r["step"] for r in read_step_log(out)] == [1, 2]  # one writer
    pipe = build_tiny_sdxl_pipeline(seed=0)
    pipe.load_dora_weights(out)


# ---------------------------------------------------------------- the user's files in the output folder
def test_users_files_survive_new_overwrite_and_resumed_runs(work):
    """README.md, notes, validation/ and logs/ of the user's in --output_dir: a new run, an --overwrite_output_dir
    run and a resumed run past a damaged checkpoint and a half-written log line leave them all as they were."""
    out = work / "users"
    mine = {"README.md": "# my project", "notes.txt": "keep", "validation/mine.png": "png", "logs/mine.txt": "log"}
    for rel, text in mine.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    flags = [*VALIDATION, "--gradient_accumulation_steps", "1", "--checkpointing_steps", "1", "--no_gradient_checkpointing"]
    run(argv(work, "users", *flags, steps=2))
    assert (out / "model_card.md").is_file() and (out / WEIGHTS).is_file()
    run(argv(work, "users", *flags, "--overwrite_output_dir", steps=2))
    manifest = json.loads((out / "run_files.json").read_text())["files"]
    assert sorted(manifest) == sorted(["training_args.json", "training_log.jsonl", "checkpoint-1", "checkpoint-2",
                                       "validation/step-2", WEIGHTS, "model_card.md", ".dora-run.lock"])  # fmt: skip
    (out / "checkpoint-2" / "optimizer.pt").write_bytes(b"PK\x03\x04 damaged")
    with open(out / "training_log.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    _, stdout = run(argv(work, "users", *flags, "--resume_from_checkpoint", "latest", steps=3))
    assert "resumed from" in stdout and "checkpoint-1 at step 1" in stdout
    assert [r["step"] for r in read_step_log(out)] == [1, 2, 3]
    assert {rel: (out / rel).read_text() for rel in mine} == mine


def test_a_second_run_into_a_folder_in_use_stops_before_writing(work):
    """While a run holds --output_dir (its flock on .dora-run.lock), a second run there stops with OutputDirError
    before writing anything (was: both wrote training_args.json, the log and checkpoint-N over each other)."""
    from dora_diffusion.training.output.rundir import run_lock

    out = work / "busy"
    with run_lock(out):
        with pytest.raises(OutputDirError, match=r"busy is being written by another training run right now"):
            main(argv(work, "busy", "--gradient_accumulation_steps", "1", steps=1))
        assert sorted(p.name for p in out.iterdir()) == [".dora-run.lock"]
    run(argv(work, "busy", "--gradient_accumulation_steps", "1", steps=1))  # free again: the run goes ahead
    assert ".dora-run.lock" not in json.loads((out / "run_files.json").read_text())["files"]  # the test's file, not the run's


def test_nothing_is_written_when_loading_the_models_fails(work, monkeypatch):
    """A run that fails before training (here: the models) leaves no training_args.json to block the corrected rerun."""
    def broken(args, dtype=None):
        raise OSError("no such model")

    monkeypatch.setattr(training_loop, "load_components", broken)
    with pytest.raises(OSError, match="no such model"):
        main(argv(work, "early"))
    assert not (work / "early").exists()


# ---------------------------------------------------------------- issue 27: folders apart, the VAE's factor
def test_output_dir_apart_from_the_dataset(work, monkeypatch):
    """--output_dir equal to the dataset, inside it or holding it (and --class_data_dir equal to it) is refused
    before anything is read or written: the run's validation images would become training images next time."""
    monkeypatch.setattr(training_loop, "load_components", lambda *a: pytest.fail("models loaded"))
    data = make_toy_imagefolder(work / "apart" / "data", n=2)
    before = sorted(p.name for p in data.iterdir())
    cases = [
        (["--output_dir", str(data)], r"--output_dir .*data is --dataset .*data"),
        (["--output_dir", str(data / "out")], r"--output_dir .*out lies inside --dataset"),
        (["--output_dir", str(work / "apart")], r"--output_dir .*apart holds --dataset"),
        (["--output_dir", str(data) + "/./"], r"--output_dir .* is --dataset"),
        (["--with_prior_preservation", "--class_prompt", "a toy", "--class_data_dir", str(data)], r"--class_data_dir .*data is --dataset"),
    ]
    for flags, message in cases:
        with pytest.raises(OutputDirError, match=message + r".*Choose .* apart from --dataset"):
            main(argv(work, "apart-out") + ["--dataset", str(data), *flags])
    assert sorted(p.name for p in data.iterdir()) == before and not (work / "apart-out").exists()


def test_masked_loss_on_a_vae_that_downscales_by_4(tmp_path):
    """--mask_dir with the toy world's VAE (factor 4, not 8): the mask is pooled to the latent grid (16 x 16 for
    64 px); a mask that ignores everything gives a zero loss, a full one a positive loss."""
    from dora_diffusion.toyworld.model import build_untrained_pipeline

    pipe = build_untrained_pipeline(seed=0)
    assert 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 4
    pipe.save_pretrained(tmp_path / "toy")
    make_toy_imagefolder(tmp_path / "data", n=2)
    masks = tmp_path / "masks"
    masks.mkdir()
    for i in range(2):
        Image.new("L", (64, 64), 255).save(masks / f"{i:04d}.png")
    flags = [
        "--pretrained_model_name_or_path", str(tmp_path / "toy"), "--dataset", str(tmp_path / "data"),
        "--output_dir", str(tmp_path / "out"), "--resolution", "64", "--max_train_steps", "1", "--rank", "2",
        "--checkpointing_steps", "0", "--report_to", "none", "--mask_dir", str(masks), "--train_batch_size", "2",
        "--cache_dir", str(tmp_path / "cache"), "--validation_prompt", "none",
    ]  # fmt: skip
    run(flags)
    full = read_step_log(tmp_path / "out")[0]["loss"]
    for i in range(2):
        Image.new("L", (64, 64), 0).save(masks / f"{i:04d}.png")
    run([*flags[:5], str(tmp_path / "out0"), *flags[6:]])
    assert read_step_log(tmp_path / "out0")[0]["loss"] == 0.0 < full
