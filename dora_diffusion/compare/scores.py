"""Scores per column, so "which adapter learned the concept" has numbers, as the DreamBooth paper measures it.

- On the toy world's model: ``toyworld.score`` (prompt fidelity, like CLIP-T; subject fidelity, like DINO, when
  the prompt holds a subject's trigger word).
- On a real model: a CLIP model through transformers. ``CLIP-T`` is the mean cosine similarity between each image
  and the prompt; given a folder of instance images, ``CLIP-I`` is the mean cosine similarity between each image
  and each instance image (subject fidelity), and with a DINO model (``facebook/dinov2-small``) ``DINO``, the same
  over CLS embeddings. DreamBooth reports all three this way.

No scoring model at hand (not cached, Hub unreachable) gives a ``ScoringUnavailable`` whose message says what to
do; it never waits on a dead network (``hub.hub_unreachable`` is checked first).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image

from dora_diffusion.compare.plan import Column, GridPlan

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

    def __init__(self, instance_dir: str | Path | None = None) -> None:
        if instance_dir:  # said in the page's "Scores by ..." note, never dropped silently
            self.name = (
                f"{ToyWorldScorer.name}; --instance_dir {instance_dir} is not read: on the toy world's model, subject "
                "fidelity compares with the subject the prompt's trigger word names"
            )

    def _subject(self, prompt: str):
        from dora_diffusion.toyworld import SUBJECTS

        words = set(re.findall(r"[a-z]+", prompt.lower()))
        return next((s for s in SUBJECTS.values() if s.trigger in words), None)

    def metrics(self, prompt: str) -> tuple[str, ...]:
        return ("prompt fidelity", "subject fidelity") if self._subject(prompt) else ("prompt fidelity",)

    def score(self, images: Sequence[Image.Image], prompt: str) -> dict[str, float]:
        """Raises ``ScoringUnavailable`` for a prompt that names nothing of the toy world."""
        from dora_diffusion.toyworld import score

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
    from dora_diffusion.toyworld import PIPELINE_DIR

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


def _load_pretrained(name: str, model_cls, processor_cls, what: str, flag: str):
    """A transformers model and its processor from a local folder, the Hugging Face cache, or (if reachable) the
    Hub; ``ScoringUnavailable`` (naming ``what`` and the app's ``flag``) when none of them has it."""
    from dora_diffusion.hub import hub_unreachable

    local = Path(name).is_dir()
    try:
        return (model_cls.from_pretrained(name, local_files_only=True),
                processor_cls.from_pretrained(name, local_files_only=True))  # fmt: skip
    except OSError as err:
        if local:
            raise ScoringUnavailable(f"{name} holds no {what} transformers can read ({err})") from None
    why = hub_unreachable()
    if why:
        raise ScoringUnavailable(
            f"no scores: the {what} {name!r} is not in the Hugging Face cache and the Hub cannot be reached "
            f"({why}); start the app with {flag} PATH (a local folder) or {flag} none"
        )
    try:
        return model_cls.from_pretrained(name), processor_cls.from_pretrained(name)
    except OSError as err:
        raise ScoringUnavailable(f"no scores: could not load the {what} {name!r} ({err})") from None


def _unit(e) -> torch.Tensor:
    e = e if isinstance(e, torch.Tensor) else e.pooler_output
    return torch.nn.functional.normalize(e.float(), dim=-1)


class ClipScorer:
    """CLIP-T (image-prompt) and, with instance images, CLIP-I (image-instance) mean cosine similarities; with a
    ``subject_model`` (a DINOv2 / DINO ViT) also ``DINO``, the mean cosine similarity of CLS embeddings between
    each image and each instance image, the DreamBooth paper's preferred subject fidelity.

    The models load on first use and stay loaded.
    """

    def __init__(
        self,
        model: str = DEFAULT_CLIP,
        instance_dir: str | Path | None = None,
        device: str = "cpu",
        subject_model: str | None = None,
    ) -> None:
        self.model_name = model
        self.instance_dir = instance_dir
        self.device = device
        self.subject_model = subject_model if instance_dir else None
        self.name = f"CLIP {model}" + (f" and {subject_model}" if self.subject_model else "")
        self._model = self._processor = self._dino = self._dino_processor = None
        self._instances: torch.Tensor | None = None
        self._dino_instances: torch.Tensor | None = None

    def metrics(self, prompt: str) -> tuple[str, ...]:
        if not self.instance_dir:
            return ("CLIP-T",)
        return ("CLIP-T", "CLIP-I", "DINO") if self.subject_model else ("CLIP-T", "CLIP-I")

    def _ready(self) -> None:
        from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor

        if self._model is None:
            model, processor = _load_pretrained(self.model_name, CLIPModel, CLIPProcessor, "CLIP model", "--score_model")
            self._model, self._processor = model.to(self.device).eval(), processor
        if self.subject_model and self._dino is None:
            model, processor = _load_pretrained(
                self.subject_model, AutoModel, AutoImageProcessor, "subject model", "--subject_model"
            )
            self._dino, self._dino_processor = model.to(self.device).eval(), processor
        if self.instance_dir and self._instances is None:
            references = instance_images(self.instance_dir)
            self._instances = self._embed_images(references)
            if self._dino is not None:
                self._dino_instances = self._embed_dino(references)

    @torch.no_grad()
    def _embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        inputs = self._processor(images=list(images), return_tensors="pt").to(self.device)
        return _unit(self._model.get_image_features(**inputs))  # (N, D)

    @torch.no_grad()
    def _embed_text(self, prompt: str) -> torch.Tensor:
        inputs = self._processor(text=[prompt], return_tensors="pt", padding=True, truncation=True).to(self.device)
        return _unit(self._model.get_text_features(**inputs))  # (1, D)

    @torch.no_grad()
    def _embed_dino(self, images: Sequence[Image.Image]) -> torch.Tensor:
        inputs = self._dino_processor(images=list(images), return_tensors="pt").to(self.device)
        return _unit(self._dino(**inputs).last_hidden_state[:, 0])  # (N, D): the CLS token

    def score(self, images: Sequence[Image.Image], prompt: str) -> dict[str, float]:
        self._ready()
        x = self._embed_images(images)
        out = {"CLIP-T": float((x @ self._embed_text(prompt).T).mean())}
        if self._instances is not None:
            out["CLIP-I"] = float((x @ self._instances.T).mean())
        if self._dino_instances is not None:
            out["DINO"] = float((self._embed_dino(images) @ self._dino_instances.T).mean())
        return out


def make_scorer(
    model: str,
    score_model: str | None,
    instance_dir: str | None = None,
    device: str = "cpu",
    subject_model: str | None = None,
) -> Scorer | None:
    """The scorer for base ``model``: the toy-world scorer for the toy world's model (with or without
    ``instance_dir``: CLIP knows nothing of the toy world and cannot load offline), else CLIP ``score_model``
    (plus DINO ``subject_model`` when there are instance images).

    ``score_model`` ``"none"`` (or None) turns scoring off for real models.
    """
    if is_toyworld_model(model):
        return ToyWorldScorer(instance_dir)
    if not score_model or score_model.lower() == "none":
        return None
    if subject_model and subject_model.lower() == "none":
        subject_model = None
    return ClipScorer(score_model, instance_dir, device, subject_model)
