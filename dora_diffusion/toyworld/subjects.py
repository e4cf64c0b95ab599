"""DreamBooth subjects the base model cannot draw: one particular object with a decoration it never saw.

Like the round frame of the 3d_icon set, each subject carries something the pretraining world does not have
(a white ring around it, white dots on it). Its instance captions use a trigger word the tokenizer does not know
("sks", "zwx": they tokenize letter by letter), and its class prompt names the plain class for prior preservation.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from dora_diffusion.toyworld.world import BACKGROUNDS, Scene, Thing, render


@dataclass(frozen=True)
class Subject:
    """A subject: its object (shape, colour, decoration), trigger word and instance backgrounds."""

    name: str
    shape: str
    colour: str
    decoration: str
    trigger: str
    backgrounds: tuple[str, ...]

    @property
    def instance_prompt(self) -> str:
        """``"a sks yellow star"``: the trigger before the class noun, as in DreamBooth ("a [V] dog")."""
        return f"a {self.trigger} {self.colour} {self.shape}"

    @property
    def class_prompt(self) -> str:
        """``"a yellow star"``: the class, for prior preservation. It names the colour because every caption of the
        pretraining world does: the base model draws "a yellow star", not "a star"."""
        return f"a {self.colour} {self.shape}"

    def scene(self, background: str, x: float = 0.5, y: float = 0.5, size: float = 0.6) -> Scene:
        return Scene(background, (Thing(self.shape, self.colour, x, y, size, self.decoration),))


SUBJECTS: dict[str, Subject] = {
    s.name: s
    for s in (
        Subject("ring_star", "star", "yellow", "ring", "sks", ("blue", "gray", "black", "striped", "blue", "gray")),
        Subject("dotted_heart", "heart", "pink", "dotted", "zwx", ("green", "black", "gray", "checkered", "blue", "green")),
    )
}


def instance_scenes(subject: Subject | str, n: int = 6, seed: int = 0) -> list[Scene]:
    """``n`` (4-8) instance scenes of ``subject``: its backgrounds in turn, size and position varied."""
    subject = SUBJECTS[subject] if isinstance(subject, str) else subject
    if not 4 <= n <= 8:
        raise ValueError(f"a DreamBooth subject has 4-8 instance images, got n={n}")
    rng = random.Random(f"subject|{subject.name}|{seed}")
    out = []
    for i in range(n):
        size = rng.uniform(0.5, 0.66)
        half = size / 2
        bg = subject.backgrounds[i % len(subject.backgrounds)]
        out.append(subject.scene(bg, rng.uniform(half, 1 - half), rng.uniform(half, 1 - half), size))
    return out


def instance_caption(subject: Subject, scene: Scene) -> str:
    return f"{subject.instance_prompt} on a {scene.background} background"


def make_subject_dataset(directory: str | os.PathLike, subject: Subject | str, n: int = 6, seed: int = 0) -> Path:
    """Write ``subject``'s instance images as an imagefolder (PNGs + ``metadata.jsonl`` with a ``prompt`` column).

    ``train_dreambooth_dora.py --dataset DIR`` reads it. Refuses a non-empty directory (nothing is overwritten).
    """
    subject = SUBJECTS[subject] if isinstance(subject, str) else subject
    root = Path(directory)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; give a new directory for the subject images")
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, scene in enumerate(instance_scenes(subject, n, seed)):
        name = f"{subject.name}_{i}.png"
        render(scene).save(root / name)
        rows.append({"file_name": name, "prompt": instance_caption(subject, scene)})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root


assert all(set(s.backgrounds) <= set(BACKGROUNDS) for s in SUBJECTS.values())
