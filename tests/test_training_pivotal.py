"""Pivotal tuning: new tokens trained with the adapter, saved as the embeddings file A1111, ComfyUI and diffusers read."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import dora_diffusion  # noqa: F401
from dora_diffusion.testing import build_tiny_sdxl_pipeline, make_toy_imagefolder, save_tiny_sdxl_pipeline
from dora_diffusion.training import DatasetError, main
from dora_diffusion.training.step.pivotal import replace_abstractions, token_plan

PROMPT = "a photo of TOK toy"


def test_token_plan_and_replacement():
    plan = token_plan("TOK, ZWX", 2)
    assert plan == {"TOK": ["<s0>", "<s1>"], "ZWX": ["<s2>", "<s3>"]}
    assert replace_abstractions("a TOK icon, TOK. ZWX; TOKEN MYTOK", plan) == "a <s0><s1> icon, <s0><s1>. <s2><s3>; TOKEN MYTOK"


@pytest.fixture(scope="module")
def ti_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pivotal")
    save_tiny_sdxl_pipeline(root / "model")
    make_toy_imagefolder(root / "data", n=3, caption=PROMPT)
    argv = ["--pretrained_model_name_or_path", str(root / "model"), "--dataset", str(root / "data"),
            "--output_dir", str(root / "ti"), "--resolution", "64", "--max_train_steps", "4",
            "--gradient_accumulation_steps", "1", "--checkpointing_steps", "2", "--report_to", "none",
            "--train_text_encoder_ti", "--train_text_encoder_ti_frac", "0.5", "--text_encoder_lr", "1e-2",
            "--learning_rate", "1e-3", "--validation_prompt", PROMPT, "--num_validation_images", "1",
            "--validation_inference_steps", "2"]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()) as out:
        main(argv)
    return root, out.getvalue()


def fresh_pipe(root: Path):
    pipe = build_tiny_sdxl_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(DDPMScheduler.from_pretrained(root / "model", subfolder="scheduler").config)
    return pipe


def render(pipe, prompt: str) -> np.ndarray:
    """As the validation images were made: seed 0, 2 steps, guidance 5, 64 px."""
    return pipe(prompt, num_inference_steps=2, guidance_scale=5.0, height=64, width=64,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]  # fmt: skip


def test_embeddings_file(ti_run):
    root, stdout = ti_run
    out = root / "ti"
    assert "trigger words   <s0><s1>" in stdout
    emb = load_file(out / "ti_emb.safetensors")
    assert emb["clip_l"].shape == (2, 32) and emb["clip_g"].shape == (2, 48)  # the tiny encoders' widths
    with safe_open(str(out / "ti_emb.safetensors"), "pt") as f:
        assert '"tokens": ["<s0>", "<s1>"]' in f.metadata()["dora_diffusion"]
    # trained for ceil(0.5 * 4) = 2 steps, then frozen: the step-2 checkpoint already holds the final rows
    at_2 = load_file(out / "checkpoint-2" / "ti_emb.safetensors")
    assert all(torch.equal(at_2[k], emb[k]) for k in emb)
    card = (out / "README.md").read_text()
    assert "ti_emb.safetensors" in card and "token=['<s0>', '<s1>']" in card


def test_load_renders_the_validation_image_and_diffusers_reads_the_file(ti_run):
    root, _ = ti_run
    out = root / "ti"
    prompt = "a photo of <s0><s1> toy"
    ours = fresh_pipe(root)
    name = ours.load_dora_weights(out)  # the folder: adapter and embeddings
    got = render(ours, prompt)
    saved = np.asarray(Image.open(out / "validation" / "step-4" / "00.png"), dtype=np.float64) / 255
    assert np.abs(got - saved).max() <= 1.01 / 255  # the training-time embedding module gave the same image

    theirs = fresh_pipe(root)
    theirs.load_dora_weights(out / "pytorch_lora_weights.safetensors")  # the adapter alone
    state = load_file(out / "ti_emb.safetensors")
    theirs.load_textual_inversion(state["clip_l"], token=["<s0>", "<s1>"], text_encoder=theirs.text_encoder, tokenizer=theirs.tokenizer)
    theirs.load_textual_inversion(state["clip_g"], token=["<s0>", "<s1>"], text_encoder=theirs.text_encoder_2, tokenizer=theirs.tokenizer_2)
    assert np.array_equal(render(theirs, prompt), got)

    without = fresh_pipe(root)
    without.load_dora_weights(out / "pytorch_lora_weights.safetensors")
    assert np.abs(render(without, prompt) - got).max() > 1e-3  # the embeddings matter

    ours.delete_dora_adapters(name)  # removes the tokens too
    assert "<s0>" not in ours.tokenizer.get_vocab() and len(ours.tokenizer) == 514
    assert ours.text_encoder.get_input_embeddings().weight.shape[0] == 514
    ours.load_dora_weights(out)
    ours.unload_dora_weights()
    assert "<s0>" not in ours.tokenizer_2.get_vocab() and ours.text_encoder_2.get_input_embeddings().weight.shape[0] == 514


def test_abstraction_missing_from_the_captions(tmp_path):
    make_toy_imagefolder(tmp_path / "data", n=2, caption="a 3dicon, a toy")
    with pytest.raises(DatasetError, match="--token_abstraction 'TOK' appears in none of the 2 captions.*pass --token_abstraction '3dicon'"):
        main(["--pretrained_model_name_or_path", str(tmp_path / "none"), "--dataset", str(tmp_path / "data"),
              "--output_dir", str(tmp_path / "out"), "--train_text_encoder_ti", "--report_to", "none"])  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_comparison_page_loads_the_embeddings_with_the_folder(ti_run):
    """The app's Comparer, given the run's folder, loads the adapter and its tokens; removing it removes both."""
    from dora_diffusion.compare import Comparer

    root, _ = ti_run
    pipe = fresh_pipe(root)
    comparer = Comparer(pipe, str(root / "model"))
    comparer.load_adapter(str(root / "ti"), "ti")
    assert "<s0>" in pipe.tokenizer.get_vocab() and "<s1>" in pipe.tokenizer_2.get_vocab()
    comparer.remove_adapter("ti")
    assert "<s0>" not in pipe.tokenizer.get_vocab() and len(pipe.tokenizer_2) == 514
