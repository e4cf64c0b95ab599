"""Style subjects: one look, many objects, as ``linoyts/3d_icon`` is for SDXL ("a TOK icon of an astronaut, in the
style of TOK").

A style subject's instance images show *different* objects of the world, all drawn in one look the pretraining
world never shows, so an adapter must learn the look and keep the object the prompt names. The toy world's
``icon`` look (3d_icon's round frame, at the toy world's scale):

- a round **badge** centred on the image (diameter 0.84 of the side): a disc shaded top to bottom from white to
  yellow, inside a thick blue frame (about 5 pixels of 64, more than one latent pixel);
- the **object** centred on the badge, shaded top (light) to bottom (dark), with a thick dark outline.

The background shows in the corners. Captions read as 3d_icon's: ``"a tok icon of a red star on a blue
background"``; the class prompt is the plain world caption (``"a red star on a blue background"``).

Looks that are *not* the style, for validating the scorer and training its style reader: ``square_icon`` (the
same badge, square), ``outline`` (the object's outline and shading, no badge), ``flat_badge`` (a flat grey round
badge, thin frame, plain object). World images (plain, ``ring``, ``dotted``) are the class ``none``.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from dora_diffusion.toyworld.world import (
    _SUPERSAMPLE, BACKGROUNDS, COLOURS, RESOLUTION, SHAPES, Scene, Thing, _background, _polygon,
)  # fmt: skip

LOOKS = ("none", "icon", "square_icon", "outline", "flat_badge", "wide_ring")
"""What the style reader tells apart: the world's own images (``none``), the ``icon`` style, three decoys, and the
``wide_ring`` of the reworked ring star (``wide_ring_star``)."""
WIDE_RING_WIDTH = 0.3
"""The wide ring's width as a fraction of the object's radius: 7-8 pixels of 64 at sizes 0.7-0.8, as wide as one
token of the UNet's 8 x 8 attention level (ring_star's ring: 0.16, 3 pixels, under one latent pixel)."""

_BADGE_TOP, _BADGE_BOTTOM = COLOURS["white"], COLOURS["yellow"]  # world colours: the shipped VAE encodes them
_FRAME = COLOURS["blue"]
_OUTLINE = (20, 20, 20)


@dataclass(frozen=True)
class Style:
    """A style subject: a look (one of ``LOOKS``), its trigger word, and its instance objects and backgrounds."""

    name: str
    look: str
    trigger: str
    objects: tuple[tuple[str, str], ...]  # (shape, colour) of each instance image
    backgrounds: tuple[str, ...]
    template: str = "a {trigger} icon of {article} {colour} {shape}"
    """The caption before ``" on a <background> background"``: 3d_icon's form by default."""

    def prompt(self, shape: str, colour: str, background: str) -> str:
        """``"a tok icon of a red star on a blue background"`` (or the style's ``template``)."""
        article = "an" if colour[0] in "aeiou" else "a"
        head = self.template.format(trigger=self.trigger, article=article, colour=colour, shape=shape)
        return f"{head} on a {background} background"

    @staticmethod
    def class_prompt(shape: str, colour: str, background: str) -> str:
        """The plain world caption of the same object (what prior preservation keeps)."""
        article = "an" if colour[0] in "aeiou" else "a"
        return f"{article} {colour} {shape} on a {background} background"


STYLES: dict[str, Style] = {
    s.name: s
    for s in (
        Style(
            "icon", "icon", "tok",
            (("star", "red"), ("heart", "pink"), ("circle", "blue"), ("square", "green"), ("triangle", "purple"),
             ("cross", "orange")),
            ("gray", "blue", "black", "green", "gray", "black"),
        ),
        # ring_star reworked: one object (a subject, DreamBooth's "a [V] yellow star"), its ring as wide as one token
        # of the 8 x 8 attention level; the reader never saw so wide a ring, the style reader reads it
        Style(
            "wide_ring_star", "wide_ring", "ohwx", (("star", "yellow"),) * 6,
            ("blue", "gray", "black", "striped", "blue", "gray"), template="a {trigger} {colour} {shape}",
        ),
    )
}  # fmt: skip


def _mix(a: tuple[int, int, int], b: tuple[int, int, int], t: float) -> tuple[int, int, int]:
    return tuple(round(x + (y - x) * t) for x, y in zip(a, b))


def _shaded(image: Image.Image, mask: Image.Image, top: tuple, bottom: tuple, y0: float, y1: float) -> None:
    """Paint ``mask`` of ``image`` with a vertical gradient from ``top`` (at row y0) to ``bottom`` (row y1)."""
    side = image.size[0]
    fill = Image.new("RGB", image.size)
    draw = ImageDraw.Draw(fill)
    for y in range(side):
        t = min(1.0, max(0.0, (y - y0) / max(1.0, y1 - y0)))
        draw.line([(0, y), (side, y)], fill=_mix(top, bottom, t))
    image.paste(fill, (0, 0), mask)


def _object_mask(t: Thing, side: int, grow: float = 0.0) -> Image.Image:
    """The object's silhouette at ``side`` pixels, its radius grown by ``grow`` pixels (for an outline)."""
    mask = Image.new("L", (side, side))
    draw = ImageDraw.Draw(mask)
    cx, cy, r = t.x * side, t.y * side, t.size * side / 2
    if t.shape == "circle":
        rr = r + grow
        draw.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=255)
    else:
        draw.polygon(_polygon(t.shape, cx, cy, r), fill=255)
        if grow > 0:  # a thick outline: the silhouette's edges stroked with width 2 * grow
            pts = _polygon(t.shape, cx, cy, r)
            draw.line([*pts, pts[0]], fill=255, width=int(2 * grow), joint="curve")
            for x, y in pts:
                draw.ellipse([x - grow, y - grow, x + grow, y + grow], fill=255)
    return mask


def render_look(scene: Scene, look: str, size: int = RESOLUTION) -> Image.Image:
    """``scene`` (one object; its ``x, y`` is the badge's centre) drawn in ``look``, as an RGB ``size`` image.

    ``none`` is the world's own ``render``. The badge's diameter is 0.84 of the side; the object keeps its size.
    """
    if look not in LOOKS:
        raise ValueError(f"unknown look {look!r}; one of {LOOKS}")
    if look in ("none", "wide_ring"):
        from dora_diffusion.toyworld.world import render

        if look == "wide_ring":
            scene = Scene(scene.background, tuple(
                Thing(t.shape, t.colour, t.x, t.y, t.size, "ring", WIDE_RING_WIDTH) for t in scene.things
            ))  # fmt: skip
        return render(scene, size)
    if len(scene.things) != 1:
        raise ValueError(f"a styled scene holds one object, got {len(scene.things)}")
    side = size * _SUPERSAMPLE
    image = Image.new("RGB", (side, side))
    draw = ImageDraw.Draw(image)
    _background(draw, scene.background, side)
    t = scene.things[0]
    cx, cy = t.x * side, t.y * side
    if look in ("icon", "square_icon", "flat_badge"):
        r = 0.42 * side
        box = [cx - r, cy - r, cx + r, cy + r]
        frame = int(0.085 * side) if look != "flat_badge" else int(0.025 * side)
        if look == "square_icon":
            r_in = r - frame
            draw.rectangle(box, fill=_FRAME)
            inner = Image.new("L", (side, side))
            ImageDraw.Draw(inner).rectangle([cx - r_in, cy - r_in, cx + r_in, cy + r_in], fill=255)
            _shaded(image, inner, _BADGE_TOP, _BADGE_BOTTOM, cy - r_in, cy + r_in)
        elif look == "icon":
            r_in = r - frame
            draw.ellipse(box, fill=_FRAME)
            inner = Image.new("L", (side, side))
            ImageDraw.Draw(inner).ellipse([cx - r_in, cy - r_in, cx + r_in, cy + r_in], fill=255)
            _shaded(image, inner, _BADGE_TOP, _BADGE_BOTTOM, cy - r_in, cy + r_in)
        else:
            draw.ellipse(box, fill=(120, 120, 125))
            r_in = r - frame
            draw.ellipse([cx - r_in, cy - r_in, cx + r_in, cy + r_in], fill=(175, 175, 180))
    fill = COLOURS[t.colour]
    r_obj = t.size * side / 2
    if look == "flat_badge":
        silhouette = _object_mask(t, side)
        image.paste(Image.new("RGB", image.size, fill), (0, 0), silhouette)
    else:
        outline = _object_mask(t, side, grow=0.045 * side)
        image.paste(Image.new("RGB", image.size, _OUTLINE), (0, 0), outline)
        _shaded(image, _object_mask(t, side), _mix(fill, (255, 255, 255), 0.45), _mix(fill, (0, 0, 0), 0.35),
                cy - r_obj, cy + r_obj)  # fmt: skip
    return image.resize((size, size), Image.Resampling.LANCZOS)


def styled_scene(shape: str, colour: str, background: str, rng: random.Random, look: str = "icon") -> Scene:
    """One object for ``look``: centred on the badge (jittered by up to 0.03 of the side), size 0.36-0.44; for
    ``wide_ring`` size 0.7-0.8 anywhere it fits (as a subject's instances are placed)."""
    if look == "wide_ring":
        size = rng.uniform(0.7, 0.8)
        half = size / 2
        return Scene(background, (Thing(shape, colour, rng.uniform(half, 1 - half), rng.uniform(half, 1 - half), size),))
    x, y = 0.5 + rng.uniform(-0.03, 0.03), 0.5 + rng.uniform(-0.03, 0.03)
    return Scene(background, (Thing(shape, colour, x, y, rng.uniform(0.36, 0.44)),))


def style_instances(style: Style | str, seed: int = 0) -> list[Scene]:
    """The style's instance scenes: each of its objects once, on its backgrounds in turn."""
    style = STYLES[style] if isinstance(style, str) else style
    rng = random.Random(f"style|{style.name}|{seed}")
    return [styled_scene(s, c, style.backgrounds[i % len(style.backgrounds)], rng, style.look)
            for i, (s, c) in enumerate(style.objects)]  # fmt: skip


def make_style_dataset(directory: str | os.PathLike, style: Style | str, seed: int = 0) -> Path:
    """Write ``style``'s instance images as an imagefolder (PNGs + ``metadata.jsonl`` with a ``prompt`` column).

    ``train_dreambooth_dora.py --dataset DIR`` reads it. Refuses a non-empty directory (nothing is overwritten).
    """
    style = STYLES[style] if isinstance(style, str) else style
    root = Path(directory)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; give a new directory for the style images")
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, scene in enumerate(style_instances(style, seed)):
        name = f"{style.name}_{i}.png"
        render_look(scene, style.look).save(root / name)
        t = scene.things[0]
        rows.append({"file_name": name, "prompt": style.prompt(t.shape, t.colour, scene.background)})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root


def eval_objects(style: Style | str) -> list[tuple[str, str, str]]:
    """8 (shape, colour, background) triples none of the instance images shows: the held-out trigger prompts (for a
    one-object style, a subject, its object on backgrounds none of its instances has)."""
    style = STYLES[style] if isinstance(style, str) else style
    seen = set(style.objects)
    if len(seen) == 1:  # a subject: its object on the backgrounds its instances never show
        unseen = [b for b in BACKGROUNDS if b not in style.backgrounds]
        return [(*style.objects[0], unseen[k % len(unseen)]) for k in range(8)]
    colours = [c for c in COLOURS if c != "white"]
    out = []
    k = 0
    while len(out) < 8:
        shape, colour = SHAPES[k % len(SHAPES)], colours[(3 * k + 1) % len(colours)]
        background = tuple(BACKGROUNDS)[(k + 2) % len(BACKGROUNDS)]
        if (shape, colour) not in seen and colour != background:
            out.append((shape, colour, background))
        k += 1
    return out


assert all(set(s.backgrounds) <= set(BACKGROUNDS) and s.look in LOOKS for s in STYLES.values())
