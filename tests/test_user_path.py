"""The commands a user runs, as they are, against a Hugging Face cache filled offline (``HF_HUB_OFFLINE=1``).

The cache holds, under the real repo ids, the tiny SDXL pipeline as ``stabilityai/stable-diffusion-xl-base-1.0``,
its VAE as ``madebyollin/sdxl-vae-fp16-fix`` and a dataset built like ``linoyts/3d_icon`` today (23 JPEGs,
captions "a 3dicon, ..."). Only size flags (steps, resolution) are added to the commands.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from hub_fixtures import ICON_OLD_REVISION, fill_hub_cache, make_3d_icon_like
from dora_diffusion.testing import save_tiny_sdxl_pipeline

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train_dreambooth_dora.py"
SIZE_FLAGS = ["--resolution", "64", "--max_train_steps", "2"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    """``HF_HOME`` with a filled hub cache."""
    root = tmp_path_factory.mktemp("user_path")
    model = save_tiny_sdxl_pipeline(root / "src" / "sdxl")
    cache = root / "hf_home" / "hub"
    fill_hub_cache(cache, "stabilityai/stable-diffusion-xl-base-1.0", model)
    fill_hub_cache(cache, "madebyollin/sdxl-vae-fp16-fix", model / "vae")
    fill_hub_cache(cache, "linoyts/3d_icon", make_3d_icon_like(root / "src" / "3d_icon"), "dataset")
    old = make_3d_icon_like(root / "src" / "3d_icon_old", old_captions=True)
    fill_hub_cache(cache, "linoyts/3d_icon", old, "dataset", commit=ICON_OLD_REVISION, branch=None)
    return root / "hf_home"


def offline_env(hub: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "ACCELERATE_"))}
    return {
        **env,
        "HF_HOME": str(hub),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }


def accelerate_command() -> list[str]:
    """``accelerate`` from this Python's environment (the console script), else its module."""
    exe = Path(sys.executable).parent / "accelerate"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "accelerate.commands.accelerate_cli"]


def test_default_3d_icon_command_offline(hub, tmp_path):
    """``accelerate launch train_dreambooth_dora.py --dataset linoyts/3d_icon`` + size flags: adapter, validation
    images of the default prompt, a model card naming the trigger found in the captions."""
    cmd = [*accelerate_command(), "launch", str(SCRIPT), "--dataset", "linoyts/3d_icon", *SIZE_FLAGS]
    proc = subprocess.run(cmd, cwd=tmp_path, env=offline_env(hub), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp_path / "3d_icon-sdxl-dora"
    assert "trigger words   a 3dicon" in proc.stdout
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    images = sorted((out / "validation" / "step-2").glob("*.png"))
    assert [p.name for p in images] == ["00.png", "01.png", "02.png", "03.png"]  # --num_validation_images 4
    card = (out / "README.md").read_text()
    assert "Trigger words: `a 3dicon`" in card
    assert '"a 3dicon, an astronaut riding a horse"' in card  # the widget's prompt
    settings = json.loads((out / "training_args.json").read_text())
    assert settings["trigger_words"] == ["a 3dicon"]
    assert settings["pretrained_vae_model_name_or_path"] == "madebyollin/sdxl-vae-fp16-fix"


FAKE_HUB = textwrap.dedent(
    """
    import json, runpy, sys
    from pathlib import Path
    import dora_diffusion.training.run as loop
    calls = []
    loop.create_hub_repo = lambda repo_id, token=None, public=False: calls.append(["create", repo_id]) or "me/" + repo_id
    loop.upload_run = lambda output_dir, repo_id, run_files, token=None: calls.append(["upload", str(output_dir), repo_id]) or []
    sys.argv = sys.argv[1:]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
        Path("hub_calls.json").write_text(json.dumps(calls))
    """
)
"""Runs the script with the Hub's create_repo/upload replaced by a log (the Hub is out of reach here)."""


README_3D_ICON = """
      --pretrained_model_name_or_path=stabilityai/stable-diffusion-xl-base-1.0
      --pretrained_vae_model_name_or_path=madebyollin/sdxl-vae-fp16-fix
      --dataset_name=./3d_icon --caption_column=prompt
      --instance_prompt=3d%icon%in%the%style%of%TOK
      --validation_prompt=a%TOK%icon%of%an%astronaut%riding%a%horse,%in%the%style%of%TOK
      --output_dir=3d-icon-SDXL-LoRA --mixed_precision=bf16 --resolution=1024
      --train_batch_size=3 --repeats=1 --gradient_accumulation_steps=1 --gradient_checkpointing
      --learning_rate=1.0 --text_encoder_lr=1.0 --optimizer=prodigy
      --train_text_encoder_ti --train_text_encoder_ti_frac=0.5 --snr_gamma=5.0
      --lr_scheduler=constant --lr_warmup_steps=0 --rank=8 --max_train_steps=1000
      --checkpointing_steps=2000 --seed=0 --report_to=wandb --push_to_hub --use_dora
"""
"""The 3d_icon command of diffusers' advanced SDXL README (``%`` stands for a space inside a quoted value)."""


def readme_flags() -> list[str]:
    """The README's flags, size flags made small, --report_to=wandb as tensorboard (wandb is not a test dependency)."""
    flags = [f.replace("%", " ") for f in README_3D_ICON.split()]
    sizes = {"--resolution=1024": "--resolution=64", "--max_train_steps=1000": "--max_train_steps=2"}
    flags = [sizes.get(f, f) for f in flags]
    return ["--report_to=tensorboard" if f == "--report_to=wandb" else f for f in flags]


def snapshot(hub: Path, revision: str | None, dest: Path) -> None:
    """The README's ``snapshot_download(..., local_dir="./3d_icon")``, from the filled cache."""
    snaps = hub / "hub" / "datasets--linoyts--3d_icon" / "snapshots"
    commit = revision or (hub / "hub" / "datasets--linoyts--3d_icon" / "refs" / "main").read_text()
    shutil.copytree(snaps / commit, dest)


def test_diffusers_advanced_readme_command(hub, tmp_path):
    """The 3d_icon command of diffusers' advanced SDXL README (train_dreambooth_lora_sdxl_advanced.py, with
    --use_dora), pasted as it is, size flags aside, on the captions it was written for (3d_icon before 2024-08-14,
    "In the style of TOK, ..."): pivotal tuning of TOK, Prodigy, bf16 on the CPU; --push_to_hub reaches a logged
    fake of the Hub. The validation images must be finite (they are written black, with a warning, when not)."""
    snapshot(hub, ICON_OLD_REVISION, tmp_path / "3d_icon")
    cmd = [sys.executable, "-c", FAKE_HUB, str(SCRIPT), *readme_flags()]
    proc = subprocess.run(cmd, cwd=tmp_path, env=offline_env(hub), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp_path / "3d-icon-SDXL-LoRA"
    assert "precision       bf16" in proc.stdout and "trigger words   <s0><s1>" in proc.stdout
    assert "NaN" not in proc.stderr
    emb = load_file(out / "3d-icon-SDXL-LoRA_emb.safetensors")
    assert emb["clip_l"].shape == (2, 32) and emb["clip_g"].shape == (2, 48)
    calls = json.loads((tmp_path / "hub_calls.json").read_text())
    assert calls[0] == ["create", "3d-icon-SDXL-LoRA"] and calls[1][0] == "upload" and len(calls) == 2
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    images = sorted((out / "validation" / "step-2").glob("*.png"))
    assert len(images) == 4
    for path in images:
        pixels = np.asarray(Image.open(path), dtype=np.float32)
        assert pixels.shape == (64, 64, 3) and pixels.std() > 1.0  # rendered, not the black of a NaN image


def test_diffusers_readme_command_on_todays_captions(hub, tmp_path):
    """On 3d_icon as it is today the same command stops at once, saying why and what to pass."""
    snapshot(hub, None, tmp_path / "3d_icon")
    cmd = [sys.executable, "-c", FAKE_HUB, str(SCRIPT), *readme_flags()]
    proc = subprocess.run(cmd, cwd=tmp_path, env=offline_env(hub), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "--token_abstraction 'TOK' appears in none of the 23 captions" in proc.stderr
    assert "pass --token_abstraction '3dicon'" in proc.stderr
    assert not (tmp_path / "3d-icon-SDXL-LoRA").exists()
