"""The options people pick other trainers for (issue 31 item 2): EMA, LoRA+, caption dropout / shuffle / keep_tokens,
a timestep range, Huber / smooth-L1 loss. Unit tests against formulas written here, then one short run (and its
resume) that shows each flag reaching the training step."""

from __future__ import annotations

import argparse
import math
import shutil

import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from dora_diffusion.testing import make_toy_imagefolder, save_tiny_sdxl_pipeline
from dora_diffusion.training.args import parse_args
from dora_diffusion.training.data.captions import draw_batch_captions, draw_caption
from dora_diffusion.training.step.ema import AdapterEMA, ema_decay_at
from dora_diffusion.training.step.loss import denoising_loss, elementwise_loss, huber_threshold
from dora_diffusion.training.step.optim import param_groups
from dora_diffusion.training.step.step import timestep_range


def _scheduler() -> DDPMScheduler:
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


# ---------------------------------------------------------------- loss type and Huber threshold
def test_loss_types_are_kohyas_formulas():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g) * 3
    c = torch.tensor([0.1, 0.5, 1.0])
    d, cc = (pred - target).double(), c.double().view(-1, 1, 1, 1)
    expected = {
        "l2": d**2,
        "l1": d.abs(),
        "huber": 2 * cc * (torch.sqrt(d**2 + cc**2) - cc),
        "smooth_l1": 2 * (torch.sqrt(d**2 + cc**2) - cc),
    }
    for kind, value in expected.items():
        torch.testing.assert_close(elementwise_loss(pred, target, kind, c).double(), value, rtol=1e-5, atol=1e-6)
    t = torch.tensor([10, 500, 900])
    l2 = denoising_loss(pred, target, t, _scheduler())
    huber = denoising_loss(pred, target, t, _scheduler(), loss_type="huber", huber_c=c)
    torch.testing.assert_close(huber.double(), expected["huber"].mean(), rtol=1e-5, atol=0)
    assert huber < 0.6 * l2  # errors of size ~3 count linearly, not squared
    # prior preservation: the class samples' error is of the same kind
    with_prior = denoising_loss(pred, target, t, _scheduler(), num_class=1, prior_loss_weight=0.5, loss_type="smooth_l1", huber_c=c)
    smooth = expected["smooth_l1"]
    torch.testing.assert_close(with_prior.double(), smooth[:2].mean() + 0.5 * smooth[2:].mean(), rtol=1e-5, atol=0)


def test_huber_threshold_schedules():
    s = _scheduler()
    t = torch.tensor([0, 250, 999])
    torch.testing.assert_close(huber_threshold(s, t, 0.1, "constant"), torch.full((3,), 0.1))
    torch.testing.assert_close(huber_threshold(s, t, 0.1, "exponential"), torch.tensor([1.0, 0.1**0.25, 0.1**0.999]))
    ab = s.alphas_cumprod[t].double()
    sigma = ((1 - ab) / ab).sqrt()
    snr = huber_threshold(s, t, 0.1, "snr").double()
    torch.testing.assert_close(snr, 0.9 / (1 + sigma) ** 2 + 0.1, rtol=1e-5, atol=0)
    assert snr[0] > 0.9 and 0.1 < snr[2] < 0.11  # nearly L2 at low noise, c at high noise


# ---------------------------------------------------------------- timestep range
def test_timestep_range():
    s = _scheduler()
    config = argparse.Namespace(min_timestep=None, max_timestep=None)
    assert timestep_range(config, s) == (0, 1000)
    assert timestep_range(argparse.Namespace(min_timestep=200, max_timestep=700), s) == (200, 700)
    small = DDPMScheduler(num_train_timesteps=500)
    with pytest.raises(ValueError, match=r"--max_timestep 700.*0 <= min < max <= 500"):
        timestep_range(argparse.Namespace(min_timestep=200, max_timestep=700), small)


# ---------------------------------------------------------------- LoRA+
def test_loraplus_gives_b_ratio_times_the_learning_rate():
    named = [
        (f"{c}.x.adapters.default.{k}", nn.Parameter(torch.zeros(2)))
        for c in ("unet", "text_encoder") for k in ("A", "B", "magnitude")
    ]  # fmt: skip
    args = argparse.Namespace(learning_rate=1e-4, text_encoder_lr=5e-6, optimizer="adamw", adam_weight_decay=1e-2,
                              magnitude_lr=None, loraplus_lr_ratio=16.0)  # fmt: skip
    groups = {g["name"]: (g["lr"], g["weight_decay"], len(g["params"])) for g in param_groups(named, args)}
    assert groups == {
        "unet.lowrank": (1e-4, 1e-2, 1), "unet.B": (pytest.approx(1.6e-3), 1e-2, 1), "unet.magnitude": (1e-4, 0.0, 1),
        "text_encoders.lowrank": (5e-6, 1e-2, 1), "text_encoders.B": (pytest.approx(8e-5), 1e-2, 1),
        "text_encoders.magnitude": (5e-6, 0.0, 1),
    }  # fmt: skip
    args.loraplus_lr_ratio = None  # A and B share a group, as before the flag
    assert {g["name"]: len(g["params"]) for g in param_groups(named, args)}["unet.lowrank"] == 2


# ---------------------------------------------------------------- captions
def test_caption_dropout_and_shuffle_are_seeded_draws():
    caption = "TOK, toy, red, round, close-up"
    drawn = [draw_caption(caption, 0, 0, i, dropout_rate=0.3) for i in range(2000)]
    dropped = drawn.count("")
    assert abs(dropped - 600) < 4 * math.sqrt(2000 * 0.3 * 0.7)  # binomial(2000, 0.3)
    assert set(drawn) == {"", caption}
    assert drawn == [draw_caption(caption, 0, 0, i, dropout_rate=0.3) for i in range(2000)]  # a pure function
    assert drawn != [draw_caption(caption, 0, 1, i, dropout_rate=0.3) for i in range(2000)]  # each epoch draws anew
    assert drawn != [draw_caption(caption, 1, 0, i, dropout_rate=0.3) for i in range(2000)]  # and each seed
    shuffled = [draw_caption(caption, 0, 0, i, shuffle=True, keep_tokens=1) for i in range(200)]
    tags = caption.split(", ")
    assert all(s.split(", ")[0] == "TOK" and sorted(s.split(", ")) == sorted(tags) for s in shuffled)
    assert len(set(shuffled)) > 12  # 4! = 24 orders of the four tags after the kept one
    batch = draw_batch_captions([caption, caption, "a class"], [5, 6], 0, 0, 0.0, True, 2)
    assert batch[2] == "a class" and batch[0] == draw_caption(caption, 0, 0, 5, shuffle=True, keep_tokens=2)


def test_prompt_cache_holds_the_empty_caption_and_shuffled_captions_are_encoded_each_step():
    """Frozen text encoders: with caption dropout the empty caption is encoded once with the others; with shuffled
    tags nothing is cached (every order would be) and the prompts are encoded each micro-batch."""
    from types import SimpleNamespace

    from dora_diffusion.training.run import TrainingRun

    class Prompts:
        trained, cached = True, None

        def fill_cache(self, prompts):
            self.cached = prompts

    def frozen(**flags):
        config = SimpleNamespace(train_text_encoder=False, caption_dropout_rate=0.0, shuffle_caption=False, class_prompt=None)
        run = SimpleNamespace(config=SimpleNamespace(**{**vars(config), **flags}), ti_named=[], prompts=Prompts(),
                              loaded=SimpleNamespace(records=[SimpleNamespace(caption="TOK, toy")]), class_records=None,
                              offload=False)  # fmt: skip
        TrainingRun.freeze_prompts(run)
        return run.prompts.trained, run.prompts.cached

    assert frozen() == (False, ["TOK, toy"])
    assert frozen(caption_dropout_rate=0.1) == (False, ["TOK, toy", ""])
    assert frozen(caption_dropout_rate=0.1, shuffle_caption=True) == (True, None)


# ---------------------------------------------------------------- EMA
def test_ema_follows_diffusers_decay_and_swaps_back_bit_exactly():
    assert [ema_decay_at(t, 0.2) for t in (1, 2, 3)] == [0.0, 2 / 11, 0.2]  # warm-up, then --ema_decay
    assert ema_decay_at(101, 0.995) == 101 / 110 and ema_decay_at(5000, 0.995) == 0.995  # capped from step 1791
    p = nn.Parameter(torch.tensor([1.0, 2.0]))
    ema = AdapterEMA([("unet.x.A", p)], 0.2)
    values = [torch.tensor([3.0, -1.0]), torch.tensor([5.0, 0.5]), torch.tensor([0.1, 0.2])]
    expected = torch.tensor([1.0, 2.0], dtype=torch.float64)
    for t, v in enumerate(values, start=1):
        with torch.no_grad():
            p.copy_(v)
        ema.update(t)
        d = (0.0, 2 / 11, 0.2)[t - 1]
        expected = d * expected + (1 - d) * v.double()
        torch.testing.assert_close(ema.shadow["unet.x.A"].double(), expected)
    raw = p.detach().clone()
    with ema.applied():
        assert torch.equal(p.detach(), ema.shadow["unet.x.A"])
    assert torch.equal(p.detach(), raw)


def test_checkpoints_refuse_a_resume_that_toggles_ema_or_loraplus(tmp_path):
    """An average cannot continue from a checkpoint without one; LoRA+ has optimizer groups of its own."""
    from dora_diffusion.training.errors import CheckpointError
    from dora_diffusion.training.output.checkpoint import TrainingState, load_checkpoint, save_checkpoint

    named = [(f"unet.x.adapters.default.{k}", nn.Parameter(torch.ones(2))) for k in ("A", "B", "magnitude")]

    def optimizer(ratio):
        args = argparse.Namespace(learning_rate=1e-3, text_encoder_lr=1e-3, optimizer="adamw", adam_weight_decay=0.0,
                                  magnitude_lr=None, loraplus_lr_ratio=ratio)  # fmt: skip
        opt = torch.optim.AdamW(param_groups(named, args))
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)

    ema = AdapterEMA(named, 0.9)
    with torch.no_grad():
        ema.shadow["unet.x.adapters.default.B"].fill_(0.5)
    plain = save_checkpoint(tmp_path, TrainingState(1, 2, 1, 1, 2, 0), named, *optimizer(None))
    with pytest.raises(CheckpointError, match=r"--use_ema: checkpoint .*checkpoint-1 has no ema_state.safetensors"):
        load_checkpoint(plain, named, *optimizer(None), ema=AdapterEMA(named, 0.9))
    with pytest.raises(CheckpointError, match=r"groups of sizes \[2, 1\], this run \[1, 1, 1\].*--loraplus_lr_ratio"):
        load_checkpoint(plain, named, *optimizer(4.0))
    averaged = save_checkpoint(tmp_path, TrainingState(2, 4, 1, 1, 2, 0), named, *optimizer(4.0), ema_state=ema.state_dict())
    restored = AdapterEMA(named, 0.9)
    load_checkpoint(averaged, named, *optimizer(4.0), ema=restored)
    assert restored.shadow["unet.x.adapters.default.B"].tolist() == [0.5, 0.5]
    assert load_checkpoint(averaged, named, *optimizer(4.0)).global_step == 2  # without --use_ema: the average is left


# ---------------------------------------------------------------- flags
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--keep_tokens", "1"], "--keep_tokens 1 does nothing without --shuffle_caption"),
        (["--min_timestep", "500", "--max_timestep", "500"], "--min_timestep 500 must be below --max_timestep 500"),
        (["--use_ema", "--ema_decay", "1"], "--ema_decay must be in (0, 1), got 1.0"),
        (["--loraplus_lr_ratio", "0"], "--loraplus_lr_ratio must be positive, got 0.0"),
        (["--caption_dropout_rate", "1"], "--caption_dropout_rate must be in [0, 1), got 1.0"),
        (["--loss_type", "huber", "--huber_c", "0"], "--huber_c must be in (0, 1]"),
        (["--ema_decay", "0.99"], "--ema_decay does nothing without --use_ema; add --use_ema or drop --ema_decay"),
        (["--huber_c", "0.2"], "--huber_c does nothing with --loss_type l2; pass --loss_type huber or smooth_l1"),
        (["--loss_type", "l1", "--huber_schedule", "snr"], "--huber_schedule does nothing with --loss_type l1"),
    ],
)
def test_bad_option_values_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--dataset", "x", *argv])
    assert message in capsys.readouterr().err


def test_a_run_recorded_before_these_flags_trained_with_their_defaults():
    """An output folder of an older version has none of these settings: they are not named as differences."""
    from dora_diffusion.training.args import OTHER_TRAINERS_DEFAULTS, run_settings
    from dora_diffusion.training.output.rundir import all_differences

    settings = run_settings(parse_args(["--dataset", "x"]))
    assert {k: settings[k] for k in OTHER_TRAINERS_DEFAULTS} == OTHER_TRAINERS_DEFAULTS
    older = {k: v for k, v in settings.items() if k not in OTHER_TRAINERS_DEFAULTS}
    assert all_differences(older, settings) == {}
    assert all_differences(older, run_settings(parse_args(["--dataset", "x", "--use_ema"]))) == {"use_ema": (False, True)}


def test_the_model_card_names_the_options_in_use():
    from dora_diffusion.training.args import run_settings
    from dora_diffusion.training.output.model_card import model_card

    def card(*flags):
        return model_card(run_settings(parse_args(["--dataset", "x", *flags])), "me/x", ["TOK"], [], "1 parameter", [])

    plain = card()
    assert not any(w in plain for w in ("EMA", "LoRA+", "Huber", "caption dropout", "timestep", "| loss |"))
    used = card("--use_ema", "--loraplus_lr_ratio", "16", "--loss_type", "huber", "--caption_dropout_rate", "0.1", "--max_timestep", "800")
    for row in ("| EMA of the adapter (the file holds it) | `True` |", "| EMA decay | `0.995` |", "| loss | `huber` |",
                "| Huber c | `0.1` |", "| Huber schedule | `snr` |", "| LoRA+ ratio (B's learning rate / A's) | `16.0` |",
                "| caption dropout | `0.1` |", "| timesteps below | `800` |"):  # fmt: skip
        assert row in used, row


# ---------------------------------------------------------------- one run, and its resume
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("options")
    save_tiny_sdxl_pipeline(root / "model")
    make_toy_imagefolder(root / "data", n=3, caption="TOK, toy, red, round")
    return root


OPTIONS = [
    "--use_ema", "--ema_decay", "0.1", "--loraplus_lr_ratio", "4", "--caption_dropout_rate", "0.5", "--seed", "3",
    "--shuffle_caption", "--keep_tokens", "1", "--min_timestep", "450", "--max_timestep", "460", "--gradient_accumulation_steps", "1",
    "--loss_type", "huber", "--huber_schedule", "constant", "--huber_c", "0.2",
    "--validation_prompt", "TOK", "--validation_steps", "2", "--num_validation_images", "1", "--checkpointing_steps", "1",
]  # fmt: skip
PROBE = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.adapters.default.B"


def _run_recording(work, output, monkeypatch, *extra, steps=2):
    """Train with ``OPTIONS`` and record what reaches the step: captions, timesteps, the loss's kind and threshold,
    and the probe tensor the validation renders with (``render`` replaced by a blank image)."""
    from test_training_e2e import argv, run

    from dora_diffusion.training import run as training_run
    from dora_diffusion.training.step import step as training_step

    seen = {"captions": [], "timesteps": [], "loss": [], "validated": []}
    real_loss, real_predict, real_micro = training_step.denoising_loss, training_step.predict, training_run.micro_batch_loss

    def micro(batch, components, *a):
        seen["captions"].append((batch["index"].tolist(), list(batch["captions"])))
        return real_micro(batch, components, *a)

    def predict(*a, **kw):
        seen["timesteps"].append(a[4].clone())
        return real_predict(*a, **kw)

    def loss(*a):
        seen["loss"].append((a[9], a[10].clone()))
        return real_loss(*a)

    def render(pipe, prompt, n, *a):
        seen["validated"].append(pipe.unet.get_parameter(PROBE.removeprefix("unet.")).detach().clone())
        return [Image.new("RGB", (64, 64))] * n

    monkeypatch.setattr(training_run, "micro_batch_loss", micro)
    monkeypatch.setattr(training_step, "predict", predict)
    monkeypatch.setattr(training_step, "denoising_loss", loss)
    monkeypatch.setattr(training_run, "render", render)
    out, stdout = run(argv(work, output, *OPTIONS, *extra, steps=steps))
    return out, stdout, seen


def _ckpt(out, step: int) -> tuple[dict, dict]:
    return load_file(out / f"checkpoint-{step}" / "adapter_state.safetensors"), load_file(out / f"checkpoint-{step}" / "ema_state.safetensors")


@pytest.mark.exactness
def test_options_reach_the_step_and_a_resume_is_bit_identical(work, monkeypatch):
    out, stdout, seen = _run_recording(work, "straight", monkeypatch)
    assert "EMA decay 0.1, LoRA+ B lr x4, caption dropout 0.5, shuffled tags (first 1 kept), timesteps [450, 460), huber loss c 0.2 (constant)" in stdout
    # captions: drawn from (seed, epoch, index); 3 images, 1 per micro-batch: micro-batch j is in epoch j // 3 (seed 3:
    # the first caption is shuffled, the second dropped)
    originals = ["TOK, toy, red, round" + d for d in ("", ", close-up", ", plain background")]
    for j, (indices, captions) in enumerate(seen["captions"]):
        assert captions == draw_batch_captions([originals[i] for i in indices], indices, 3, j // 3, 0.5, True, 1)
    flat = [c for _, cs in seen["captions"] for c in cs]
    assert "" in flat and any(c and c not in originals for c in flat)  # both draws happened
    steps = torch.cat(seen["timesteps"])
    assert len(steps) == 2 and 450 <= int(steps.min()) and int(steps.max()) < 460  # by chance: 0.01 ** 2
    assert all(kind == "huber" and torch.equal(c, torch.full_like(c, 0.2)) for kind, c in seen["loss"])
    # LoRA+: the optimizer's B groups start at 4 x the rate of A
    groups = {g["name"]: g["initial_lr"] for g in torch.load(out / "checkpoint-1" / "optimizer.pt")["param_groups"]}
    assert groups["unet.B"] == pytest.approx(4 * groups["unet.lowrank"]) and groups["unet.magnitude"] == groups["unet.lowrank"]
    # EMA: step 1 copies, step 2 averages with d = min(0.1, 2/11); validation and every written file use the average
    raw1, ema1 = _ckpt(out, 1)
    raw2, ema2 = _ckpt(out, 2)
    assert all(torch.equal(raw1[k], ema1[k]) for k in raw1)
    for k in raw2:
        torch.testing.assert_close(ema2[k], 0.1 * raw1[k] + 0.9 * raw2[k])
    assert not torch.equal(ema2[PROBE], raw2[PROBE])
    assert len(seen["validated"]) == 1 and torch.equal(seen["validated"][0], ema2[PROBE])  # at step 2, the end
    final = load_file(out / "pytorch_lora_weights.safetensors")
    file_key = PROBE.replace(".adapters.default.B", ".lora_B.weight")
    assert torch.equal(final[file_key], ema2[PROBE])
    assert torch.equal(load_file(out / "checkpoint-2" / "pytorch_lora_weights.safetensors")[file_key], ema2[PROBE])
    # the raw weights train on: a resume from checkpoint-1 ends bit-identical, average and all
    resumed, stdout, _ = _run_recording(
        work, "resumed", monkeypatch, "--resume_from_checkpoint", str(out / "checkpoint-1"), "--validation_prompt", "none"
    )
    assert "at step 1" in stdout
    again = load_file(resumed / "pytorch_lora_weights.safetensors")
    assert final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)
    raw2b, ema2b = _ckpt(resumed, 2)
    assert all(torch.equal(raw2[k], raw2b[k]) and torch.equal(ema2[k], ema2b[k]) for k in raw2)
    # --use_ema from a checkpoint without an average stops before any model loads
    from test_training_e2e import argv

    from dora_diffusion.training import CheckpointError, main
    from dora_diffusion.training import run as training_run

    plain = work / "plain" / "checkpoint-1"
    shutil.copytree(out / "checkpoint-1", plain)
    (plain / "ema_state.safetensors").unlink()
    monkeypatch.setattr(training_run, "load_components", lambda *a: pytest.fail("models loaded"))
    with pytest.raises(CheckpointError, match=r"--use_ema: checkpoint .*checkpoint-1 has no ema_state.safetensors"):
        main(argv(work, "plain-resumed", *OPTIONS, "--resume_from_checkpoint", str(plain)))
