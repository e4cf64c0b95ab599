"""``--adapter full``: full fine-tuning (FT) of the targeted UNet weights through the training script (tiny pipeline).

One straight run (2 steps, a checkpoint after each) is shared: the trained UNet is captured in memory when the run
finishes, and compared in plain torch with the written LoRA file loaded (and fused) on the base pipeline.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from dora_diffusion.analysis import file_method
from dora_diffusion.core.inject import adapted_layers
from dora_diffusion.testing import make_toy_imagefolder, save_tiny_sdxl_pipeline
from dora_diffusion.training import TrainingError, main
from dora_diffusion.training import run as training_loop
from dora_diffusion.training.args import parse_args
from dora_diffusion.training.full import lora_of_change
from dora_diffusion.training.step.loss import denoising_loss
from dora_diffusion.training.step.step import predict

WEIGHTS = "pytorch_lora_weights.safetensors"
TARGETS = "to_q,to_v,conv_in,conv1"
"""Linear layers, a Conv2d whose kernel (4 x 3 x 3 = 36) is smaller than its outputs (down = identity) and Conv2d's
whose kernel is larger (up = identity): both sides of ``lora_of_change``."""
U = 2.0**-24
"""fp32's unit roundoff."""


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("full")
    save_tiny_sdxl_pipeline(root / "model")
    make_toy_imagefolder(root / "data", n=3)
    return root


def argv(work: Path, output: str, *extra: str, steps: int = 2) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(work / "model"), "--dataset", str(work / "data"),
        "--output_dir", str(work / output), "--resolution", "64", "--adapter", "full", "--unet_targets", TARGETS,
        "--learning_rate", "1e-3", "--random_flip", "--gradient_accumulation_steps", "2", "--max_train_steps", str(steps),
        "--checkpointing_steps", "1", "--report_to", "none", "--validation_prompt", "none", "--no_gradient_checkpointing",
        *extra,
    ]  # fmt: skip


def _quiet(args: list[str]) -> Path:
    with contextlib.redirect_stdout(io.StringIO()):
        return main(args)


@pytest.fixture(scope="module")
def straight(work):
    """The straight run's output folder and its trained UNet (captured when the run finishes)."""
    captured = {}
    finish = training_loop.TrainingRun.finish

    def capture(self):
        captured["unet"] = self.components.unet
        return finish(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training_loop.TrainingRun, "finish", capture)
        out = _quiet(argv(work, "straight"))
    return out, captured["unet"].eval().requires_grad_(False)


@pytest.fixture(scope="module")
def base_pipe(work):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(str(work / "model"))


def _targeted(unet) -> list[str]:
    wanted = TARGETS.split(",")
    return [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and n.split(".")[-1] in wanted]


def test_only_the_targeted_weights_train_and_the_loss_falls(work, straight, base_pipe):
    """Every parameter but the targets' weights (their biases included) is bit-identical to the base; the checkpoint
    holds exactly those weights; the denoising loss on the training images (fixed noise and timesteps) falls."""
    out, tuned = straight
    base = base_pipe.unet
    tuned_sd, base_sd = tuned.state_dict(), base.state_dict()
    changed = sorted(k for k in base_sd if not torch.equal(tuned_sd[k], base_sd[k]))
    targets = _targeted(base)
    assert len(targets) >= 8 and changed == sorted(f"{n}.weight" for n in targets)
    saved = load_file(out / "checkpoint-2" / "adapter_state.safetensors")
    assert sorted(saved) == sorted(f"unet.{k}" for k in changed)
    for key, value in saved.items():
        assert torch.equal(value, tuned_sd[key[len("unet."):]]), key
    images = sorted((work / "data").glob("*.png"))
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB").resize((64, 64))) for p in images])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        latents = base_pipe.vae.encode(x).latent_dist.mean * base_pipe.vae.config.scaling_factor
        hidden, _, pooled, _ = base_pipe.encode_prompt(["a photo of TOK toy"] * len(images), do_classifier_free_guidance=False)
        gen = torch.Generator().manual_seed(0)
        z0, hidden, pooled = latents.repeat(4, 1, 1, 1), hidden.repeat(4, 1, 1), pooled.repeat(4, 1)
        t = torch.randint(0, 1000, (len(z0),), generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        time_ids = torch.tensor([[64, 64, 0, 0, 64, 64]], dtype=torch.float32).repeat(len(z0), 1)
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler.from_pretrained(str(work / "model"), subfolder="scheduler")
        losses = [float(denoising_loss(*predict(u, scheduler, z0, eps, t, hidden, pooled, time_ids), t, scheduler)) for u in (base, tuned)]
    print(f"loss on the training images: base {losses[0]:.4f} -> FT {losses[1]:.4f}")
    assert losses[1] < 0.95 * losses[0]


@pytest.mark.exactness
def test_the_written_lora_is_the_fine_tuned_unet(straight, base_pipe):
    """The file, loaded on the base pipeline: each targeted layer's ``up @ down`` is ``W_ft - W0`` bit for bit, its
    output matches the fine-tuned layer's (plain torch), and fused, the weight is ``fl(W0 + fl(W_ft - W0))`` bit for
    bit, within one rounding of ``W_ft`` (bit-exact ``W_ft`` is impossible in fp32 where the change is larger than
    the weight it leaves: the difference itself is rounded). The whole UNet's output matches too."""
    out, tuned = straight
    path = out / WEIGHTS
    assert file_method(path) == "FT"
    assert "full fine-tuning (FT" in (out / "README.md").read_text()
    pipe = base_pipe
    base_weights = {n: m.weight.detach().clone() for n, m in pipe.unet.named_modules() if n in _targeted(pipe.unet)}
    tuned_modules = dict(tuned.named_modules())
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 8, 8, generator=gen)
    hidden = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=gen)
    cond = {"text_embeds": torch.randn(2, pipe.text_encoder_2.config.projection_dim, generator=gen),
            "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32)}  # fmt: skip
    with torch.no_grad():
        expected = tuned(sample, 500, encoder_hidden_states=hidden, added_cond_kwargs=cond).sample
    pipe.load_dora_weights(str(out), adapter_name="ft")
    try:
        layers = adapted_layers(pipe.unet)
        assert sorted(layers) == sorted(base_weights)
        inexact = 0
        for name, layer in layers.items():
            w0, w_ft = base_weights[name], tuned_modules[name].weight
            a = layer.adapters["ft"]
            assert torch.equal(a.delta(1.0), w_ft - w0), name
            shape = (3, w0.shape[1]) if w0.dim() == 2 else (1, w0.shape[1], 6, 6)
            x = torch.randn(*shape, generator=gen)
            with torch.no_grad():
                y = layer(x)
                ref = tuned_modules[name](x)
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5, msg=name)
            inexact += int((w0 + (w_ft - w0) != w_ft).sum())
        with torch.no_grad():
            got = pipe.unet(sample, 500, encoder_hidden_states=hidden, added_cond_kwargs=cond).sample
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        pipe.fuse_dora()
        for name, layer in layers.items():
            w0, w_ft, fused = base_weights[name], tuned_modules[name].weight, layer.weight.detach()
            assert torch.equal(fused, w0 + (w_ft - w0)), name
            err = (fused.double() - w_ft.double()).abs()
            bound = U * ((w_ft.double() - w0.double()).abs() + w_ft.double().abs()) * (1 + 4 * U)
            assert bool((err <= bound).all()), name
        print(f"fused: {inexact} of {sum(w.numel() for w in base_weights.values())} weights one rounding off W_ft")
    finally:
        pipe.unfuse_dora()
        pipe.delete_dora_adapters("ft")


@pytest.mark.exactness
@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (8, 4, 3, 3), (40, 4, 3, 3), (5, 5, 1, 1)])
def test_lora_of_change_is_exact_on_both_sides(shape):
    """``up @ down`` equals ``W - W0`` bit for bit, rank min(out, in x kh x kw), alpha = rank (scale 1); a conv pair
    (down a conv of the full kernel, up 1x1) gives the plain conv of the difference."""
    gen = torch.Generator().manual_seed(0)
    w0, w = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    m = lora_of_change(w0, w)
    k = int(np.prod(shape[1:]))
    assert m.rank == min(shape[0], k) and m.alpha == float(m.rank) and m.magnitude is None
    assert torch.equal(m.b.flatten(1) @ m.a.flatten(1), (w - w0).reshape(shape[0], -1))
    if len(shape) == 4:
        x = torch.randn(2, shape[1], 7, 7, generator=gen)
        y = F.conv2d(F.conv2d(x, m.a, padding=shape[-1] // 2), m.b)
        torch.testing.assert_close(y, F.conv2d(x, w - w0, padding=shape[-1] // 2), rtol=1e-5, atol=1e-5)


def test_resume_continues_bit_identically(work, straight):
    """Step 2 resumed from the straight run's checkpoint-1 (in another folder) writes the same file, bit for bit."""
    out, _ = straight
    resumed = _quiet(argv(work, "resumed", "--resume_from_checkpoint", str(out / "checkpoint-1")))
    a, b = load_file(out / WEIGHTS), load_file(resumed / WEIGHTS)
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--adapter", "full,dora"], "full fine-tuning is not part of a pair"),
        (["--train_text_encoder"], "--adapter full with --train_text_encoder: that sets the text encoders"),
        (["--magnitude_lr", "1e-3"], "--adapter full with --magnitude_lr: that sets DoRA's magnitudes"),
        (["--loraplus_lr_ratio", "16"], "--adapter full with --loraplus_lr_ratio"),
        (["--rank", "8"], "--adapter full with --rank: that sets a low-rank adapter's shape"),
        (["--alpha=4"], "--adapter full with --alpha"),
        (["--dropout", "0.1"], "--adapter full with --dropout"),
        (["--use_dora"], "--use_dora and --adapter full contradict each other"),
    ],
)
def test_flags_that_make_no_sense_with_full_are_refused(work, extra, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv(work, "refused", *extra))
    assert message in capsys.readouterr().err


def test_half_precision_is_refused_before_any_model_loads(work, monkeypatch):
    """FT trains the UNet's own weights: in bf16 most updates would round away, so half precision is refused."""
    monkeypatch.setattr(training_loop, "load_components", lambda *a, **k: pytest.fail("models were loaded"))
    with pytest.raises(TrainingError, match=r"--adapter full with --mixed_precision bf16: .* Pass --mixed_precision no"):
        _quiet(argv(work, "bf16", "--mixed_precision", "bf16"))
    assert not (work / "bf16").exists()


def test_help_lists_full(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert "dora|lora|full|dora,lora" in capsys.readouterr().out
