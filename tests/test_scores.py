"""Scores per column: the toy world's scorer, CLIP-T / CLIP-I on a tiny random CLIP, and a clear note offline."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

from dora_diffusion.app.events import CompareEvents
from dora_diffusion.compare import (
    ClipScorer,
    Column,
    GenerationSettings,
    ScoringUnavailable,
    ToyWorldScorer,
    make_scorer,
    plan_grid,
    score_columns,
)
from dora_diffusion.testing import make_toy_images, save_tiny_clip, save_tiny_dinov2
from dora_diffusion.toyworld import PIPELINE_DIR, SUBJECTS, instance_scenes, render, scenes


def test_toy_world_scorer_tells_the_subject_from_plain_objects():
    subject = SUBJECTS["dotted_heart"]
    prompt = f"{subject.instance_prompt} on a striped background"
    settings = GenerationSettings(prompt, width=64, height=64)
    plan = plan_grid(settings, [0, 1, 2, 3], {"subject": 1.0, "plain": 1.0}, False, ["subject", "plain"])
    subject_images = [render(s) for s in instance_scenes(subject, 4, seed=1)]
    plain_images = [render(s) for s in scenes("train", 4, seed=3, two_objects=0.0)]
    images = {(seed, Column("subject", 1.0)): im for seed, im in zip(plan.seeds, subject_images)}
    images |= {(seed, Column("plain", 1.0)): im for seed, im in zip(plan.seeds, plain_images)}
    scorer = make_scorer(str(PIPELINE_DIR), "openai/clip-vit-base-patch32")
    assert isinstance(scorer, ToyWorldScorer) and scorer.metrics(prompt) == ("prompt fidelity", "subject fidelity")
    rows = {r.column.adapter: r for r in score_columns(scorer, plan, images)}
    assert rows["subject"].n == 4 and rows["subject"].values["subject fidelity"] > 0.8
    assert rows["plain"].values["subject fidelity"] < rows["subject"].values["subject fidelity"] - 0.2
    with pytest.raises(ScoringUnavailable, match="cannot read this prompt"):
        scorer.score(subject_images, "a photo of an astronaut")


def test_clip_scores_on_a_tiny_random_clip_equal_an_independent_computation(tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    clip = save_tiny_clip(tmp_path / "clip")
    instances = tmp_path / "instances"
    instances.mkdir()
    for i, im in enumerate(make_toy_images(3, seed=5)):
        im.save(instances / f"{i}.png")
    (instances / "notes.txt").write_text("not an image")
    images = make_toy_images(4, seed=9)
    scorer = make_scorer("stabilityai/stable-diffusion-xl-base-1.0", str(clip), str(instances))
    assert isinstance(scorer, ClipScorer) and scorer.metrics("x") == ("CLIP-T", "CLIP-I")
    got = scorer.score(images, "a photo of TOK toy")

    model, processor = CLIPModel.from_pretrained(clip), CLIPProcessor.from_pretrained(clip)
    with torch.no_grad():
        def unit(e):
            e = e if isinstance(e, torch.Tensor) else e.pooler_output
            return e / e.norm(dim=-1, keepdim=True)

        x = unit(model.get_image_features(**processor(images=images, return_tensors="pt")))
        t = unit(model.get_text_features(**processor(text=["a photo of TOK toy"], return_tensors="pt", padding=True)))
        r = unit(model.get_image_features(**processor(images=[Image.open(instances / f"{i}.png") for i in range(3)],
                                                      return_tensors="pt")))  # fmt: skip
    assert got["CLIP-T"] == pytest.approx(float((x @ t.T).mean()), abs=1e-5)
    assert got["CLIP-I"] == pytest.approx(float((x @ r.T).mean()), abs=1e-5)
    assert -1 <= got["CLIP-T"] <= 1 and -1 <= got["CLIP-I"] <= 1
    assert make_scorer("some/sdxl", "none") is None


def test_dino_subject_fidelity_on_a_tiny_random_dinov2(tmp_path):
    from transformers import AutoImageProcessor, AutoModel

    clip, dino = save_tiny_clip(tmp_path / "clip"), save_tiny_dinov2(tmp_path / "dino")
    instances = tmp_path / "instances"
    instances.mkdir()
    for i, im in enumerate(make_toy_images(2, seed=5)):
        im.save(instances / f"{i}.png")
    images = make_toy_images(3, seed=9)
    scorer = make_scorer("some/sdxl", str(clip), str(instances), subject_model=str(dino))
    assert scorer.metrics("x") == ("CLIP-T", "CLIP-I", "DINO")
    got = scorer.score(images, "a photo of TOK toy")
    model, processor = AutoModel.from_pretrained(dino), AutoImageProcessor.from_pretrained(dino)
    with torch.no_grad():
        def cls(imgs):
            e = model(**processor(images=imgs, return_tensors="pt")).last_hidden_state[:, 0]
            return e / e.norm(dim=-1, keepdim=True)

        expected = (cls(images) @ cls([Image.open(instances / f"{i}.png") for i in range(2)]).T).mean()
    assert got["DINO"] == pytest.approx(float(expected), abs=1e-5)
    assert make_scorer("some/sdxl", str(clip), None, subject_model=str(dino)).metrics("x") == ("CLIP-T",)


def test_no_scoring_model_offline_is_a_note_not_a_hang(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    scorer = ClipScorer("nobody/no-such-clip")
    plan = plan_grid(GenerationSettings("a cat", width=64, height=64), [0], {}, True, [])
    images = {(0, Column(None)): make_toy_images(1)[0]}
    events = CompareEvents(None, None, scorer, tmp_path)  # the page's scoring step, without a server
    start = time.time()
    rows, note = events.score(plan, images)
    assert rows == [] and time.time() - start < 5
    assert note.startswith("no scores: the CLIP model 'nobody/no-such-clip' is not in the Hugging Face cache")
    assert "HF_HUB_OFFLINE is set" in note and "--score_model" in note
    with pytest.raises(ScoringUnavailable, match="does not exist"):
        ClipScorer(str(save_tiny_clip(tmp_path / "clip")), tmp_path / "missing").score(list(images.values()), "a cat")
    assert np.isfinite(ClipScorer(str(tmp_path / "clip")).score(list(images.values()), "a cat")["CLIP-T"])


def test_instance_dir_on_the_toy_model_keeps_the_toy_scorer_and_says_so(tmp_path):
    """Issue 29 (8): --instance_dir on the toy world's model no longer switches to CLIP (which cannot load
    offline); the scorer's name, shown under Generate, says the folder is not read."""
    scorer = make_scorer(str(PIPELINE_DIR), "openai/clip-vit-base-patch32", str(tmp_path))
    assert isinstance(scorer, ToyWorldScorer)
    assert f"--instance_dir {tmp_path} is not read" in scorer.name
    assert scorer.metrics("a zwx pink heart") == ("prompt fidelity", "subject fidelity")
    assert ToyWorldScorer().name == "toy-world scorer (dora_diffusion.toyworld.score)"
