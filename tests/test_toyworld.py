"""The toy world: deterministic scenes and captions, held-out combinations, subjects, the shipped pipeline."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from dora_diffusion import toyworld
from dora_diffusion.toyworld.world import is_heldout, triples


def test_world_has_the_promised_variety_and_is_deterministic():
    assert (len(toyworld.SHAPES), len(toyworld.COLOURS), len(toyworld.BACKGROUNDS)) >= (6, 8, 6)
    a, b = toyworld.scenes("train", 50, seed=3), toyworld.scenes("train", 50, seed=3)
    assert a == b and a != toyworld.scenes("train", 50, seed=4)
    assert np.array_equal(np.asarray(toyworld.render(a[0])), np.asarray(toyworld.render(b[0])))
    assert toyworld.render(a[0]).size == (64, 64)
    sizes = {round(t.size, 2) for s in a for t in s.things}
    assert len(sizes) > 10 and any(len(s.things) == 2 for s in a) and any(len(s.things) == 1 for s in a)
    assert toyworld.captions("train", 5, seed=1) == toyworld.captions("train", 5, seed=1)


def test_heldout_captions_name_combinations_pretraining_never_shows():
    heldout = toyworld.captions("heldout", 40, seed=0)
    train = {toyworld.caption(s) for s in toyworld.scenes("train", 3000, seed=0)}
    assert not set(heldout) & train
    assert triples("heldout") and not set(triples("heldout")) & set(triples("train"))
    for scene in toyworld.scenes("heldout", 40, seed=0):
        assert all(is_heldout(t.shape, t.colour, scene.background) for t in scene.things)
    assert toyworld.caption(toyworld.scenes("train", 1, seed=0)[0]).endswith("background")
    with pytest.raises(ValueError, match="split must be"):
        toyworld.captions("test", 3)


def test_subject_dataset_is_an_imagefolder_with_trigger_captions(tmp_path):
    subject = toyworld.SUBJECTS["ring_star"]
    root = toyworld.make_subject_dataset(tmp_path / "s", subject)
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    assert 4 <= len(rows) <= 8
    assert all(r["prompt"].startswith("a sks yellow star on a ") and (root / r["file_name"]).is_file() for r in rows)
    assert subject.class_prompt == "a yellow star"
    with pytest.raises(FileExistsError, match="not empty"):
        toyworld.make_subject_dataset(root, subject)
    assert len(toyworld.SUBJECTS) >= 2


def test_tokenizer_makes_world_words_single_tokens_and_still_reads_unknown_words():
    from dora_diffusion.toyworld.model import WORDS, build_tokenizers

    tok, tok2 = build_tokenizers()
    assert all(tok.tokenize(w) == [w + "</w>"] for w in WORDS)
    assert tok.tokenize("a sks star") == ["a</w>", "s", "k", "s</w>", "star</w>"]
    text = "an astronaut riding a horse, 4k"
    assert len(tok2(text, padding="max_length", max_length=77).input_ids) == 77
    ids = tok2(text, add_special_tokens=False).input_ids  # CLIP's unknown token is <|endoftext|>
    assert len(ids) > 5 and tok2.unk_token_id not in ids


def test_shipped_pipeline_loads_offline_in_seconds_and_has_sdxl_classes(monkeypatch):
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    pipe = toyworld.load_pipeline()
    assert time.perf_counter() - start < 20
    assert isinstance(pipe, StableDiffusionXLPipeline) and isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.vae, AutoencoderKL) and isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    size = sum(f.stat().st_size for f in toyworld.PIPELINE_DIR.rglob("*") if f.is_file())
    assert size <= 25 * 2**20
    image = pipe("a red star on a blue background", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_load_pipeline_names_the_pretrain_command_for_an_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="toyworld.pretrain --out"):
        toyworld.load_pipeline(tmp_path)


def test_pretrain_command_writes_a_loadable_pipeline_and_vae_from_keeps_the_vae(tmp_path):
    """A few steps of each phase: loss log per step, the pipeline samples from t=999, --vae_from reuses the VAE."""
    import csv

    from safetensors.torch import load_file

    from dora_diffusion.toyworld import pretrain

    small = ["--num_images", "16", "--vae_steps", "2", "--vae_batch_size", "4", "--max_steps", "3",
             "--batch_size", "4", "--eval_every", "0", "--num_threads", "1"]  # fmt: skip
    first = pretrain.pretrain(pretrain.parse_args(["--out", str(tmp_path / "a"), *small]))
    with open(tmp_path / "a" / "loss_log.csv") as f:
        phases = [row["phase"] for row in csv.DictReader(f)]
    assert phases == ["vae"] * 2 + ["unet"] * 3
    pipe = toyworld.load_pipeline(first)
    pipe.scheduler.set_timesteps(20)
    assert int(pipe.scheduler.timesteps[0]) == 999 and pipe.scheduler.config.timestep_spacing == "trailing"
    assert pipe.vae.config.scaling_factor != 1.0  # set from the latents' spread
    second = pretrain.pretrain(pretrain.parse_args(["--out", str(tmp_path / "b"), "--vae_from", str(first), *small]))
    vae_a = load_file(first / "vae" / "diffusion_pytorch_model.safetensors")
    vae_b = load_file(second / "vae" / "diffusion_pytorch_model.safetensors")
    assert vae_a.keys() == vae_b.keys() and all(torch.equal(vae_a[k], vae_b[k]) for k in vae_a)
    unet_a = load_file(first / "unet" / "diffusion_pytorch_model.safetensors")
    unet_b = load_file(second / "unet" / "diffusion_pytorch_model.safetensors")
    assert not all(torch.equal(unet_a[k], unet_b[k]) for k in unet_a)  # the UNet trained afresh on other noise
    with pytest.raises(SystemExit, match="not both"):
        pretrain.pretrain(pretrain.parse_args(["--out", str(tmp_path / "c"), "--vae_from", str(first), "--init", str(first)]))


@pytest.mark.parametrize("load, threads_now, expected", [(2.1, 2, 2), (3.2, 2, 1), (1.0, 1, 2), (2.0, 1, 1)])
def test_pretrain_threads_count_only_other_processes_load(monkeypatch, load, threads_now, expected):
    """Its own threads are in the load average: alone at 2 threads (load ~2) it keeps both cores."""
    from dora_diffusion.toyworld import pretrain

    before = torch.get_num_threads()
    monkeypatch.setattr(pretrain.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(pretrain.os, "getloadavg", lambda: (load, load, load))
    try:
        torch.set_num_threads(threads_now)
        pretrain.adapt_threads(None)
        assert torch.get_num_threads() == expected
        pretrain.adapt_threads(3)  # a fixed count is never changed
        assert torch.get_num_threads() == expected
    finally:
        torch.set_num_threads(before)
