"""Which of the training script's own flags learn a toy-world subject or style (issue 33 items 1-2), and which UNet
layers can draw a detail of a given size.

    python benchmarks/bench_reach.py --layers                               # the UNet's layers by resolution
    python benchmarks/bench_reach.py --out bench-reach --target ring_star    # the configurations below, seed 0
    python benchmarks/bench_reach.py --out bench-reach --target icon --configs "attn r4 150" --seeds 0,1,2

Every target x configuration x seed is one run of ``dora_diffusion.training.main`` (train_dreambooth_dora.py) on the
shipped toy-world model: the demo's recipe (DoRA, AdamW 2e-3, 4 images per step, cached latents, ``attn``) with
the configuration's flags on top (each names its rank), on the target's 6 instance images. The adapter folder is loaded with
``load_dora_weights`` and scored by ``toyworld.score`` on 8 trigger prompts the instances never show (seeds 100-107)
and 4 class prompts (seeds 200-203), 20 Euler steps, guidance 4:

- a subject (``toyworld.SUBJECTS``): subject fidelity and prompt fidelity on the trigger prompts, prior preservation
  on the class prompts (over backgrounds the instances never show, as bench_quality.py);
- a style (``toyworld.styles.STYLES``): style fidelity and object fidelity on "a tok icon of <object> on <background>"
  for 8 objects the instances never show (``styles.eval_objects``), style preservation on 4 of their plain captions.

Rows go to ``OUT/runs.csv`` as runs finish (a rerun skips them), images to ``OUT/images``; ``base`` is the untrained
model. ``--grid PNG``: per target its training images, then a row per configuration (seed 0; columns 1-8 trigger
prompts, 9-12 class prompts).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS: dict[str, list[str]] = {
    "attn r4 100": ["--rank", "4", "--max_train_steps", "100"],
    "attn r4 200": ["--rank", "4", "--max_train_steps", "200"],
    "attn r4 300": ["--rank", "4", "--max_train_steps", "300"],
    "attn r4 150": ["--rank", "4", "--max_train_steps", "150"],  # the demo's recipe at rank 4 (the demo trains rank 8)
    "all r4 50": ["--unet_targets", "all", "--rank", "4", "--max_train_steps", "50"],
    "all r4 100": ["--unet_targets", "all", "--rank", "4", "--max_train_steps", "100"],  # the style test's recipe
    "attn r8 400": ["--rank", "8", "--max_train_steps", "400"],
    "attn_ff r8 400": ["--unet_targets", "attn_ff", "--rank", "8", "--max_train_steps", "400"],
    "all r8 400": ["--unet_targets", "all", "--rank", "8", "--learning_rate", "1e-3", "--max_train_steps", "400"],
    "all r8 800": ["--unet_targets", "all", "--rank", "8", "--learning_rate", "1e-3", "--max_train_steps", "800"],
    "all r8 400 + prior": ["--unet_targets", "all", "--rank", "8", "--learning_rate", "1e-3", "--max_train_steps", "400",
                           "--with_prior_preservation", "--num_class_images", "12", "--prior_generation_steps", "20"],
}  # fmt: skip
"""Configuration -> flags added to the demo's recipe (a later flag wins over the recipe's)."""
FIELDS = ("target", "config", "seed", "fidelity", "prompt_fidelity", "preservation", "train_s")


def target_of(name: str):
    """A subject or a style by name."""
    from dora_diffusion.toyworld import SUBJECTS
    from dora_diffusion.toyworld.styles import STYLES

    if name in SUBJECTS:
        return SUBJECTS[name]
    if name in STYLES:
        return STYLES[name]
    raise SystemExit(f"unknown target {name!r}; one of {sorted(SUBJECTS) + sorted(STYLES)}")


def prompts_of(target) -> tuple[list[str], list[str]]:
    """The 8 trigger prompts and 4 class prompts a target is scored on."""
    from dora_diffusion.toyworld.styles import Style, eval_objects

    if isinstance(target, Style):
        objects = eval_objects(target)
        return [target.prompt(*o) for o in objects], [target.class_prompt(*o) for o in objects[:4]]
    from bench_quality import eval_prompts

    trigger, _, klass, _ = eval_prompts(target)
    return trigger, klass


def train(target, config: str, seed: int, work: Path) -> Path:
    """One run of the training script; returns its output folder."""
    from dora_diffusion.demo import TRAIN_FLAGS
    from dora_diffusion.toyworld import PIPELINE_DIR, make_subject_dataset
    from dora_diffusion.toyworld.styles import Style, make_style_dataset
    from dora_diffusion.training import main

    data = work / f"data-{target.name}"
    if not data.exists():
        (make_style_dataset if isinstance(target, Style) else make_subject_dataset)(data, target)
    out = work / f"{target.name}-{config.replace(' ', '_').replace('+', 'p')}-{seed}"
    extra = list(CONFIGS[config])
    if "--with_prior_preservation" in extra:
        if isinstance(target, Style):
            raise SystemExit(f"{config!r}: a style has no single class prompt; run the configurations without prior")
        extra += ["--class_prompt", target.class_prompt, "--class_data_dir", str(work / f"class-{target.name}")]
    if (out / "pytorch_lora_weights.safetensors").is_file() and (out / "training_args.json").is_file():
        return out  # trained before (by --train_only, or by a run that stopped before scoring)
    argv = ["--pretrained_model_name_or_path", str(PIPELINE_DIR), "--dataset", str(data), "--output_dir", str(out),
            "--overwrite_output_dir", *TRAIN_FLAGS, "--seed", str(seed), *extra]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        main(argv)
    return out


def eval_batch(target, repeats: int = 1) -> tuple[list[str], list[str], list[int], list[int]]:
    """The trigger prompts, class prompts and their seeds a target is scored on: every prompt of ``prompts_of`` drawn
    ``repeats`` times, trigger seeds 100 to 100 + 8 * repeats - 1, class seeds 200 to 200 + 4 * repeats - 1. The draws
    of ``repeats=1`` are the first of any larger count: more repeats read the same run more finely, not another test."""
    if not 1 <= repeats <= 12:
        raise ValueError(f"repeats must be 1 to 12 (trigger seeds must stay below the class seeds 200+), got {repeats}")
    trigger, klass = prompts_of(target)
    trigger, klass = trigger * repeats, klass * repeats
    return trigger, klass, list(range(100, 100 + len(trigger))), list(range(200, 200 + len(klass)))


def evaluate(target, adapter: Path | None, save_to: Path | None = None, repeats: int = 1) -> dict[str, float]:
    """Fidelity, prompt (object) fidelity and preservation of ``adapter`` (``None``: the base model) on
    ``eval_batch(target, repeats)``; the images are saved in ``save_to`` (the trigger prompts, then the class prompts)."""
    from dora_diffusion import toyworld
    from dora_diffusion.toyworld.finetune import sample
    from dora_diffusion.toyworld.styles import Style

    trigger, klass, trigger_seeds, class_seeds = eval_batch(target, repeats)
    pipe = toyworld.load_pipeline()
    if adapter is not None:
        pipe.load_dora_weights(adapter)
    images = sample(pipe, pipe.unet, trigger + klass, trigger_seeds + class_seeds)
    if save_to is not None:
        save_to.mkdir(parents=True, exist_ok=True)
        for k, image in enumerate(images):
            image.save(save_to / f"{k:02d}.png")
    if isinstance(target, Style):
        on_trigger = toyworld.score(images[: len(trigger)], trigger, style=target)
        on_class = toyworld.score(images[len(trigger) :], klass, style=target)
        return {"fidelity": on_trigger["style_fidelity"], "prompt_fidelity": on_trigger["object_fidelity"],
                "preservation": on_class["style_preservation"]}  # fmt: skip
    on_trigger = toyworld.score(images[: len(trigger)], trigger, target)
    on_class = toyworld.score(images[len(trigger) :], klass, target)
    return {"fidelity": on_trigger["subject_fidelity"], "prompt_fidelity": on_trigger["prompt_fidelity"],
            "preservation": on_class["prior_preservation"]}  # fmt: skip


def layer_table() -> str:
    """Per UNet block of the toy model, the latent resolution its attention and convolution modules work at (and how
    many image pixels one latent feature spans: the VAE downsamples by 4)."""
    from dora_diffusion import toyworld
    from dora_diffusion.core.inject import find_targets

    unet = toyworld.load_pipeline().unet
    sizes: dict[str, tuple[int, ...]] = {}
    modules = dict(unet.named_modules())
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: sizes.__setitem__(n, tuple(i[0].shape)))
             for n in find_targets(unet, "all")]  # fmt: skip
    with torch.no_grad():
        unet(torch.zeros(1, 4, 16, 16), 500, torch.zeros(1, 77, 128),
             added_cond_kwargs={"text_embeds": torch.zeros(1, 64), "time_ids": torch.zeros(1, 6)})  # fmt: skip
    for h in hooks:
        h.remove()
    attn_ff = set(find_targets(unet, "attn_ff"))
    by_block: dict[str, dict[str, set[int]]] = {}
    for name, shape in sizes.items():
        parts = name.split(".")
        block = ".".join(parts[:2]) if parts[0] in ("down_blocks", "up_blocks") else parts[0]
        if len(shape) == 2:  # time_emb_proj reads the time embedding: no place in the image
            continue
        if len(shape) == 4:  # Conv2d input (1, C, H, W)
            side = shape[2]
        elif shape[1] == 77:  # cross-attention's to_k / to_v read the text tokens
            continue
        else:  # a transformer's Linear input (1, H * W, C)
            side = round(shape[1] ** 0.5)
        kind = "attention" if name in attn_ff else "convolution"
        by_block.setdefault(block, {"attention": set(), "convolution": set()})[kind].add(side)
    lines = ["| block | attention modules (`attn`, `attn_ff`) at | convolutions (`all` only) at |", "|---|---|---|"]

    def cells(sides: set[int]) -> str:
        return ", ".join(f"{s} x {s} ({4 * 16 // s} px)" for s in sorted(sides, reverse=True)) or "none"

    for block, kinds in by_block.items():
        lines.append(f"| {block} | {cells(kinds['attention'])} | {cells(kinds['convolution'])} |")
    return "\n".join(lines)


def run_folder(work: Path, target: str, config: str, seed: int) -> Path:
    return work / "images" / f"{target}-{config.replace(' ', '_').replace('+', 'p')}-{seed}"


def training_row(name: str) -> tuple[str, list]:
    """A grid row of target ``name``'s training (instance) images."""
    from dora_diffusion.toyworld import instance_scenes, render
    from dora_diffusion.toyworld.styles import Style, render_look, style_instances

    target = target_of(name)
    if isinstance(target, Style):
        return f"{name}\ntraining images", [render_look(s, target.look) for s in style_instances(target)]
    return f"{name}\ntraining images", [render(s) for s in instance_scenes(target, 6)]


def draw_rows(rows: list[tuple[str, list]], path: Path) -> Path:
    """One row per (label, images): 8 trigger images, a gap, 4 class images (or a target's instance images)."""
    from PIL import Image, ImageDraw

    cell, label = 64, 150
    grid = Image.new("RGB", (label + 12 * cell + 8, len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for i, (text, images) in enumerate(rows):
        draw.text((4, i * cell + 18), text, fill="black")
        for k, image in enumerate(images):
            grid.paste(image.resize((cell, cell)), (label + k * cell + (8 if k >= 8 else 0), i * cell))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def picture_grid(work: Path, targets: list[str], configs: list[str], path: Path) -> Path:
    """Per target: its instance images, then one row per configuration (seed 0): 8 trigger and 4 class images."""
    from PIL import Image

    rows: list[tuple[str, list]] = []
    for name in targets:
        rows.append(training_row(name))
        for config in configs:
            folder = run_folder(work, name, config, 0)
            if folder.is_dir():
                rows.append((f"{name}\n{config}", [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))]))
    return draw_rows(rows, path)


def vae_ceiling(subject_name: str) -> str:
    """Subject fidelity of a subject's 6 instance images (seed 1) rendered, and after the shipped VAE's round trip."""
    from dora_diffusion import toyworld
    from dora_diffusion.toyworld.score import images_to_tensor
    from dora_diffusion.toyworld.style_reader import vae_round_trip
    from dora_diffusion.toyworld.subjects import instance_caption

    subject = toyworld.SUBJECTS[subject_name]
    scenes = toyworld.instance_scenes(subject, 6, seed=1)
    images = images_to_tensor([toyworld.render(s) for s in scenes])
    prompts = [instance_caption(subject, s) for s in scenes]
    rendered = toyworld.score(images.permute(0, 2, 3, 1).numpy(), prompts, subject)["subject_fidelity"]
    through = toyworld.score(vae_round_trip(images).permute(0, 2, 3, 1).numpy(), prompts, subject)["subject_fidelity"]
    return f"{subject_name} instances: subject fidelity {rendered:.3f} rendered, {through:.3f} after the VAE's round trip"


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{**r, "seed": int(r["seed"]), **{k: float(r[k]) for k in FIELDS[3:]}} for r in csv.DictReader(f)]


def report(rows: list[dict]) -> str:
    lines = ["| target | configuration | seeds | fidelity | prompt / object fidelity | preservation | train s |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for target in dict.fromkeys(r["target"] for r in rows):
        for config in dict.fromkeys(r["config"] for r in rows if r["target"] == target):
            sel = [r for r in rows if r["target"] == target and r["config"] == config]
            cells = [" / ".join(f"{r[k]:.2f}" for r in sel) if len(sel) <= 3 else f"{statistics.mean(r[k] for r in sel):.2f}"
                     for k in FIELDS[3:6]]  # fmt: skip
            train_s = statistics.mean(r["train_s"] for r in sel)
            lines.append(f"| {target} | {config} | {','.join(str(r['seed']) for r in sel)} | " + " | ".join(cells) + f" | {train_s:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="Work folder; runs.csv there makes an interrupted run resume.")
    ap.add_argument("--target", default="ring_star", help="A subject or style name (comma-separated for several).")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="Comma-separated configurations (and 'base').")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--layers", action="store_true", help="Print the UNet's adaptable layers by resolution and stop.")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train_only", action="store_true", help="Train the runs, score none (a later call scores them).")
    ap.add_argument("--grid_only", action="store_true", help="Run nothing new: only --grid, from the runs there are.")
    ap.add_argument("--grid", default=None, help="Also write a picture grid PNG here (seed 0 of each configuration).")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.layers:
        print(layer_table())
        print(vae_ceiling("ring_star"))
        return
    if not args.out:
        ap.error("--out is required unless --layers")
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    path = work / "runs.csv"
    rows = read_rows(path)
    done = {(r["target"], r["config"], r["seed"]) for r in rows}
    start = time.perf_counter()
    for name in [] if args.grid_only else args.target.split(","):
        target = target_of(name)
        for config in (c for c in args.configs.split(",") if c):
            if config != "base" and config not in CONFIGS:
                raise SystemExit(f"unknown configuration {config!r}; one of {['base', *CONFIGS]}")
            for seed in [0] if config == "base" else [int(s) for s in args.seeds.split(",")]:
                if (name, config, seed) in done:
                    continue
                t0 = time.perf_counter()
                adapter = None if config == "base" else train(target, config, seed, work)
                train_s = time.perf_counter() - t0
                if args.train_only:
                    continue
                figures = evaluate(target, adapter, run_folder(work, name, config, seed))
                row = {"target": name, "config": config, "seed": seed, **figures, "train_s": train_s}
                new = not path.exists()
                with open(path, "a", newline="") as f:
                    writer = csv.DictWriter(f, FIELDS)
                    if new:
                        writer.writeheader()
                    writer.writerow(row)
                rows.append(row)
                print(f"[{time.perf_counter() - start:.0f} s] {name} / {config} / seed {seed}: fidelity "
                      f"{row['fidelity']:.2f}, prompt {row['prompt_fidelity']:.2f}, preservation {row['preservation']:.2f}",
                      flush=True)  # fmt: skip
    print(report(rows))
    if args.grid_only and not args.grid:
        ap.error("--grid_only needs --grid PNG")
    if args.grid:
        configs = [c for c in args.configs.split(",") if c]
        for name in args.target.split(","):  # runs scored before images were kept: sample them again from the adapter
            for config in configs:
                adapter = None if config == "base" else work / f"{name}-{config.replace(' ', '_').replace('+', 'p')}-0"
                if not run_folder(work, name, config, 0).is_dir() and (adapter is None or adapter.is_dir()):
                    evaluate(target_of(name), adapter, run_folder(work, name, config, 0))
        print(f"wrote {picture_grid(work, args.target.split(','), configs, Path(args.grid))}")


if __name__ == "__main__":
    main()
