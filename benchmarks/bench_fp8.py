"""``--fp8_base`` (issue 31 item 3): memory on the full-size SDXL UNet, and what a float8 base does to a DoRA adapter.

    python benchmarks/bench_fp8.py memory                 # SDXL UNet from config (random weights), CPU, about 6 GiB of RAM
    python benchmarks/bench_fp8.py memory --latent 32 --targets attn
    python benchmarks/bench_fp8.py toyworld --out bench-fp8   # 2 subjects x 3 seeds x 2 runs of 150 steps, 5 renders each (not timed)

``memory``: each case in a fresh process (``pin_malloc``: resident memory tracks live tensors). The UNet is built
from SDXL's config in bf16 (``bench_unet.SDXL_UNET``), frozen; ``bf16`` keeps it so, ``fp8`` converts every
Linear/Conv2d to float8 e4m3fn with its per-channel scale (``core/fp8.to_float8``, computing in bf16). Then a rank-8
DoRA adapter on ``--targets``, as ``train_dreambooth_dora.py`` puts it (gradient checkpointing on, ``set_recompute
none``), and one training step under bf16 autocast at a ``--latent`` x ``--latent`` latent, batch 1. Reported: the
weights' bytes (parameters and buffers), resident memory after building, and the step's peak resident memory above
the resident memory before it (one step after a warm-up step; ``common.peak_bytes``).

``toyworld``: for each subject and seed, DoRA trained through ``train_dreambooth_dora.py`` with the demo's recipe
(fp32), once on the full-precision base and once with ``--fp8_base``. The fp8-trained adapter is rendered on the
full-precision base (what a user who loads it gets) and on the float8 base it was trained against (what its
validation showed); the differences between the two are the cost of DoRA's magnitude having been learnt against
another ``W0``. The scorer's change is paired per (subject, seed); the full-precision run is the yardstick.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METRICS = ("subject_fidelity", "prompt_fidelity", "prior_preservation")
REPEATS = 1
"""Measured training steps after the warm-up step (the peak of a step is the same each step; 1 keeps a CPU run short)."""


# ---------------------------------------------------------------------------------------------- memory
def memory_case(base: str, latent: int, targets: str, rank: int) -> dict:
    """One case, in this process: weight bytes, resident memory and a training step's peak."""
    from bench_unet import SDXL_UNET, step, unet_inputs
    from diffusers import UNet2DConditionModel
    from common import _status, peak_bytes, pin_malloc

    from dora_diffusion import AdapterConfig, add_adapter, trainable_parameters
    from dora_diffusion.core.fp8 import to_float8, weight_bytes
    from dora_diffusion.core.inject import set_recompute

    pin_malloc()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: no 10 GiB fp32 copy on the way
    unet = UNet2DConditionModel(**SDXL_UNET)
    torch.set_default_dtype(torch.float32)
    unet.requires_grad_(False)
    unet.enable_gradient_checkpointing()
    unet.train()
    norm_dev = None
    if base == "fp8":
        layers = lambda: {n: m for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}  # noqa: E731
        before = {n: row_norms(m.weight) for n, m in layers().items()}
        to_float8(unet)
        dev = torch.cat([(row_norms(m.weight) / before[n] - 1).abs() for n, m in layers().items()])
        norm_dev = (float(dev.mean()), float(dev.max()))
    weights = weight_bytes(unet)
    add_adapter(unet, AdapterConfig(rank=rank, use_dora=True, targets=targets), "dora")
    set_recompute(unet, "none")
    params = trainable_parameters(unet, "dora")
    inputs = unet_inputs(latent, "cpu", torch.bfloat16)
    resident = _status("VmRSS")
    step(unet, inputs, params, torch.bfloat16)  # warm-up: norms cached, allocator settled
    peak = peak_bytes(lambda: step(unet, inputs, params, torch.bfloat16), repeats=REPEATS)
    return {"base": base, "weights": weights, "resident": resident, "step_peak": peak, "row_norm_change": norm_dev}


def row_norms(w: torch.Tensor) -> torch.Tensor:
    """``||row_i(W)||`` in fp32, (d_out,): DoRA's initial magnitude of a layer with this weight."""
    return w.detach().float().reshape(w.shape[0], -1).norm(dim=1)


def memory(args) -> None:
    rows = []
    for base in ("bf16", "fp8"):
        cmd = [sys.executable, __file__, "memory-case", "--base", base, "--latent", str(args.latent),
               "--targets", args.targets, "--rank", str(args.rank)]  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    gib = 2**30
    print(f"\nSDXL UNet (from config, random weights), rank-{args.rank} DoRA on {args.targets}, "
          f"{args.latent}x{args.latent} latent, batch 1, bf16 autocast, gradient checkpointing; CPU\n")  # fmt: skip
    print("| base | weights GiB | resident after build GiB | training step peak above resident GiB |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['base']} | {r['weights'] / gib:.2f} | {r['resident'] / gib:.2f} | {r['step_peak'] / gib:.2f} |")
    dev = rows[-1]["row_norm_change"]
    print(f"\nRow norms ||row(W~)|| / ||row(W)|| - 1 over every Linear/Conv2d weight: mean {dev[0]:.2e}, max {dev[1]:.2e}")


# ---------------------------------------------------------------------------------------------- toy world
def train(subject, seed: int, work: Path, fp8: bool, steps: int) -> Path:
    from dora_diffusion.demo import TRAIN_FLAGS
    from dora_diffusion.toyworld import PIPELINE_DIR, make_subject_dataset
    from dora_diffusion.training import main

    data = work / f"data-{subject.name}"
    if not data.exists():
        make_subject_dataset(data, subject, n=6)
    out = work / f"{subject.name}-{'fp8' if fp8 else 'full'}-{seed}"
    argv = ["--pretrained_model_name_or_path", str(PIPELINE_DIR), "--dataset", str(data), "--output_dir", str(out),
            "--overwrite_output_dir", "--max_train_steps", str(steps), *TRAIN_FLAGS, "--rank", "4", "--seed", str(seed),
            *(["--fp8_base"] if fp8 else [])]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        main(argv)
    return out


def loaded(adapter: Path | None, fp8_base: bool):
    """The toy-world pipeline on its full-precision or float8 base (UNet and both text encoders, as --fp8_base stores
    them), with ``adapter`` loaded."""
    from dora_diffusion import toyworld
    from dora_diffusion.core.fp8 import to_float8

    pipe = toyworld.load_pipeline()
    if fp8_base:
        for model in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
            to_float8(model.requires_grad_(False))
    if adapter is not None:
        pipe.load_dora_weights(adapter)
    return pipe


def render(subject, pipe) -> tuple[np.ndarray, dict]:
    """The eval prompts' images (N, H, W, 3) in [0, 1] and their scores."""
    from bench_quality import eval_prompts

    from dora_diffusion import toyworld
    from dora_diffusion.toyworld.finetune import sample

    trigger, t_seeds, klass, c_seeds = eval_prompts(subject)
    images = sample(pipe, pipe.unet, trigger + klass, t_seeds + c_seeds)
    on_trigger = toyworld.score(images[:8], trigger, subject)
    on_class = toyworld.score(images[8:], klass, subject)
    scores = {"subject_fidelity": on_trigger["subject_fidelity"], "prompt_fidelity": on_trigger["prompt_fidelity"],
              "prior_preservation": on_class["prior_preservation"]}  # fmt: skip
    return np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images]), scores


@torch.no_grad()
def correct_magnitudes(full_pipe, fp8_pipe) -> tuple[float, float]:
    """Rescale the magnitudes of the adapter on ``full_pipe`` by ``||W0_full + sBA|| / ||W0_fp8 + sBA||`` per channel,
    so its ``g = m / n`` is the one it was trained with on the float8 base; returns the mean and max of
    ``|ratio - 1|`` over every adapted channel (how far the loaded ``g`` is from the trained one)."""
    from dora_diffusion.core.inject import adapted_layers

    full, fp8 = adapted_layers(full_pipe.unet), adapted_layers(fp8_pipe.unet)
    devs = []
    for name, layer in full.items():
        for adapter_name, adapter in layer.adapters.items():
            if adapter.magnitude is None:
                continue
            ratio = adapter.norm() / fp8[name].adapters[adapter_name].norm()  # (d_out,)
            devs.append((ratio - 1).abs())
            adapter.magnitude.mul_(ratio.to(adapter.magnitude.dtype).view_as(adapter.magnitude))
    dev = torch.cat(devs)
    return float(dev.mean()), float(dev.max())


def toyworld(args) -> None:
    from dora_diffusion.toyworld import SUBJECTS

    torch.set_num_threads(args.threads)
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.subjects.split(","):
        subject = SUBJECTS[name]
        base_full, _ = render(subject, loaded(None, False))
        base_fp8, _ = render(subject, loaded(None, True))
        for seed in (int(s) for s in args.seeds.split(",")):
            full = train(subject, seed, work, False, args.steps)
            fp8 = train(subject, seed, work, True, args.steps)
            img_full, s_full = render(subject, loaded(full, False))  # the yardstick: trained and used at full precision
            user_pipe, seen_pipe = loaded(fp8, False), loaded(fp8, True)
            img_user, s_user = render(subject, user_pipe)  # fp8-trained, loaded on the full-precision base
            img_seen, s_seen = render(subject, seen_pipe)  # fp8-trained, on the float8 base it learnt against
            g_mean, g_max = correct_magnitudes(user_pipe, seen_pipe)
            img_corr, s_corr = render(subject, user_pipe)  # on the full base with g as trained
            px = lambda a, b: float(np.abs(a - b).mean() * 255)  # noqa: E731
            top = lambda a, b: float(np.abs(a - b).max() * 255)  # noqa: E731
            row = {"subject": name, "seed": seed,
                   "user_vs_seen_mean": px(img_user, img_seen), "user_vs_seen_max": top(img_user, img_seen),
                   "user_vs_corrected_mean": px(img_user, img_corr), "user_vs_corrected_max": top(img_user, img_corr),
                   "user_vs_full_mean": px(img_user, img_full), "user_vs_full_max": top(img_user, img_full),
                   "base_fp8_vs_full_mean": px(base_fp8, base_full), "base_fp8_vs_full_max": top(base_fp8, base_full),
                   "g_dev_mean": g_mean, "g_dev_max": g_max,
                   **{f"full_{m}": s_full[m] for m in METRICS}, **{f"user_{m}": s_user[m] for m in METRICS},
                   **{f"seen_{m}": s_seen[m] for m in METRICS}, **{f"corr_{m}": s_corr[m] for m in METRICS}}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    (work / "rows.json").write_text(json.dumps(rows, indent=1))
    print(report(rows))


def report(rows: list[dict]) -> str:
    mean = lambda key: statistics.mean(r[key] for r in rows)  # noqa: E731
    big = lambda key: max(r[key] for r in rows)  # noqa: E731
    lines = [f"{len(rows)} pairs (subject x seed); pixel differences in 0-255 levels over the 12 eval images each "
             "(mean of the per-pair means; max over all)", "",
             "| comparison | mean abs pixel diff | max abs pixel diff |", "|---|---|---|",
             f"| fp8-trained DoRA on the full base: as loaded vs magnitudes corrected to the trained g | {mean('user_vs_corrected_mean'):.3f} | {big('user_vs_corrected_max'):.0f} |",
             f"| fp8-trained DoRA: on the full base vs on the float8 base | {mean('user_vs_seen_mean'):.2f} | {big('user_vs_seen_max'):.0f} |",
             f"| fp8-trained vs full-trained DoRA, both on the full base | {mean('user_vs_full_mean'):.2f} | {big('user_vs_full_max'):.0f} |",
             f"| no adapter: float8 base vs full base | {mean('base_fp8_vs_full_mean'):.2f} | {big('base_fp8_vs_full_max'):.0f} |",
             "", f"DoRA's g = m / ||W0 + sBA|| on the full base vs the float8 base: |ratio - 1| mean {mean('g_dev_mean'):.2e}, "
             f"max {big('g_dev_max'):.2e} over every adapted channel", "",
             "| scorer | full-trained, full base | fp8-trained, float8 base | fp8-trained, full base | fp8-trained, full "
             "base, g corrected | full base - float8 base (paired) |", "|---|---|---|---|---|---|"]  # fmt: skip
    for m in METRICS:
        diffs = [r[f"user_{m}"] - r[f"seen_{m}"] for r in rows]
        spread = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
        lines.append(f"| {m} | {mean(f'full_{m}'):.3f} | {mean(f'seen_{m}'):.3f} | {mean(f'user_{m}'):.3f} | "
                     f"{mean(f'corr_{m}'):.3f} | {statistics.mean(diffs):+.3f} (sd {spread:.3f}) |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="part", required=True)
    for name in ("memory", "memory-case"):
        p = sub.add_parser(name)
        p.add_argument("--latent", type=int, default=32)
        p.add_argument("--targets", default="attn")
        p.add_argument("--rank", type=int, default=8)
        if name == "memory-case":
            p.add_argument("--base", choices=("bf16", "fp8"), required=True)
    t = sub.add_parser("toyworld")
    t.add_argument("--out", required=True)
    t.add_argument("--subjects", default="dotted_heart,ring_star")
    t.add_argument("--seeds", default="0,1,2")
    t.add_argument("--steps", type=int, default=150)
    t.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.part == "memory":
        memory(args)
    elif args.part == "memory-case":
        print(json.dumps(memory_case(args.base, args.latent, args.targets, args.rank)))
    else:
        toyworld(args)


if __name__ == "__main__":
    main()
