"""Personalization on the pretrained toy world: a DoRA learns a subject; FT runs read back exactly; analysis pools runs."""

from __future__ import annotations

import time

import pytest
import torch

from dora_diffusion import toyworld
from dora_diffusion.toyworld import finetune

SUBJECT_MARGIN = 0.15
"""How much a DoRA trained by the demo's recipe must raise subject fidelity over the base model's (cosine units; the
base draws a plain pink heart, about 1/2, the subject has white dots). The demo measures 0.51 -> 0.90 on its grid."""


@pytest.fixture(scope="module")
def pipe():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield toyworld.load_pipeline()
    torch.set_num_threads(threads)


def _unseen_prompts(subject) -> list[str]:
    unseen = [b for b in toyworld.BACKGROUNDS if b not in subject.backgrounds]
    return [f"{subject.instance_prompt} on a {unseen[k % len(unseen)]} background" for k in range(8)]


def test_a_dora_trained_by_the_script_learns_the_subject(pipe, tmp_path):
    """train_dreambooth_dora.py's code with the demo's recipe: bounded CPU time, subject fidelity up by the margin."""
    from dora_diffusion import demo
    from dora_diffusion.training import main as train

    subject = demo.SUBJECT
    data = toyworld.make_subject_dataset(tmp_path / "data", subject)
    cpu = time.process_time()
    train([
        "--pretrained_model_name_or_path", str(toyworld.PIPELINE_DIR), "--dataset", str(data),
        "--output_dir", str(tmp_path / "dora"), "--adapter", "dora", "--max_train_steps", str(demo.TRAIN_STEPS),
        *demo.TRAIN_FLAGS,
    ])  # fmt: skip
    cpu = time.process_time() - cpu
    assert cpu <= 60, f"training took {cpu:.0f} s of CPU time"
    prompts = _unseen_prompts(subject)
    seeds = list(range(100, 108))
    before = toyworld.score(finetune.sample(pipe, pipe.unet, prompts, seeds), prompts, subject)
    pipe.load_dora_weights(str(tmp_path / "dora"), adapter_name="subject")
    try:
        after = toyworld.score(finetune.sample(pipe, pipe.unet, prompts, seeds), prompts, subject)
    finally:
        pipe.delete_dora_adapters("subject")
    print(f"subject fidelity {before['subject_fidelity']:.3f} -> {after['subject_fidelity']:.3f}; CPU {cpu:.0f} s")
    assert after["subject_fidelity"] >= before["subject_fidelity"] + SUBJECT_MARGIN


def test_full_fine_tuning_written_as_a_full_rank_lora_is_exact(pipe, tmp_path):
    """FT of the attention weights, saved and loaded back: W0 + s B A equals every fine-tuned weight (plain torch)."""
    data = finetune.encode_subject(pipe, "dotted_heart")
    tuned = finetune.train_subject(pipe, data, "ft", learning_rate=1e-3, steps=3, batch_size=2)
    path = finetune.save_run(pipe.unet, tuned, "ft", tmp_path / "ft")
    fresh = toyworld.load_pipeline()
    fresh.load_dora_weights(str(path), adapter_name="ft")
    from dora_diffusion.analysis import file_method
    from dora_diffusion.core.inject import adapted_layers

    layers = adapted_layers(fresh.unet)
    tuned_modules = dict(tuned.named_modules())
    changed = [n for n, m in pipe.unet.named_modules() if isinstance(m, torch.nn.Linear)
               and not torch.equal(m.weight.float(), tuned_modules[n].weight)]  # fmt: skip
    assert sorted(layers) == sorted(changed) and len(changed) > 10
    for name, layer in layers.items():
        w = layer.weight.double() + layer.adapters["ft"].delta(1.0).double()
        torch.testing.assert_close(w, tuned_modules[name].weight.double(), rtol=0, atol=1e-6)
    assert file_method(path) == "FT"


def test_analyze_pools_each_runs_checkpoints(pipe, tmp_path, capsys):
    """`dora-diffusion analyze` on runs with checkpoint-N folders: one pooled line per run, FT named from its file."""
    from dora_diffusion.cli import main as cli

    data = finetune.encode_subject(pipe, "ring_star")
    for method in ("ft", "dora"):
        def save(step, unet, method=method):
            finetune.save_run(pipe.unet, unet, method, tmp_path / method / f"checkpoint-{step}")

        finetune.train_subject(pipe, data, method, learning_rate=1e-3, steps=2, batch_size=2, callback=save)
    assert cli(["analyze", "--base", str(toyworld.PIPELINE_DIR), str(tmp_path / "ft"), str(tmp_path / "dora"),
                "--out", str(tmp_path / "out")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    pooled = out.split("all its checkpoints together")[1].splitlines()
    ft_line = next(line.split() for line in pooled if line.startswith("ft "))
    dora_line = next(line.split() for line in pooled if line.startswith("dora "))
    per_checkpoint = int(next(line.split() for line in out.splitlines() if line.startswith("dora/checkpoint-1"))[2])
    assert ft_line[1] == "FT" and dora_line[1] == "DoRA"
    assert int(dora_line[2]) == 2 * per_checkpoint and per_checkpoint > 10
