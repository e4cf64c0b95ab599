"""The toy world: a procedural world of simple scenes and an SDXL-architecture model pretrained on it.

The project's embedded default (as a database ships SQLite): no Hub, no GPU. ``load_pipeline()`` returns the
shipped ``StableDiffusionXLPipeline`` that draws the world's scenes; ``SUBJECTS`` and ``make_subject_dataset``
give DreamBooth subjects it cannot draw; ``score`` reads images as the DreamBooth paper's metrics do.
"""

from __future__ import annotations

import os
from pathlib import Path

from dora_diffusion.toyworld.score import score
from dora_diffusion.toyworld.subjects import SUBJECTS, Subject, instance_scenes, make_subject_dataset
from dora_diffusion.toyworld.world import BACKGROUNDS, COLOURS, DECORATIONS, RESOLUTION, SHAPES, Scene, Thing, caption, captions, render, scenes

__all__ = [
    "BACKGROUNDS", "COLOURS", "DECORATIONS", "PIPELINE_DIR", "RESOLUTION", "SHAPES", "SUBJECTS", "Scene", "Subject",
    "Thing", "caption", "captions", "instance_scenes", "load_pipeline", "make_subject_dataset", "render", "scenes",
    "score",
]

PIPELINE_DIR = Path(__file__).parent / "assets" / "pipeline"
"""The shipped pretrained pipeline (diffusers ``save_pretrained`` layout, fp16 safetensors)."""


def load_pipeline(path: str | os.PathLike | None = None, dtype=None):
    """The pretrained toy-world ``StableDiffusionXLPipeline`` (offline, a second or two on a CPU).

    ``path``: another pretrained directory (default: the shipped one). ``dtype``: default float32 (the CPU).
    """
    import torch
    from diffusers import StableDiffusionXLPipeline

    from dora_diffusion.hub import dtype_keyword

    root = Path(path) if path is not None else PIPELINE_DIR
    if not (root / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{root} holds no pretrained toy-world pipeline (model_index.json missing); "
            "make one with: python -m dora_diffusion.toyworld.pretrain --out DIR"
        )
    pipe = StableDiffusionXLPipeline.from_pretrained(root, **{dtype_keyword(): dtype or torch.float32})
    pipe.set_progress_bar_config(disable=True)
    return pipe
