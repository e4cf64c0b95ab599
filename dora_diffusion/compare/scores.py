"""Scores per column, so "which adapter learned the concept" has numbers, as the DreamBooth paper measures it.

- On the toy world's model: ``toyworld.score`` (prompt fidelity, like CLIP-T; subject fidelity, like DINO, when
  the prompt holds a subject's trigger word).
- On a real model: a CLIP model through transformers. ``CLIP-T`` is the mean cosine similarity between each image
  and the prompt; given a folder of instance images, ``CLIP-I`` is the mean cosine similarity between each image
  and each instance image (subject fidelity). DreamBooth reports both (and DINO) this way.

No scoring model at hand (not cached, Hub unreachable) gives a ``ScoringUnavailable`` whose message says what to
do; it never waits on a dead network (``formats.safefile.hub_unreachable`` is checked first).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image

from .plan import Column, GridPlan

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
INSTANCE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAX_INSTANCE_IMAGES = 64


class ScoringUnavailable(RuntimeError):
    """No scoring model can be loaded; the message says why and what to pass instead."""


class Scorer(Protocol):
    name: str
    """What scores, e.g. ``"toy-world scorer"`` or ``"CLIP openai/clip-vit-base-patch32"``."""

    def metrics(self, prompt: str) -> tuple[str, ...]:
        """The names of the figures ``score`` returns for ``prompt``."""

    def score(self, images: Sequence[Image.Image], prompt: str) -> dict[str, float]:
        """Figures of ``images`` generated from ``prompt``, by metric name."""


@dataclass(frozen=True)
class ColumnScore:
    column: Column
    n: int
    values: dict[str, float]


def score_columns(scorer: Scorer, plan: GridPlan, images: dict[tuple[int, Column], Image.Image]) -> list[ColumnScore]:
    """``scorer``'s figures per column of ``plan`` over the rendered cells ``images`` ({(seed, column): image})."""
    out = []
    for column in plan.columns:
        imgs = [images[s, column] for s in plan.seeds if (s, column) in images]
        if imgs:
            out.append(ColumnScore(column, len(imgs), scorer.score(imgs, plan.settings.prompt)))
    return out


# ----------------------------------------------------------------------------------------------- toy world


class ToyWorldScorer:
    """``toyworld.score``: prompt fidelity always, subject fidelity when the prompt holds a subject's trigger."""

    name = "toy-world scorer (dora_diffusion.toyworld.score)"

    def _subject(self, prompt: str):
        from ..toyworld import SUBJECTS

        words = set(re.findall(r"[a-z]+", prompt.lower()))
        return next((s for s in SUBJECTS.values() if s.trigger in words), None)

    def metrics(self, prompt: str) -> tuple[str, ...]:
        return ("prompt fidelity", "subject fidelity") if self._subject(prompt) else ("prompt fidelity",)

    def score(self, images: Sequence[Image.Image], prompt: str) -> dict[str, float]:
        """Raises ``ScoringUnavailable`` for a prompt that names nothing of the toy world."""
        from ..toyworld import score

        subject = self._subject(prompt)
        try:
            r = score(list(images), [prompt] * len(images), subject)
        except ValueError as err:
            raise ScoringUnavailable(f"the toy-world scorer cannot read this prompt: {err}") from None
        out = {"prompt fidelity": r["prompt_fidelity"]}
        if subject is not None:
            out["subject fidelity"] = r["subject_fidelity"]
        return out


def is_toyworld_model(model: str) -> bool:
    """True if ``model`` is the toy world's shipped pipeline directory."""
    from ..toyworld import PIPELINE_DIR

    try:
        return Path(model).resolve() == PIPELINE_DIR.resolve()
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------- CLIP


def instance_images(directory: str | Path) -> list[Image.Image]:
    """The images (png, jpg, webp) directly in ``directory``, sorted by name, at most ``MAX_INSTANCE_IMAGES``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ScoringUnavailable(f"instance image folder {directory} does not exist")
    paths = sorted(p for p in directory.iterdir() if p.suffix.lower() in INSTANCE_SUFFIXES and p.is_file())
    if not paths:
        raise ScoringUnavailable(f"{directory} holds no .png, .jpg or .webp instance image")
    images = []
    for p in paths[:MAX_INSTANCE_IMAGES]:
        with Image.open(p) as im:
            images.append(im.convert("RGB"))
    return images


def _load_clip(name: str):
    """CLIP model and processor from a local folder, the Hugging Face cache, or (if reachable) the Hub."""
    from transformers import CLIPModel, CLIPProcessor

    from ..formats.safefile import hub_unreachable

    local = Path(name).is_dir()
    try:
        return CLIPModel.from_pretrained(name, local_files_only=True), CLIPProcessor.from_pretrained(
            name, local_files_only=True
        )
    except OSError as err:
        if local:
            raise ScoringUnavailable(f"{name} holds no CLIP model transformers can read ({err})") from None
    why = hub_unreachable()
    if why:
        raise ScoringUnavailable(
            f"no scores: the CLIP model {name!r} is not in the Hugging Face cache and the Hub cannot be reached "
            f"({why}); start the app with --score_model PATH (a local CLIP folder) or --score_model none"
        )
    try:
        return CLIPModel.from_pretrained(name), CLIPProcessor.from_pretrained(name)
    except OSError as err:
        raise ScoringUnavailable(f"no scores: could not load the CLIP model {name!r} ({err})") from None


class ClipScorer:
    """CLIP-T (image-prompt) and, with instance images, CLIP-I (image-instance) mean cosine similarities.

    The model loads on first use and stays loaded.
    """

    def __init__(self, model: str = DEFAULT_CLIP, instance_dir: str | Path | None = None, device: str = "cpu") -> None:
        self.model_name = model
        self.instance_dir = instance_dir
        self.device = device
        self.name = f"CLIP {model}"
        self._model = self._processor = None
        self._instances: torch.Tensor | None = None

    def metrics(self, prompt: str) -> tuple[str, ...]:
        return ("CLIP-T", "CLIP-I") if self.instance_dir else ("CLIP-T",)

    def _ready(self) -> None:
        if self._model is None:
            model, processor = _load_clip(self.model_name)
            self._model, self._processor = model.to(self.device).eval(), processor
        if self.instance_dir and self._instances is None:
            self._instances = self._embed_images(instance_images(self.instance_dir))

    @torch.no_grad()
    def _embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        inputs = self._processor(images=list(images), return_tensors="pt").to(self.device)
        e = self._model.get_image_features(**inputs)
        e = e if isinstance(e, torch.Tensor) else e.pooler_output
        return torch.nn.functional.normalize(e.float(), dim=-1)  # (N, D)

    @torch.no_grad()
    def _embed_text(self, prompt: str) -> torch.Tensor:
        inputs = self._processor(text=[prompt], return_tensors="pt", padding=True, truncation=True).to(self.device)
        e = self._model.get_text_features(**inputs)
        e = e if isinstance(e, torch.Tensor) else e.pooler_output
        return torch.nn.functional.normalize(e.float(), dim=-1)  # (1, D)

    def score(self, images: Sequence[Image.Image], prompt: str) -> dict[str, float]:
        self._ready()
        x = self._embed_images(images)
        out = {"CLIP-T": float((x @ self._embed_text(prompt).T).mean())}
        if self._instances is not None:
            out["CLIP-I"] = float((x @ self._instances.T).mean())
        return out


def make_scorer(
    model: str, score_model: str | None, instance_dir: str | None = None, device: str = "cpu"
) -> Scorer | None:
    """The scorer for base ``model``: the toy-world scorer for the toy world's model, else CLIP ``score_model``.

    ``score_model`` ``"none"`` (or None) turns scoring off for real models.
    """
    if is_toyworld_model(model) and not instance_dir:
        return ToyWorldScorer()
    if not score_model or score_model.lower() == "none":
        return None
    return ClipScorer(score_model, instance_dir, device)
