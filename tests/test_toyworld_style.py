"""The toy world's style subject (3d_icon's kind: one look, many objects): its images, its scorer, and a DoRA trained
by the training script that learns the look."""

from __future__ import annotations

import json
import time

import pytest
import torch

from dora_diffusion import toyworld
from dora_diffusion.toyworld import finetune
from dora_diffusion.toyworld.score import score, style_validation_figures
from dora_diffusion.toyworld.styles import STYLES, eval_objects, make_style_dataset

STYLE_MARGIN = 0.14
"""How much a DoRA trained through the script (the demo's recipe with ``--unet_targets all``, STYLE_STEPS steps) must
raise style fidelity over the base model's (probability units). Measured with `python benchmarks/bench_reach.py --out
DIR --target icon --configs "base,all r4 100" --seeds 0,1,2`: base 0.0005, trained 0.64, 0.46, 0.28 (seeds 0, 1, 2),
so half the smallest rise. On the attention targets alone 100 steps give only 0.05-0.06, and `all` at 50 steps
0.02-0.05 (docs/quality.md, "The style subject"): 100 steps of `all` is the cheapest recipe measured that learns it."""
STYLE_STEPS = 100
STYLE_FLAGS = ("--unet_targets", "all", "--rank", "4")


@pytest.fixture(scope="module")
def figures() -> dict[str, float]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield style_validation_figures("icon", n=16)
    torch.set_num_threads(threads)


def test_style_dataset_shows_different_objects_with_3d_icon_captions(tmp_path):
    root = make_style_dataset(tmp_path / "icon", "icon")
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    assert 6 <= len(rows) <= 8 and all((root / r["file_name"]).is_file() for r in rows)
    assert rows[0]["prompt"] == "a tok icon of a red star on a gray background"
    assert len({r["prompt"].split(" on a ")[0] for r in rows}) == len(rows)  # every image another object
    assert not {(s, c) for s, c, _ in eval_objects("icon")} & set(STYLES["icon"].objects)
    with pytest.raises(FileExistsError, match="not empty"):
        make_style_dataset(root, "icon")


def test_style_fidelity_tells_the_style_from_plain_images_and_other_looks(figures):
    for kind in ("instances", "train_instances", "vae_round_trip", "blurred_jpeg"):
        assert figures[f"icon_{kind}"] >= 0.9, kind
    for kind in ("world_plain", "decorated", "look_square_icon", "look_outline", "look_flat_badge"):
        assert figures[f"icon_{kind}"] <= 0.1, kind
    assert figures["icon_own_objects"] >= 0.9 and figures["icon_vae_round_trip_own_objects"] >= 0.8
    assert figures["icon_chance_objects"] <= 0.5
    assert figures["icon_class_plain"] >= 0.9 and figures["icon_class_styled"] <= 0.1


def test_score_reads_a_style_or_a_subject_not_both():
    images = [toyworld.render(s) for s in toyworld.scenes("train", 2, seed=0)]
    with pytest.raises(ValueError, match="one of subject= or style="):
        score(images, ["a tok icon of a red star", "a red star"], subject="ring_star", style="icon")
    with pytest.raises(ValueError, match="unknown style 'nope'"):
        score(images, ["a tok icon of a red star", "a red star"], style="nope")
    out = score(images, ["a tok icon of a red star", "a red star"], style="icon")
    assert out["n_style"] == 1 and out["n_class"] == 1


def test_a_dora_trained_by_the_script_learns_the_style(tmp_path):
    """train_dreambooth_dora.py's code, the demo's recipe on every UNet layer kind for STYLE_STEPS steps: bounded CPU
    time, style fidelity on 8 objects the instances never show up by the margin."""
    from dora_diffusion.demo import TRAIN_FLAGS
    from dora_diffusion.training import main as train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        style = STYLES["icon"]
        data = make_style_dataset(tmp_path / "data", style)
        cpu = time.process_time()
        train(["--pretrained_model_name_or_path", str(toyworld.PIPELINE_DIR), "--dataset", str(data),
               "--output_dir", str(tmp_path / "dora"), "--adapter", "dora", "--max_train_steps", str(STYLE_STEPS),
               *TRAIN_FLAGS, *STYLE_FLAGS])  # fmt: skip
        cpu = time.process_time() - cpu
        assert cpu <= 60, f"training took {cpu:.0f} s of CPU time"
        pipe = toyworld.load_pipeline()
        prompts = [style.prompt(*o) for o in eval_objects(style)]
        seeds = list(range(100, 108))
        before = score(finetune.sample(pipe, pipe.unet, prompts, seeds), prompts, style=style)
        pipe.load_dora_weights(str(tmp_path / "dora"), adapter_name="style")
        after = score(finetune.sample(pipe, pipe.unet, prompts, seeds), prompts, style=style)
    finally:
        torch.set_num_threads(threads)
    print(f"style fidelity {before['style_fidelity']:.3f} -> {after['style_fidelity']:.3f}; CPU {cpu:.0f} s")
    assert after["style_fidelity"] >= before["style_fidelity"] + STYLE_MARGIN
