"""The style reader: a small CNN that tells a toy-world image's look (``styles.LOOKS``) and its object's shape and
colour in any look, as the reader (``reader.py``) reads the world's plain scenes. The scorer's style measures use it.

For an image ``x`` in ``[0, 1]^(3, 64, 64)`` it gives ``look``: softmax over ``LOOKS`` (6: the world's own images,
the ``icon`` style, three decoys and the reworked ring star's wide ring), ``shape``: softmax over ``SHAPES`` and ``colour``: softmax over ``COLOURS``
of the (one, main) object. The reader stays as it is (its figures are documented); this one is trained apart.

Training data: one-object scenes, a sixth in each look (``none``: world objects of sizes 0.38-0.8, plain, ringed
or dotted with probability 1/2, 1/4, 1/4), any shape, colour and background; half of them passed once through the shipped
toy-world VAE (what every generated image goes through: it smears the badge's gradient), then degraded per step as
the reader's data are (``reader.degrade``: blur, blockiness, colour shifts, noise).

Train and ship the weights: ``python -m dora_diffusion.toyworld.style_reader --out
dora_diffusion/toyworld/assets/style_reader.safetensors``; load them with ``load_style_reader()``.
"""

from __future__ import annotations

import argparse
import functools
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from dora_diffusion.toyworld.reader import conv_block, degrade, ship_weights, to_tensor
from dora_diffusion.toyworld.styles import LOOKS, render_look, styled_scene
from dora_diffusion.toyworld.world import BACKGROUNDS, COLOURS, DECORATIONS, RESOLUTION, SHAPES, Scene, Thing

ASSET_PATH = Path(__file__).with_name("assets") / "style_reader.safetensors"
_HEADS = {"look": len(LOOKS), "shape": len(SHAPES), "colour": len(COLOURS)}


@dataclass
class StyleReading:
    """What the style reader sees in N images: probabilities, one row per image."""

    look: torch.Tensor  # (N, 6) softmax over LOOKS
    shape: torch.Tensor  # (N, 6) softmax over SHAPES
    colour: torch.Tensor  # (N, 8) softmax over COLOURS


class StyleReader(nn.Module):
    """CNN 64 -> 32 -> 16 -> 8 pixels; each head reads the features' mean and maximum over the 8 x 8 places."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_block(3, 24, 2), conv_block(24, 32), conv_block(32, 48, 2), conv_block(48, 64), conv_block(64, 96, 2), conv_block(96, 96),
        )  # (N, 96, 8, 8)
        self.heads = nn.Linear(2 * 96, sum(_HEADS.values()))

    def logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw head outputs for ``images`` (N, 3, 64, 64) in [0, 1]."""
        if images.ndim != 4 or images.shape[1:] != (3, RESOLUTION, RESOLUTION):
            raise ValueError(f"the style reader takes (N, 3, {RESOLUTION}, {RESOLUTION}) images, got {tuple(images.shape)}")
        f = self.features(images * 2 - 1)  # (N, 96, 8, 8)
        out = self.heads(torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1))  # (N, 19)
        return dict(zip(_HEADS, out.split(list(_HEADS.values()), 1)))

    @torch.no_grad()
    def read(self, images: torch.Tensor) -> StyleReading:
        """Probabilities of every head for ``images`` (N, 3, 64, 64) in [0, 1]."""
        out = self.logits(images)
        return StyleReading(*(out[k].softmax(1) for k in _HEADS))


@functools.lru_cache(maxsize=1)
def load_style_reader(path: str | None = None) -> StyleReader:
    """The trained style reader (eval mode, fp32, on CPU), read once from ``path`` (default: the shipped weights)."""
    path = Path(path) if path is not None else ASSET_PATH
    if not path.is_file():
        raise FileNotFoundError(
            f"style reader weights {path} not found; train them with "
            f"`python -m dora_diffusion.toyworld.style_reader --out {path}`"
        )
    reader = StyleReader()
    reader.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return reader.eval()


# ------------------------------------------------------------------------------------------------ data


def style_reader_scene(rng: random.Random) -> tuple[Scene, str]:
    """A training scene and its look: a look drawn uniformly, any (shape, colour, background), one object."""
    look = rng.choice(LOOKS)
    background = rng.choice(tuple(BACKGROUNDS))
    shape, colour = rng.choice(SHAPES), rng.choice([c for c in COLOURS if c != background])
    if look == "none":
        size = rng.uniform(0.38, 0.8)  # up to the wide ring's sizes: the ring's width tells them apart, not the size
        half = size / 2
        decoration = rng.choices(DECORATIONS, (0.5, 0.25, 0.25))[0]
        thing = Thing(shape, colour, rng.uniform(half, 1 - half), rng.uniform(half, 1 - half), size, decoration)
        return Scene(background, (thing,)), look
    scene = styled_scene(shape, colour, background, rng, look)
    if look == "wide_ring":
        return scene, look
    t = scene.things[0]  # badges off-centre by up to 0.06 too: generated images are not drawn to the pixel
    moved = Thing(t.shape, t.colour, t.x + rng.uniform(-0.03, 0.03), t.y + rng.uniform(-0.03, 0.03), t.size)
    return Scene(background, (moved,)), look


@functools.lru_cache(maxsize=1)
def _shipped_vae():
    """The shipped toy-world pipeline's VAE in float32 (read from its folder, not through ``load_pipeline``)."""
    from diffusers import AutoencoderKL

    from dora_diffusion.hub import dtype_keyword

    folder = Path(__file__).with_name("assets") / "pipeline" / "vae"
    return AutoencoderKL.from_pretrained(folder, **{dtype_keyword(): torch.float32}).eval()


@torch.no_grad()
def vae_round_trip(images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """``images`` (N, 3, 64, 64) in [0, 1] encoded and decoded by the shipped toy-world VAE (latent means)."""
    vae = _shipped_vae()
    out = []
    for chunk in images.split(batch):
        z = vae.encode(chunk * 2 - 1).latent_dist.mean
        out.append(((vae.decode(z).sample + 1) / 2).clamp(0, 1))
    return torch.cat(out)


def rendered_style_set(n: int, seed: int, vae_fraction: float = 0.5) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``n`` scenes rendered once (uint8 (n, 3, 64, 64)), the first ``vae_fraction`` of them VAE round-tripped."""
    rng = random.Random(f"style_reader|{seed}")
    batch = [style_reader_scene(rng) for _ in range(n)]
    images = to_tensor([render_look(s, look) for s, look in batch])
    k = int(n * vae_fraction)
    if k:
        images[:k] = vae_round_trip(images[:k])
    target = {
        "look": torch.tensor([LOOKS.index(look) for _, look in batch]),
        "shape": torch.tensor([SHAPES.index(s.things[0].shape) for s, _ in batch]),
        "colour": torch.tensor([list(COLOURS).index(s.things[0].colour) for s, _ in batch]),
    }
    return (images * 255).round().to(torch.uint8), target


@torch.no_grad()
def accuracies(reader: StyleReader, images: torch.Tensor, target: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per head, the fraction of images whose argmax is the label."""
    r = reader.eval().read(images)
    return {k: (getattr(r, k).argmax(1) == target[k]).float().mean().item() for k in _HEADS}


def train_style_reader(
    out_path: str | Path, seed: int = 0, steps: int = 1000, n_train: int = 6000, batch_size: int = 32
) -> dict[str, float]:
    """Train the style reader for ``steps`` AdamW steps on one thread (deterministic from ``seed``); save fp16
    weights to ``out_path``; return accuracies on 600 held-out scenes (another seed, VAE round trip and degraded)."""
    start = time.monotonic()
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, target = rendered_style_set(n_train, seed)
    val_images, val_target = rendered_style_set(600, seed + 10_000)
    val_images = degrade(val_images.float() / 255, torch.Generator().manual_seed(seed + 1))
    print(f"rendered {n_train} + 600 scenes in {time.monotonic() - start:.0f} s", flush=True)
    reader = StyleReader()
    optimizer = torch.optim.AdamW(reader.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        idx = torch.randint(0, n_train, (batch_size,), generator=generator)
        logits = reader.train().logits(degrade(images[idx].float() / 255, generator))
        loss = sum(F.cross_entropy(logits[k], target[k][idx]) for k in _HEADS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.monotonic() - start:.0f} s", flush=True)
    return ship_weights(reader, out_path, lambda r: accuracies(r, val_images, val_target), steps, start)


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the toy-world style reader and save its weights.")
    parser.add_argument("--out", default=str(ASSET_PATH), help="where to write the safetensors weights")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, initialisation and augmentation")
    parser.add_argument("--steps", type=int, default=1000, help="AdamW steps of batch 32")
    args = parser.parse_args()
    train_style_reader(args.out, seed=args.seed, steps=args.steps)


if __name__ == "__main__":
    main()
