"""The toy world: simple scenes of coloured shapes on plain or patterned backgrounds, deterministic from a seed.

A scene is one or two objects (shape, colour, size, position) on a background; its caption names them in plain
words: ``"a red star on a blue background"``, ``"a red star and a white circle on a striped background"``.
Objects of the pretraining world are plain; the decorations (``ring``: a round white frame, ``dotted``: white
dots) exist only for DreamBooth subjects and for the scorer, which has seen more of the world than the base model
(as CLIP has seen more than a DreamBooth base model).

Splits: a fixed eighth of the (shape, colour, background) triples is ``"heldout"``: never shown in pretraining,
used to test that the base model composes words it knows into scenes it never saw.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

RESOLUTION = 64
SHAPES = ("circle", "square", "triangle", "star", "heart", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (245, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 220),
    "purple": (140, 60, 190),
    "pink": (245, 130, 190),
    "white": (245, 245, 245),
}
# plain backgrounds are (r, g, b); patterned ones two colours
BACKGROUNDS = {
    "blue": (70, 120, 200),
    "green": (90, 160, 90),
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
    "striped": ((200, 180, 140), (120, 90, 60)),
    "checkered": ((170, 170, 170), (80, 80, 80)),
}
DECORATIONS = ("plain", "ring", "dotted")
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Thing:
    """One object: ``size`` is its diameter and ``(x, y)`` its centre, as fractions of the image side."""

    shape: str
    colour: str
    x: float
    y: float
    size: float
    decoration: str = "plain"
    ring_width: float = 0.16
    """A ``ring``'s width as a fraction of the object's radius; the object inside shrinks by as much."""


@dataclass(frozen=True)
class Scene:
    background: str
    things: tuple[Thing, ...] = field(default_factory=tuple)


def is_heldout(shape: str, colour: str, background: str) -> bool:
    """True for the fixed eighth of triples never shown in pretraining (a hash, so it never changes)."""
    digest = hashlib.sha256(f"{shape}|{colour}|{background}".encode()).digest()
    return digest[0] % 8 == 0


def _allowed(colour: str, background: str) -> bool:
    """An object is never drawn in its background's colour (it would vanish)."""
    return colour != background


def triples(split: str) -> list[tuple[str, str, str]]:
    """All (shape, colour, background) combinations of a split, in a fixed order."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    want = split == "heldout"
    return [
        (s, c, b)
        for s in SHAPES
        for c in COLOURS
        for b in BACKGROUNDS
        if _allowed(c, b) and is_heldout(s, c, b) == want
    ]


def sample_scene(rng: random.Random, split: str = "train", two_objects: float = 0.2) -> Scene:
    """A random scene of ``split``; with probability ``two_objects`` a second object (its own triple in split)."""
    shape, colour, background = rng.choice(triples(split))
    if rng.random() >= two_objects:
        size = rng.uniform(0.38, 0.62)
        half = size / 2
        thing = Thing(shape, colour, rng.uniform(half, 1 - half), rng.uniform(half, 1 - half), size)
        return Scene(background, (thing,))
    options = [(s, c) for s, c, b in triples(split) if b == background and s != shape]
    if not options:  # a small split can have no second object for this background
        return sample_scene(rng, split, two_objects=0.0)
    shape2, colour2 = rng.choice(options)
    size1, size2 = rng.uniform(0.3, 0.42), rng.uniform(0.3, 0.42)
    left = Thing(shape, colour, rng.uniform(size1 / 2, 0.5 - size1 / 2 + 0.02), rng.uniform(0.25, 0.75), size1)
    right = Thing(shape2, colour2, rng.uniform(0.5 + size2 / 2 - 0.02, 1 - size2 / 2), rng.uniform(0.25, 0.75), size2)
    return Scene(background, (left, right))


def caption(scene: Scene) -> str:
    """Plain words: ``"a red star on a blue background"``; decorated objects read ``"a red star with a ring"``."""

    def name(t: Thing) -> str:
        extra = {"plain": "", "ring": " with a ring", "dotted": " with dots"}[t.decoration]
        article = "an" if t.colour[0] in "aeiou" else "a"
        return f"{article} {t.colour} {t.shape}{extra}"

    return " and ".join(name(t) for t in scene.things) + f" on a {scene.background} background"


def captions(split: str, n: int, seed: int = 0) -> list[str]:
    """``n`` captions of ``split`` (``"train"`` or ``"heldout"``), deterministic from ``seed``."""
    rng = random.Random(f"captions|{split}|{seed}")
    return [caption(sample_scene(rng, split)) for _ in range(n)]


def scenes(split: str, n: int, seed: int = 0, two_objects: float = 0.2) -> list[Scene]:
    """``n`` scenes of ``split``, deterministic from ``seed``."""
    rng = random.Random(f"scenes|{split}|{seed}")
    return [sample_scene(rng, split, two_objects) for _ in range(n)]


# ------------------------------------------------------------------------------------------------ drawing


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Outline points of ``shape`` centred at (cx, cy) with radius r (pixels)."""
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        pts = []
        for i in range(10):
            a = -math.pi / 2 + i * math.pi / 5
            rr = r if i % 2 == 0 else r * 0.42
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    if shape == "cross":
        w, s = r * 0.33, r * 0.9
        return [
            (cx - w, cy - s), (cx + w, cy - s), (cx + w, cy - w), (cx + s, cy - w), (cx + s, cy + w), (cx + w, cy + w),
            (cx + w, cy + s), (cx - w, cy + s), (cx - w, cy + w), (cx - s, cy + w), (cx - s, cy - w), (cx - w, cy - w),
        ]
    if shape == "heart":
        pts = []
        for i in range(48):
            t = 2 * math.pi * i / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + r * x / 17, cy - r * (y + 2) / 17))
        return pts
    raise ValueError(f"unknown shape {shape!r}; one of {SHAPES}")


def _background(draw: ImageDraw.ImageDraw, name: str, side: int) -> None:
    spec = BACKGROUNDS[name]
    if name == "striped":
        draw.rectangle([0, 0, side, side], fill=spec[0])
        step = side // 8
        for k in range(-side, 2 * side, step):
            draw.polygon([(k, 0), (k + step // 2, 0), (k + step // 2 - side, side), (k - side, side)], fill=spec[1])
    elif name == "checkered":
        cell = side // 8
        for i in range(8):
            for j in range(8):
                draw.rectangle([i * cell, j * cell, (i + 1) * cell, (j + 1) * cell], fill=spec[(i + j) % 2])
    else:
        draw.rectangle([0, 0, side, side], fill=spec)


def _thing(draw: ImageDraw.ImageDraw, t: Thing, side: int) -> None:
    cx, cy, r = t.x * side, t.y * side, t.size * side / 2
    fill = COLOURS[t.colour]
    if t.decoration == "ring":
        ring = (250, 250, 250) if t.colour != "white" else (30, 30, 30)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=ring, width=max(1, int(r * t.ring_width)))
        r *= 0.72 - (t.ring_width - 0.16)  # exactly 0.72 at the default width
    if t.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(t.shape, cx, cy, r), fill=fill)
    if t.decoration == "dotted":
        dot = (250, 250, 250) if t.colour != "white" else (30, 30, 30)
        d = r * 0.14
        for ox, oy in ((-0.35, -0.2), (0.35, -0.2), (0.0, 0.15), (-0.3, 0.45), (0.3, 0.45)):
            x, y = cx + ox * r, cy + oy * r
            draw.ellipse([x - d, y - d, x + d, y + d], fill=dot)


def render(scene: Scene, size: int = RESOLUTION) -> Image.Image:
    """The scene as an RGB image of ``size`` x ``size`` pixels (drawn 4x larger and downsampled: smooth edges)."""
    side = size * _SUPERSAMPLE
    image = Image.new("RGB", (side, side))
    draw = ImageDraw.Draw(image)
    _background(draw, scene.background, side)
    for t in scene.things:
        _thing(draw, t, side)
    return image.resize((size, size), Image.Resampling.LANCZOS)
