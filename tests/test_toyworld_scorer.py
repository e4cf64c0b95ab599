"""The toy-world scorer reads images as DreamBooth's metrics do: it tells right from wrong, and noise from both.

The figures come from ``validation_figures()`` (the shipped reader, seeds other than its training data); the
thresholds leave a margin below / above what was measured (docs/toyworld.md lists the measured numbers).
"""

from __future__ import annotations

import numpy as np
import pytest

from dora_diffusion.toyworld.reader import ASSET_PATH, load_reader
from dora_diffusion.toyworld.score import NamedObject, parse_prompt, score, validation_figures
from dora_diffusion.toyworld.subjects import SUBJECTS
from dora_diffusion.toyworld.world import caption, render, scenes


@pytest.fixture(scope="module")
def figures() -> dict[str, float]:
    return validation_figures()


def test_shipped_reader_is_small_and_loads_once():
    assert ASSET_PATH.stat().st_size < 2 * 1024 * 1024
    assert load_reader() is load_reader()


def test_world_images_match_their_own_captions(figures):
    assert figures["world_own_captions"] >= 0.9
    assert figures["world_train_own_captions"] >= 0.85
    assert figures["world_heldout_own_captions"] >= 0.9
    assert figures["world_blurred_jpeg_own_captions"] >= 0.85  # degraded in ways the reader was not trained on


def test_mismatched_captions_score_at_chance(figures):
    assert figures["chance_mismatched_captions"] <= 0.25
    assert figures["world_own_captions"] - figures["chance_mismatched_captions"] >= 0.6


@pytest.mark.parametrize("kind", ["noise", "tiny_pipeline"])
def test_images_without_the_named_things_score_near_chance(figures, kind):
    assert figures[kind] <= figures["chance_mismatched_captions"] + 0.15


@pytest.mark.parametrize("name", sorted(SUBJECTS))
def test_subject_fidelity_tells_the_subject_from_its_class(figures, name):
    assert figures[f"{name}_instances"] >= 0.8
    assert figures[f"{name}_plain"] <= 0.6  # its shape and colour, not its decoration: ~1/2 by construction
    assert figures[f"{name}_another_colour"] <= 0.75  # its decoration on another colour: ~1/2
    assert figures[f"{name}_same_shape"] <= 0.3  # plain objects of its shape in the world's colours
    assert figures[f"{name}_instance_prompt_fidelity"] >= 0.8


@pytest.mark.parametrize("name", sorted(SUBJECTS))
def test_prior_preservation_sees_language_drift(figures, name):
    assert figures[f"{name}_class_plain"] >= 0.8
    assert figures[f"{name}_class_decorated"] <= 0.3


@pytest.mark.parametrize(
    "prompt, background, objects",
    [
        ("a red star on a blue background", "blue", (NamedObject("star", "red"),)),
        ("a red star and a white circle on a striped background", "striped",
         (NamedObject("star", "red"), NamedObject("circle", "white"))),
        ("a yellow star with a ring on a gray background", "gray", (NamedObject("star", "yellow", "ring"),)),
        ("A sks star on a green background", "green",
         (NamedObject("star", "yellow", None, SUBJECTS["ring_star"]),)),
        ("a heart", None, (NamedObject("heart"),)),
        ("a photo of a green thing, plain background", None, (NamedObject(colour="green"),)),
    ],
)
def test_parse_prompt(prompt, background, objects):
    named = parse_prompt(prompt)
    assert named.background == background
    assert named.objects == objects


def test_score_per_image_and_resizing():
    world = scenes("heldout", 4, seed=3, two_objects=0.0)
    prompts = [caption(s) for s in world]
    small = score([render(s) for s in world], prompts)
    large = score(np.stack([np.asarray(render(s, size=128)) for s in world]), prompts)
    assert small["n"] == 4 and small["per_image_prompt_fidelity"] == [1.0] * 4
    assert large["per_image_prompt_fidelity"] == [1.0] * 4
    wrong = score([render(world[0])], [prompts[0].replace(world[0].background + " background", "checkered background")])
    assert wrong["prompt_fidelity"] == 0.5  # right object, wrong background


def test_subject_keys_split_trigger_and_class_prompts():
    s = SUBJECTS["ring_star"]
    images = [render(s.scene("blue")), render(s.scene("gray"))]
    out = score(images, ["a sks star on a blue background", "a star on a gray background"], subject="ring_star")
    assert (out["n_subject"], out["n_class"]) == (1, 1)
    assert out["subject_fidelity"] == out["per_image_subject_fidelity"][0] >= 0.8
    assert out["prior_preservation"] == out["per_image_prior_preservation"][1] <= 0.3  # the class took the ring


@pytest.mark.parametrize(
    "images, prompts, match",
    [
        (np.zeros((2, 64, 64, 3), np.uint8), ["a star"], "2 images but 1 prompts"),
        (np.zeros((1, 64, 64, 3), np.uint8), ["a photo of a dog"], "names no background, shape or colour"),
        (np.full((1, 64, 64, 3), 255.0), ["a star"], r"must lie in \[0, 1\]"),
        (np.zeros((1, 64, 64), np.uint8), ["a star"], r"must be \(N, H, W, 3\)"),
    ],
)
def test_bad_input_is_named(images, prompts, match):
    with pytest.raises(ValueError, match=match):
        score(images, prompts)
