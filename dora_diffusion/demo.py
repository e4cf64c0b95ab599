"""The offline CPU demo: a DoRA and a LoRA trained on a toy-world subject, side by side with the base model.

    python -m dora_diffusion.demo      # writes the grid PNG, prints where it is and each column's scores
    python app.py --demo               # the comparison page with both adapters loaded

No Hub and no GPU: the base model is the toy world's pretrained SDXL-architecture pipeline shipped in the
package (``dora_diffusion.toyworld``), which draws simple scenes but has never seen the subject (a pink heart
with white dots, trigger "zwx"). Both adapters are trained on the subject's six instance images by
``dora_diffusion.training.main`` (the code of ``train_dreambooth_dora.py``). Everything is cached in
``--cache_dir`` (default ``~/.cache/dora-diffusion/demo``), keyed by the recipe and the base weights, so a
second run reuses it. Each column is scored by ``toyworld.score``: subject fidelity (like DINO against the
instance images) and prompt fidelity (like CLIP-T).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dora_diffusion._version import __version__
from PIL import Image

from dora_diffusion.compare import (
    CellResult,
    ColumnScore,
    CompareError,
    Comparer,
    DifferenceMap,
    GenerationSettings,
    GridPlan,
    compose_grid,
    difference_grid,
    difference_maps,
    grid_infotext,
    load_base_pipeline,
    parse_seeds,
    save_png,
    score_columns,
)
from dora_diffusion.compare.grid_image import grid_zoom, stack_images, text_image
from dora_diffusion.compare.scores import ToyWorldScorer
from dora_diffusion.extras import MissingExtraError, require
from dora_diffusion.formats import DEFAULT_WEIGHT_NAME
from dora_diffusion.toyworld import PIPELINE_DIR, RESOLUTION, SUBJECTS, make_subject_dataset

SUBJECT = SUBJECTS["dotted_heart"]
"""The subject where DoRA and LoRA differ measurably in the toy world's sweep v2 (docs/quality.md): on ``attn`` at
this recipe DoRA's subject fidelity is higher by +0.028 +- 0.011 over 120 pairs (20-50 seeds a rank), resolved at
rank 8, the demo's rank (``SWEEP_GAP``), and at rank 1; at rank 4 it is +0.008 +- 0.018."""
SWEEP_GAP = "+0.024 ± 0.017"
"""DoRA - LoRA subject fidelity at the demo's recipe (rank 8) over 20 training seeds, 95% interval: sweep v2's row
``attn | 8 | dotted_heart`` (docs/quality.md; tests/test_sweep_report.py checks it against the committed rows)."""
PROMPT = f"{SUBJECT.instance_prompt} on a striped background"
"""The grid's prompt: the subject on the one background none of its instance images has."""
SEEDS = "0-3"
STEPS = 20
"""Denoising steps of the demo grid."""
GUIDANCE = 4.0
TRAIN_STEPS = 150
N_IMAGES = 6
TRAIN_FLAGS = (
    "--resolution", str(RESOLUTION),
    "--rank", "8",
    "--learning_rate", "2e-3",
    "--train_batch_size", "4",
    "--gradient_accumulation_steps", "1",
    "--cache_latents",
    "--checkpointing_steps", "0",
    "--no_gradient_checkpointing",
    "--mixed_precision", "no",
    "--report_to", "none",
    "--validation_prompt", "none",
    "--seed", "0",
)  # fmt: skip
"""Training flags shared by both demo adapters (besides paths, ``--adapter`` and ``--max_train_steps``)."""


@dataclass(frozen=True)
class DemoAssets:
    """The cached demo: the base model folder and the two adapter folders by column name."""

    root: Path
    model_dir: Path
    adapters: dict[str, Path]
    data_dir: Path | None = None
    """The subject's instance images (the training data), shown beside the grid."""


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/dora-diffusion/demo``, or ``~/.cache/dora-diffusion/demo``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dora-diffusion" / "demo"


def _weights_digest(model_dir: Path) -> str:
    """SHA-256 over the base model's safetensors files (new shipped weights get freshly trained adapters)."""
    digest = hashlib.sha256()
    for path in sorted(model_dir.rglob("*.safetensors")):
        digest.update(path.relative_to(model_dir).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _recipe_key(train_steps: int, model_dir: Path = PIPELINE_DIR) -> str:
    """Short hash of everything that shapes the cached files: a changed recipe gets a fresh folder."""
    recipe = {
        "version": __version__,
        "flags": TRAIN_FLAGS,
        "steps": train_steps,
        "subject": SUBJECT.name,
        "images": N_IMAGES,
        "base": _weights_digest(model_dir),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def _build_once(path: Path, make: Callable[[Path], object]) -> Path:
    """``make(path)`` unless ``path`` exists; built under a temporary name and renamed, so never half-written."""
    if path.exists():
        return path
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    make(tmp)
    os.replace(tmp, path)
    return path


def prepare_demo(
    cache_dir: str | os.PathLike | None = None,
    train_steps: int = TRAIN_STEPS,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> DemoAssets:
    """Write (or reuse from ``cache_dir``) the subject's images and train (or reuse) the DoRA and LoRA adapters."""
    from dora_diffusion.training import main as train

    root = Path(cache_dir or default_cache_dir()).expanduser().resolve() / f"recipe-{_recipe_key(train_steps)}"
    if force:
        shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    model_dir = PIPELINE_DIR
    data_dir = _build_once(root / f"subject-{SUBJECT.name}", lambda p: make_subject_dataset(p, SUBJECT, n=N_IMAGES))
    adapters = {}
    for kind in ("dora", "lora"):
        out = root / kind
        if (out / DEFAULT_WEIGHT_NAME).is_file():
            log(f"reusing the demo {kind} adapter from {_home_relative(out)} (--force retrains)")
        else:
            log(f"training the demo {kind} adapter ({train_steps} steps on {N_IMAGES} images of {SUBJECT.name}) ...")
            start = time.perf_counter()
            train([
                "--pretrained_model_name_or_path", str(model_dir),
                "--dataset", str(data_dir),
                "--output_dir", str(out),
                "--overwrite_output_dir",
                "--adapter", kind,
                "--max_train_steps", str(train_steps),
                *TRAIN_FLAGS,
            ])  # fmt: skip
            log(f"trained the demo {kind} adapter in {time.perf_counter() - start:.0f} s: {out}")
        adapters[kind] = out
    return DemoAssets(root, model_dir, adapters, data_dir)


def _home_relative(path: Path) -> str:
    """``path`` with the home folder written as ``~`` (the cache location as a person types it)."""
    try:
        return f"~/{path.relative_to(Path.home())}"
    except ValueError:
        return str(path)


def demo_comparer(assets: DemoAssets) -> Comparer:
    """The toy world's base pipeline (float32 on the CPU) with both demo adapters loaded."""
    pipe = load_base_pipeline(str(assets.model_dir), device="cpu")
    comparer = Comparer(pipe, str(assets.model_dir))
    for name, path in assets.adapters.items():
        comparer.load_adapter(str(path), name)
    return comparer


def render_demo_grid(
    comparer: Comparer,
    output: str | os.PathLike,
    seeds: str = SEEDS,
    steps: int = STEPS,
    log: Callable[[str], None] = print,
    training_images: Sequence[Image.Image] = (),
) -> Path:
    """Render base | dora | lora at strength 1 for ``seeds``; write the demo's PNG (``demo_figure``, with the
    grid's parameters) to ``output``.

    Logs each column's scores (``column_scores``) and what they mean (``explain_scores``).
    """
    settings = GenerationSettings(
        PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE, width=RESOLUTION, height=RESOLUTION
    )
    plan = comparer.plan_grid(settings, seeds, {a.name: 1.0 for a in comparer.adapters}, include_base=True)
    results = []
    for result in comparer.render(plan):
        results.append(result)
        log(f"cell {len(results)} of {len(plan)}: {result.caption}")
    scores = column_scores(plan, results)
    for row in scores:
        log(
            f"{row.column.label:>8}: subject fidelity {row.values['subject fidelity']:.2f}, "
            f"prompt fidelity {row.values['prompt fidelity']:.2f}  (toyworld.score over {row.n} images)"
        )
    explanation = explain_scores(scores)
    log(explanation)
    images = {(r.cell.seed, r.cell.column): r.image for r in results}
    maps = difference_maps(plan, images, comparer.kinds())
    notes = {row.column: [f"{k} {v:.2f}" for k, v in row.values.items()] for row in scores}
    grid = comparer.grid(plan, results, notes=notes)
    figure = demo_figure(plan, grid, maps, training_images, explanation)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    return save_png(figure, output, grid_infotext(plan, comparer.model, comparer.default_sampler))


def explain_scores(scores: Sequence[ColumnScore]) -> str:
    """One plain paragraph on what the demo's scores say, with the figures of ``scores`` (base, DoRA, LoRA)."""
    by = {row.column.label: row.values for row in scores}
    base, dora, lora = by.get("base"), by.get("dora"), by.get("lora")
    if not (base and dora and lora):
        return "Scores need the base, DoRA and LoRA columns."
    sf, pf = "subject fidelity", "prompt fidelity"
    return (
        f"Subject fidelity (0-1, like DINO) is how much the images show the subject of the training images: base "
        f"{base[sf]:.2f}, DoRA {dora[sf]:.2f}, LoRA {lora[sf]:.2f}, so both adapters learned the subject. Prompt "
        f"fidelity (0-1, like CLIP-T) is how much they show the rest of the prompt, here the striped background: "
        f"base {base[pf]:.2f}, DoRA {dora[pf]:.2f}, LoRA {lora[pf]:.2f}. It drops because an adapter trained on "
        f"{N_IMAGES} images of the subject draws the subject's look everywhere, over the background the prompt "
        f"asks for (language drift); prior preservation (training with --with_prior_preservation on class images) "
        f"reduces it. This is one training run: over 20 training seeds of this recipe DoRA's subject fidelity is "
        f"ahead of LoRA's by {SWEEP_GAP} (95% interval, docs/quality.md), less than one run's spread, so a single "
        f"run can put either ahead."
    )


def demo_figure(
    plan: GridPlan,
    grid: Image.Image,
    maps: Sequence[DifferenceMap],
    training_images: Sequence[Image.Image] = (),
    explanation: str = "",
) -> Image.Image:
    """The demo's PNG, top to bottom: the training images; ``grid`` (``Comparer.grid`` of ``plan``: base | DoRA |
    LoRA, with scores under each column's legend) with the difference maps (|adapter - base|, |DoRA - LoRA|) on
    its right; ``explanation``."""
    parts = []
    zoom = grid_zoom(plan.settings.width, plan.settings.height)
    if training_images:
        parts.append(compose_grid(
            [list(training_images)], ["training"], [[f"image {i + 1}"] for i in range(len(training_images))],
            f"The training images of the subject ({SUBJECT.trigger}): {len(training_images)} images", zoom,
        ))  # fmt: skip
    parts.append(stack_images([grid, difference_grid(plan, maps)], gap=24, across=True) if maps else grid)
    width = max(p.width for p in parts)
    if explanation:
        parts.append(text_image(explanation, width, font_size=max(14, min(24, width // 60))))
    return stack_images(parts, gap=24)


def training_images(assets: DemoAssets) -> list[Image.Image]:
    """The subject's instance images the demo adapters were trained on, sorted by name."""
    if assets.data_dir is None:
        return []
    images = []
    for path in sorted(assets.data_dir.glob("*.png")):
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
    return images


def column_scores(plan: GridPlan, results: Sequence[CellResult]) -> list[ColumnScore]:
    """``toyworld.score`` of each column's images against the grid's prompt (the subject named by its trigger)."""
    return score_columns(ToyWorldScorer(), plan, {(r.cell.seed, r.cell.column): r.image for r in results})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dora_diffusion.demo",
        description="Offline CPU demo: train a DoRA and a LoRA on a toy-world subject (or reuse them from the "
        "cache) and write a base | DoRA | LoRA grid PNG with each column's scores. `python app.py --demo` opens "
        "the same in the browser.",
    )
    p.add_argument(
        "--cache_dir", default=None, help=f"Where the demo model and adapters are kept (default {default_cache_dir()})."
    )
    p.add_argument("--output", default=None, help="Grid PNG to write (default: <cache_dir>/.../dora_vs_lora_grid.png).")
    p.add_argument("--seeds", default=SEEDS, help="Seeds, one row each: '0, 7, 42' or '0-3'.")
    p.add_argument("--steps", type=int, default=STEPS, help="Denoising steps per image.")
    p.add_argument("--train_steps", type=int, default=TRAIN_STEPS, help="Training steps per adapter.")
    p.add_argument("--force", action="store_true", help="Rebuild the cached model and retrain both adapters.")
    p.add_argument(
        "--num_threads",
        type=int,
        default=1,
        help="Torch CPU threads. The toy models gain little from more, and on a busy machine idle OpenMP threads "
        "spinning can make them far slower (0: torch's default).",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    """Run the demo end to end; print and return the path of the grid PNG."""
    args = parse_args(argv)
    require("train", "the demo (it trains its adapters)", ("accelerate",))
    parse_seeds(args.seeds)  # a malformed list fails now, not after training
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    start = time.perf_counter()
    assets = prepare_demo(args.cache_dir, args.train_steps, args.force)
    print(f"demo cache: {_home_relative(assets.root)} (a second run reuses it; --cache_dir moves it)")
    comparer = demo_comparer(assets)
    output = Path(args.output) if args.output else assets.root / "dora_vs_lora_grid.png"
    path = render_demo_grid(comparer, output, args.seeds, args.steps, training_images=training_images(assets))
    print(
        f"\nDemo finished in {time.perf_counter() - start:.0f} s. Side-by-side grid (top: the training images; "
        f"rows: seeds; columns: base model, DoRA, LoRA, with scores; below: difference maps):\n{path.resolve()}"
    )
    return path


if __name__ == "__main__":
    try:
        main()
    except (CompareError, MissingExtraError) as err:  # e.g. a malformed --seeds
        sys.exit(f"python -m dora_diffusion.demo: error: {err}")
    except KeyboardInterrupt:
        sys.exit(130)
