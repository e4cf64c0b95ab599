"""Score generated toy-world images the way DreamBooth's paper scores photos: CLIP-T, DINO / CLIP-I, language drift.

The reader (``reader.py``) reads each image; the prompt is parsed with the world's words. For images ``x_i`` with
prompts ``p_i`` (i = 1..N) and an optional subject ``S`` (trigger ``t``, shape ``s``, colour ``c``, decoration ``d``):

- ``prompt_fidelity = mean_i F_i``, ``F_i = (1 / |C_i|) sum_{k in C_i} [check k holds]`` (like CLIP-T), where the
  checks ``C_i`` are what ``p_i`` names: its background (``argmax background == named``) and, per named object,
  ``pair(shape, colour) > 0.5`` when both are named (a trigger names its subject's shape and colour), else
  ``shape > 0.5`` or ``colour > 0.5``, and ``decoration > 0.5`` when one is named ("with a ring", "with dots").
- ``subject_fidelity = mean_{i : t in p_i} cos(e(x_i), mean_j e(r_j))`` (like DINO / CLIP-I), ``e`` the reader's
  unit object embedding, ``r_1..r_6`` the rendered ``instance_scenes(S, 6, seed=0)``. 1 is the subject; about 1/2
  an object that has its (shape, colour) but not its decoration, or its decoration but another shape or colour.
- ``prior_preservation = mean_{i : t not in p_i} shape_s(x_i) * (1 - decoration_d(x_i))``: the probability that the
  class is drawn plain, as the base model draws it (1: no language drift; 0: the class took the subject's look).

With a style subject (``styles.STYLES``: one look, many objects) ``score(images, prompts, style=...)`` gives
``style_fidelity``, ``object_fidelity`` and ``style_preservation`` instead (``style_scores``), read by the style
reader (``style_reader.py``).

Validate the scorer: ``python -m dora_diffusion.toyworld.score --validate`` (``--validate_style`` for the style
measures).
"""

from __future__ import annotations

import argparse
import functools
import io
import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter

from dora_diffusion.toyworld.styles import LOOKS, STYLES, Style, render_look, style_instances, styled_scene
from dora_diffusion.toyworld.subjects import SUBJECTS, Subject, instance_caption, instance_scenes
from dora_diffusion.toyworld.world import BACKGROUNDS, COLOURS, DECORATIONS, RESOLUTION, SHAPES, Scene, Thing, caption, render, scenes

if TYPE_CHECKING:
    from dora_diffusion.toyworld.reader import Reading

_DECORATION_WORDS = {"ring": "ring", "rings": "ring", "dots": "dotted", "dotted": "dotted", "plain": "plain"}
_TRIGGERS = {s.trigger: s for s in SUBJECTS.values()}


@dataclass(frozen=True)
class NamedObject:
    """One object a prompt names; ``None`` where the prompt does not say."""

    shape: str | None = None
    colour: str | None = None
    decoration: str | None = None
    subject: Subject | None = None


@dataclass(frozen=True)
class Named:
    """What a prompt names in the world's words: a background (or ``None``) and objects."""

    background: str | None
    objects: tuple[NamedObject, ...]


def parse_prompt(prompt: str) -> Named:
    """The world's words in ``prompt``: ``"... on a <background> background"`` and objects split on ``"and"``.

    Words outside the vocabulary are ignored; a trigger word (``"sks"``) names its subject's shape and colour.
    """
    words = re.findall(r"[a-z]+", prompt.lower())
    background, cut = None, len(words)
    if "background" in words:
        at = len(words) - 1 - words[::-1].index("background")
        before = words[:at]
        cut = len(before) - 1 - before[::-1].index("on") if "on" in before else max(at - 1, 0)
        background = next((w for w in words[cut:at] if w in BACKGROUNDS), None)
    objects, chunk = [], []
    for w in [*words[:cut], "and"]:
        if w != "and":
            chunk.append(w)
            continue
        subject = next((_TRIGGERS[x] for x in chunk if x in _TRIGGERS), None)
        obj = NamedObject(
            shape=subject.shape if subject else next((x for x in chunk if x in SHAPES), None),
            colour=subject.colour if subject else next((x for x in chunk if x in COLOURS), None),
            decoration=None if subject else next((_DECORATION_WORDS[x] for x in chunk if x in _DECORATION_WORDS), None),
            subject=subject,
        )
        if obj != NamedObject():
            objects.append(obj)
        chunk = []
    return Named(background, tuple(objects))


def images_to_tensor(images: Sequence[Image.Image] | np.ndarray) -> torch.Tensor:
    """PIL images or an (N, H, W, 3) uint8 / float-in-[0, 1] array -> (N, 3, 64, 64) float in [0, 1]."""
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"image arrays must be (N, H, W, 3), got shape {images.shape}")
        if images.dtype != np.uint8:
            lo, hi = float(images.min()), float(images.max())
            if lo < -0.01 or hi > 1.01:
                raise ValueError(
                    f"float images must lie in [0, 1] (output_type='np'), got values in [{lo:.3f}, {hi:.3f}]"
                )
            images = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
        images = [Image.fromarray(a) for a in images]
    rows = []
    for im in images:
        if not isinstance(im, Image.Image):
            raise TypeError(f"images must be PIL images or one numpy array, got an item of type {type(im).__name__}")
        im = im.convert("RGB")
        if im.size != (RESOLUTION, RESOLUTION):
            im = im.resize((RESOLUTION, RESOLUTION), Image.Resampling.LANCZOS)
        rows.append(np.asarray(im, dtype=np.uint8))
    if not rows:
        raise ValueError("no images to score")
    return torch.from_numpy(np.stack(rows)).permute(0, 3, 1, 2).float() / 255  # (N, 3, 64, 64)


@functools.lru_cache(maxsize=None)
def _subject_reference(name: str) -> torch.Tensor:
    """Mean reader embedding of the subject's six reference instances (seed 0), shape (51,)."""
    from dora_diffusion.toyworld.reader import load_reader

    refs = images_to_tensor([render(s) for s in instance_scenes(name, 6, seed=0)])
    return load_reader().embed(refs).mean(0)


def _checks(named: Named, r: Reading, i: int) -> list[bool]:
    """The checks of image ``i`` against what its prompt names (module docstring), each True if the reader agrees."""
    from dora_diffusion.toyworld.reader import pair_index

    checks = []
    if named.background is not None:
        checks.append(int(r.background[i].argmax()) == list(BACKGROUNDS).index(named.background))
    for o in named.objects:
        if o.shape and o.colour:
            checks.append(float(r.pair[i, pair_index(o.shape, o.colour)]) > 0.5)
        elif o.shape:
            checks.append(float(r.shape[i, SHAPES.index(o.shape)]) > 0.5)
        elif o.colour:
            checks.append(float(r.colour[i, list(COLOURS).index(o.colour)]) > 0.5)
        if o.decoration:
            checks.append(float(r.decoration[i, DECORATIONS.index(o.decoration)]) > 0.5)
    return checks


def score(
    images: Sequence[Image.Image] | np.ndarray,
    prompts: Sequence[str],
    subject: Subject | str | None = None,
    style: Style | str | None = None,
) -> dict:
    """Score ``images`` against the ``prompts`` they were generated from (see the module docstring for the math).

    Returns ``n``, ``prompt_fidelity`` and ``per_image_prompt_fidelity``; with ``subject`` also
    ``subject_fidelity`` (over the ``n_subject`` images whose prompt holds the trigger; ``None`` if none) and
    ``prior_preservation`` (over the ``n_class`` other images; ``None`` if none), with per-image lists of both
    over every image (``per_image_subject_fidelity``, ``per_image_prior_preservation``). With ``style`` (a style
    subject, ``styles.STYLES``) instead the style measures of ``style_scores`` (its keys added; ``prompt_fidelity``
    is then not computed: the reader never saw an object on a badge, ``object_fidelity`` reads it instead).
    """
    from dora_diffusion.toyworld.reader import load_reader

    x = images_to_tensor(images)
    prompts = list(prompts)
    if len(prompts) != len(x):
        raise ValueError(f"got {len(x)} images but {len(prompts)} prompts; give one prompt per image")
    if style is not None:
        if subject is not None:
            raise ValueError("score one of subject= or style= at a time")
        return {"n": len(x), **style_scores(x, prompts, style)}
    if isinstance(subject, str):
        if subject not in SUBJECTS:
            raise ValueError(f"unknown subject {subject!r}; one of {sorted(SUBJECTS)}")
        subject = SUBJECTS[subject]
    reader = load_reader()
    r = reader.read(x)

    per_prompt = []
    for i, prompt in enumerate(prompts):
        checks = _checks(parse_prompt(prompt), r, i)
        if not checks:
            raise ValueError(
                f"prompt {prompt!r} names no background, shape or colour of the toy world; nothing to check"
            )
        per_prompt.append(sum(checks) / len(checks))
    out: dict = {"n": len(x), "prompt_fidelity": float(np.mean(per_prompt)), "per_image_prompt_fidelity": per_prompt}
    if subject is None:
        return out

    has_trigger = [subject.trigger in re.findall(r"[a-z]+", p.lower()) for p in prompts]
    sim = (reader.embed(x) @ _subject_reference(subject.name)).tolist()  # (N,): mean cosine to the references
    shape = r.shape[:, SHAPES.index(subject.shape)]  # (N,)
    plain = (shape * (1 - r.decoration[:, DECORATIONS.index(subject.decoration)])).tolist()
    subject_sims = [s for s, t in zip(sim, has_trigger) if t]
    class_plain = [p for p, t in zip(plain, has_trigger) if not t]
    out.update(
        n_subject=len(subject_sims),
        subject_fidelity=float(np.mean(subject_sims)) if subject_sims else None,
        per_image_subject_fidelity=sim,
        n_class=len(class_plain),
        prior_preservation=float(np.mean(class_plain)) if class_plain else None,
        per_image_prior_preservation=plain,
    )
    return out


def style_scores(images: Sequence[Image.Image] | np.ndarray | torch.Tensor, prompts: Sequence[str], style: Style | str) -> dict:
    """The style measures of ``images`` generated from ``prompts``, read by the style reader (``style_reader.py``).

    For images ``x_i`` with prompts ``p_i``, ``T`` the images whose prompt holds the style's trigger and ``C`` the others:

    - ``style_fidelity = mean_{i in T} P(look = style's look | x_i)``: 1 when drawn in the style, 0 when drawn plain
      or in another look;
    - ``object_fidelity = mean_{i in T} ([argmax shape = named] + [argmax colour = named]) / 2``: the object the
      prompt names is kept (an adapter must learn a look, not its instances' objects); only what is named counts;
    - ``style_preservation = mean_{i in C} (1 - P(look = style's look | x_i))``: the plain prompts still draw plain
      (1: no drift; 0: every prompt took the style).

    Each is ``None`` over an empty set; ``per_image_style_fidelity`` lists ``P(look)`` of every image.
    """
    from dora_diffusion.toyworld.style_reader import load_style_reader

    if isinstance(style, str):
        if style not in STYLES:
            raise ValueError(f"unknown style {style!r}; one of {sorted(STYLES)}")
        style = STYLES[style]
    x = images if isinstance(images, torch.Tensor) else images_to_tensor(images)
    r = load_style_reader().read(x)
    p_look = r.look[:, LOOKS.index(style.look)].tolist()
    has_trigger = [style.trigger in re.findall(r"[a-z]+", p.lower()) for p in prompts]
    kept = []
    for i, (prompt, t) in enumerate(zip(prompts, has_trigger)):
        if not t:
            continue
        named = parse_prompt(prompt).objects
        checks = []
        if named and named[0].shape:
            checks.append(int(r.shape[i].argmax()) == SHAPES.index(named[0].shape))
        if named and named[0].colour:
            checks.append(int(r.colour[i].argmax()) == list(COLOURS).index(named[0].colour))
        if checks:
            kept.append(sum(checks) / len(checks))
    styled = [p for p, t in zip(p_look, has_trigger) if t]
    plain = [1 - p for p, t in zip(p_look, has_trigger) if not t]
    return {
        "n_style": len(styled),
        "style_fidelity": float(np.mean(styled)) if styled else None,
        "object_fidelity": float(np.mean(kept)) if kept else None,
        "n_class": len(plain),
        "style_preservation": float(np.mean(plain)) if plain else None,
        "per_image_style_fidelity": p_look,
    }


# ------------------------------------------------------------------------------------------------ validation


def _restyle(scene: Scene, decoration: str | None = None, colour: str | None = None) -> Scene:
    """``scene`` with every object's decoration and / or colour replaced."""
    return Scene(scene.background, tuple(
        Thing(t.shape, colour or t.colour, t.x, t.y, t.size, decoration or t.decoration, t.ring_width) for t in scene.things
    ))


def _blur_jpeg(image: Image.Image) -> Image.Image:
    """``image`` degraded in ways the reader was not trained on: gaussian blur (radius 1) and JPEG at quality 40."""
    buffer = io.BytesIO()
    image.filter(ImageFilter.GaussianBlur(1.0)).save(buffer, format="JPEG", quality=40)
    return Image.open(buffer).convert("RGB")


def validation_figures(n_world: int = 200, seed: int = 7) -> dict[str, float]:
    """The scorer's figures on images whose truth is known (seeds other than the reader's training data).

    ``world_*``: ``n_world`` train-split scenes and ``n_world`` heldout-split scenes (one object each:
    ``sample_scene`` cannot draw two heldout objects) against their own captions, also blurred and
    JPEG-compressed, and against the captions of other scenes (``chance``); ``noise`` (64 images) and
    ``tiny_pipeline`` (8 images of the random tiny SDXL pipeline) against world captions. Per subject
    ``<name>_*``: subject_fidelity of its ``instances`` (seed 1), of the same scenes drawn ``plain`` or in
    ``another_colour``, and of plain world scenes of its shape (``same_shape``), all with instance prompts;
    prior_preservation of class images drawn plain (``class_plain``) or with its decoration (``class_decorated``).
    """
    world = scenes("train", n_world, seed) + scenes("heldout", n_world, seed, two_objects=0.0)
    images, prompts = [render(s) for s in world], [caption(s) for s in world]
    order = list(range(len(world)))
    random.Random(seed).shuffle(order)
    mismatched = [""] * len(world)
    for k, i in enumerate(order):  # a derangement: every image gets another scene's caption
        mismatched[i] = prompts[order[(k + 1) % len(order)]]
    noise = np.random.default_rng(seed).integers(0, 256, (64, RESOLUTION, RESOLUTION, 3), dtype=np.uint8)

    from dora_diffusion.testing import build_tiny_sdxl_pipeline

    pipe = build_tiny_sdxl_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    generated = pipe(prompts[:8], num_inference_steps=2, height=RESOLUTION, width=RESOLUTION,
                     generator=torch.Generator().manual_seed(0), output_type="np").images

    def fidelity(imgs: Sequence[Image.Image] | np.ndarray, texts: list[str]) -> float:
        return score(imgs, texts)["prompt_fidelity"]

    figures = {
        "world_own_captions": fidelity(images, prompts),
        "world_train_own_captions": fidelity(images[:n_world], prompts[:n_world]),
        "world_heldout_own_captions": fidelity(images[n_world:], prompts[n_world:]),
        "world_blurred_jpeg_own_captions": fidelity([_blur_jpeg(im) for im in images], prompts),
        "chance_mismatched_captions": fidelity(images, mismatched),
        "noise": fidelity(noise, prompts[:64]),
        "tiny_pipeline": fidelity(generated, prompts[:8]),
    }
    pool = scenes("train", 40 * n_world, seed + 1, two_objects=0.0)
    for subject in SUBJECTS.values():
        inst = instance_scenes(subject, 6, seed=1)
        other = next(c for c in COLOURS if c not in (subject.colour, "white"))
        same_shape = [s for s in pool if s.things[0].shape == subject.shape][:48]

        def instance_score(batch: list[Scene]) -> dict:
            return score([render(s) for s in batch], [instance_caption(subject, s) for s in batch], subject)

        def class_score(batch: list[Scene]) -> float:
            class_prompts = [f"{subject.class_prompt} on a {s.background} background" for s in batch]
            return score([render(s) for s in batch], class_prompts, subject)["prior_preservation"]

        name = subject.name
        figures[f"{name}_instances"] = instance_score(inst)["subject_fidelity"]
        figures[f"{name}_plain"] = instance_score([_restyle(s, decoration="plain") for s in inst])["subject_fidelity"]
        recoloured = [_restyle(s, colour=other) for s in inst]
        figures[f"{name}_another_colour"] = instance_score(recoloured)["subject_fidelity"]
        figures[f"{name}_same_shape"] = instance_score(same_shape)["subject_fidelity"]
        figures[f"{name}_instance_prompt_fidelity"] = instance_score(inst)["prompt_fidelity"]
        figures[f"{name}_class_plain"] = class_score(same_shape)
        decorated = [_restyle(s, decoration=subject.decoration) for s in same_shape]
        figures[f"{name}_class_decorated"] = class_score(decorated)
    return figures


def style_validation_figures(style: Style | str = "icon", n: int = 48, seed: int = 7) -> dict[str, float]:
    """The style measures on images whose truth is known (seeds other than the style reader's training data).

    ``<style>_*``: ``style_fidelity`` with the style's trigger prompts of ``n`` rendered scenes in the style
    (``instances``), the same after the shipped VAE's round trip (``vae_round_trip``: the ceiling a UNet can reach)
    or blurred and JPEG-compressed, drawn plain (``world_plain``), as the ring or dotted subjects (``decorated``), and
    in each other look (``look_<name>``); ``object_fidelity`` of the styled images against their own prompts
    (``own_objects``) and against other images' prompts (``chance_objects``); ``style_preservation`` of plain class
    images (``class_plain``) and of class prompts drawn in the style (``class_styled``).
    """
    style = STYLES[style] if isinstance(style, str) else style
    rng = random.Random(f"validate-style|{seed}")
    from dora_diffusion.toyworld.world import triples

    picks = [rng.choice(triples("train") + triples("heldout")) for _ in range(n)]
    styled = [styled_scene(shape, colour, bg, rng, style.look) for shape, colour, bg in picks]
    prompts = [style.prompt(t.things[0].shape, t.things[0].colour, t.background) for t in styled]
    plain_prompts = [style.class_prompt(t.things[0].shape, t.things[0].colour, t.background) for t in styled]
    images = [render_look(sc, style.look) for sc in styled]
    world = [render(sc) for sc in styled]  # the same objects, plain, where the world draws them
    decorated = [render(_restyle(sc, decoration=("ring", "dotted")[k % 2])) for k, sc in enumerate(styled)]
    from dora_diffusion.toyworld.style_reader import vae_round_trip

    round_trip = vae_round_trip(images_to_tensor(images))
    shifted = prompts[1:] + prompts[:1]

    def fid(imgs, texts=prompts) -> float:
        return style_scores(imgs, texts, style)["style_fidelity"]

    name = style.name
    figures = {
        f"{name}_instances": fid(images),
        f"{name}_vae_round_trip": fid(round_trip),
        f"{name}_blurred_jpeg": fid([_blur_jpeg(im) for im in images]),
        f"{name}_world_plain": fid(world),
        f"{name}_decorated": fid(decorated),
    }
    for look in LOOKS:
        if look not in ("none", style.look):
            figures[f"{name}_look_{look}"] = fid([render_look(sc, look) for sc in styled])
    figures[f"{name}_own_objects"] = style_scores(images, prompts, style)["object_fidelity"]
    figures[f"{name}_vae_round_trip_own_objects"] = style_scores(round_trip, prompts, style)["object_fidelity"]
    figures[f"{name}_chance_objects"] = style_scores(images, shifted, style)["object_fidelity"]
    figures[f"{name}_class_plain"] = style_scores(world, plain_prompts, style)["style_preservation"]
    figures[f"{name}_class_styled"] = style_scores(images, plain_prompts, style)["style_preservation"]
    figures[f"{name}_train_instances"] = fid([render_look(sc, style.look) for sc in style_instances(style)],
                                             [style.prompt(sc.things[0].shape, sc.things[0].colour, sc.background)
                                              for sc in style_instances(style)])  # fmt: skip
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description="The toy-world scorer.")
    parser.add_argument("--validate", action="store_true", help="print the scorer's figures on known images")
    parser.add_argument("--validate_style", action="store_true", help="print the style measures' figures on known images")
    args = parser.parse_args()
    if not (args.validate or args.validate_style):
        parser.error("nothing to do; pass --validate or --validate_style (score() is the library entry point)")
    torch.set_num_threads(1)
    figures = validation_figures() if args.validate else {}
    if args.validate_style:
        for style in STYLES.values():
            figures.update(style_validation_figures(style))
    for name, value in figures.items():
        print(f"{name:40s} {value:.3f}")


if __name__ == "__main__":
    main()
