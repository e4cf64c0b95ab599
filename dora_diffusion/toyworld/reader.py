"""The reader: a small CNN that reads a toy-world image the way CLIP and DINO read photos for DreamBooth's metrics.

It sees more of the world than the base model (decorated objects, every split) and is trained on rendered scenes
degraded the way generated images are (blur, noise, colour shifts, blockiness). For an image ``x`` in
``[0, 1]^(3, 64, 64)`` it gives

- ``background``: ``softmax`` over ``BACKGROUNDS`` (6),
- ``shape``, ``colour``: ``sigmoid`` per shape (6) and per colour (8): "some object has this shape / colour",
- ``pair``: ``sigmoid`` per (shape, colour) (6 x 8 = 48, row-major over ``SHAPES`` x ``COLOURS``),
- ``decoration``: ``sigmoid`` per ``DECORATIONS`` (3): "some object carries this decoration",

and ``embed(x) = e / ||e||`` with ``e = [pair ; decoration]`` (51 numbers, background left out, so a subject on
another background is still the subject). For one-object images read with confidence, the cosine of two
embeddings is 1 when shape, colour and decoration all agree, 1/2 when (shape, colour) or the decoration agrees but
not both, and 0 otherwise.

Train and ship the weights: ``python -m dora_diffusion.toyworld.reader --out
dora_diffusion/toyworld/assets/reader.safetensors``; load them with ``load_reader()``.
"""

from __future__ import annotations

import argparse
import functools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from dora_diffusion.toyworld.world import BACKGROUNDS, COLOURS, DECORATIONS, RESOLUTION, SHAPES, Scene, Thing, render

ASSET_PATH = Path(__file__).with_name("assets") / "reader.safetensors"
_SHAPE_INDEX = {s: i for i, s in enumerate(SHAPES)}
_COLOUR_INDEX = {c: i for i, c in enumerate(COLOURS)}
_BACKGROUND_INDEX = {b: i for i, b in enumerate(BACKGROUNDS)}
_DECORATION_INDEX = {d: i for i, d in enumerate(DECORATIONS)}
_HEADS = {"background": len(BACKGROUNDS), "shape": len(SHAPES), "colour": len(COLOURS),
          "pair": len(SHAPES) * len(COLOURS), "decoration": len(DECORATIONS)}


def pair_index(shape: str, colour: str) -> int:
    """Column of (shape, colour) in the ``pair`` head."""
    return _SHAPE_INDEX[shape] * len(COLOURS) + _COLOUR_INDEX[colour]


@dataclass
class Reading:
    """What the reader sees in N images: probabilities, one row per image."""

    background: torch.Tensor  # (N, 6) softmax
    shape: torch.Tensor  # (N, 6) sigmoid
    colour: torch.Tensor  # (N, 8) sigmoid
    pair: torch.Tensor  # (N, 48) sigmoid, pair_index order
    decoration: torch.Tensor  # (N, 3) sigmoid


def conv_block(c_in: int, c_out: int, stride: int = 1, kernel: int = 3) -> nn.Sequential:
    conv = nn.Conv2d(c_in, c_out, kernel, stride, 1, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Reader(nn.Module):
    """CNN 64 -> 32 -> 16 -> 8 pixels (receptive field 60 pixels, an object's size).

    Presence heads detect at each of the 8 x 8 places and take the maximum over places, so a (shape, colour)
    pair is seen only where one object has both: ``logit_k(x) = max_{u,v} head_k(f(x)_{:,u,v})``. The background
    head reads the features' mean over places.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_block(3, 24, 2, kernel=4), conv_block(24, 32),  # (N, 32, 32, 32)
            conv_block(32, 48, 2), conv_block(48, 64),  # (N, 64, 16, 16)
            conv_block(64, 96, 2), conv_block(96, 128), conv_block(128, 128),  # (N, 128, 8, 8)
        )
        n_presence = sum(n for name, n in _HEADS.items() if name != "background")
        self.presence = nn.Sequential(nn.Conv2d(128, 128, 1), nn.ReLU(inplace=True), nn.Conv2d(128, n_presence, 1))
        self.background = nn.Linear(128, _HEADS["background"])
        self.to(memory_format=torch.channels_last)

    def logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw head outputs for ``images`` (N, 3, 64, 64) in [0, 1]."""
        if images.ndim != 4 or images.shape[1:] != (3, RESOLUTION, RESOLUTION):
            raise ValueError(f"the reader takes (N, 3, {RESOLUTION}, {RESOLUTION}) images, got {tuple(images.shape)}")
        f = self.features((images * 2 - 1).contiguous(memory_format=torch.channels_last))  # (N, 128, 8, 8)
        present = self.presence(f).amax((2, 3))  # (N, 65): best place per question
        names = [name for name in _HEADS if name != "background"]
        out = dict(zip(names, present.split([_HEADS[n] for n in names], 1)))
        return {"background": self.background(f.mean((2, 3))), **out}

    @torch.no_grad()
    def read(self, images: torch.Tensor) -> Reading:
        """Probabilities of every head for ``images`` (N, 3, 64, 64) in [0, 1]."""
        out = self.logits(images)
        sig = {k: out[k].sigmoid() for k in ("shape", "colour", "pair", "decoration")}
        return Reading(out["background"].softmax(1), **sig)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Object embedding ``[pair ; decoration] / ||.||`` (N, 51): background excluded."""
        r = self.read(images)
        return F.normalize(torch.cat([r.pair, r.decoration], 1), dim=1)


@functools.lru_cache(maxsize=1)
def load_reader(path: str | None = None) -> Reader:
    """The trained reader (eval mode, fp32, on CPU), read once from ``path`` (default: the shipped weights)."""
    path = Path(path) if path is not None else ASSET_PATH
    if not path.is_file():
        raise FileNotFoundError(
            f"reader weights {path} not found; train them with "
            f"`python -m dora_diffusion.toyworld.reader --out {path}`"
        )
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    reader = Reader()
    reader.load_state_dict(state)
    return reader.eval()


# ------------------------------------------------------------------------------------------------ data


def reader_scene(rng: random.Random) -> Scene:
    """A training scene of any (shape, colour, background), split ignored.

    1 in 20 is empty; 35% of the rest hold two objects of different shapes (laid out as ``sample_scene`` does);
    each object is plain / ring / dotted with probability 0.5 / 0.25 / 0.25.
    """
    background = rng.choice(tuple(BACKGROUNDS))
    if rng.random() < 0.05:
        return Scene(background, ())
    colours = [c for c in COLOURS if c != background]  # never the background's colour, as in the world

    def thing(shape: str, x: float, y: float, size: float) -> Thing:
        return Thing(shape, rng.choice(colours), x, y, size, rng.choices(DECORATIONS, (0.5, 0.25, 0.25))[0])

    if rng.random() >= 0.35:
        size = rng.uniform(0.38, 0.62)
        half = size / 2
        x, y = rng.uniform(half, 1 - half), rng.uniform(half, 1 - half)
        return Scene(background, (thing(rng.choice(SHAPES), x, y, size),))
    shape1, shape2 = rng.sample(SHAPES, 2)
    size1, size2 = rng.uniform(0.3, 0.42), rng.uniform(0.3, 0.42)
    left = thing(shape1, rng.uniform(size1 / 2, 0.5 - size1 / 2 + 0.02), rng.uniform(0.25, 0.75), size1)
    right = thing(shape2, rng.uniform(0.5 + size2 / 2 - 0.02, 1 - size2 / 2), rng.uniform(0.25, 0.75), size2)
    return Scene(background, (left, right))


def labels(scene: Scene) -> dict[str, torch.Tensor]:
    """Targets of one scene: background index and the multi-hot presence vectors of the other heads."""
    out = {name: torch.zeros(n) for name, n in _HEADS.items() if name != "background"}
    for t in scene.things:
        out["shape"][_SHAPE_INDEX[t.shape]] = 1
        out["colour"][_COLOUR_INDEX[t.colour]] = 1
        out["pair"][pair_index(t.shape, t.colour)] = 1
        out["decoration"][_DECORATION_INDEX[t.decoration]] = 1
    out["background"] = torch.tensor(_BACKGROUND_INDEX[scene.background])
    return out


def to_tensor(images: list) -> torch.Tensor:
    """PIL images (64 x 64 RGB) -> (N, 3, 64, 64) float in [0, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])  # (N, 64, 64, 3)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255


def rendered_set(n: int, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``n`` reader scenes rendered once: images (n, 3, 64, 64) uint8 and stacked labels."""
    rng = random.Random(f"reader|{seed}")
    batch = [reader_scene(rng) for _ in range(n)]
    images = (to_tensor([render(s) for s in batch]) * 255).round().to(torch.uint8)
    rows = [labels(s) for s in batch]
    return images, {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def degrade(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Make rendered images (N, 3, 64, 64) in [0, 1] look generated.

    Per image: horizontal flip (p 1/2); gaussian blur with sigma ~ U(0, 1.5); blockiness (p 0.3: 2x down- and
    bilinear up-sampling); per-channel gain ~ U(0.92, 1.08) and offset ~ U(-0.05, 0.05); gaussian noise with
    std ~ U(0, 0.06); clamp to [0, 1].
    """
    n = images.shape[0]

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, *shape, generator=generator)

    x = torch.where(torch.rand(n, 1, 1, 1, generator=generator) < 0.5, images.flip(3), images)
    sigma = u(0.0, 1.5).clamp_min(1e-3)  # (N,)
    taps = torch.arange(-4, 5, dtype=torch.float32)
    kernel = torch.exp(-(taps[None] ** 2) / (2 * sigma[:, None] ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(3, 0)  # (3N, 9)
    flat = F.pad(x.reshape(1, 3 * n, RESOLUTION, RESOLUTION), (4, 4, 4, 4), mode="replicate")
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=3 * n)
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=3 * n)
    x = flat.reshape(n, 3, RESOLUTION, RESOLUTION)
    blocky = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="bilinear", align_corners=False)
    x = torch.where(torch.rand(n, 1, 1, 1, generator=generator) < 0.3, blocky, x)
    x = x * u(0.92, 1.08, 3, 1, 1) + u(-0.05, 0.05, 3, 1, 1)
    x = x + torch.randn(x.shape, generator=generator) * u(0.0, 0.06, 1, 1, 1)
    return x.clamp(0, 1)


# ------------------------------------------------------------------------------------------------ training


def _loss(logits: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> torch.Tensor:
    loss = F.cross_entropy(logits["background"], target["background"])
    for name in ("shape", "colour", "pair", "decoration"):
        loss = loss + F.binary_cross_entropy_with_logits(logits[name], target[name]) * _HEADS[name] / 6
    return loss


@torch.no_grad()
def accuracies(reader: Reader, images: torch.Tensor, target: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per head, the fraction of images read wholly right: background argmax; every presence label at 0.5."""
    r = reader.eval().read(images)
    out = {"background": (r.background.argmax(1) == target["background"]).float().mean().item()}
    for name in ("shape", "colour", "pair", "decoration"):
        out[name] = ((getattr(r, name) > 0.5) == target[name].bool()).all(1).float().mean().item()
    return out


def train_reader(
    out_path: str | Path,
    minutes: float = 6.0,
    seed: int = 0,
    steps: int = 2400,
    n_train: int = 14000,
    batch_size: int = 32,
) -> dict[str, float]:
    """Train the reader on ``n_train`` rendered reader scenes for ``steps`` Adam steps (one thread).

    Deterministic from ``seed`` unless the run reaches ``minutes`` (counted from the start, rendering included),
    where it stops early and says so. Saves fp16 weights to ``out_path``; returns held-out accuracies per head
    (1000 degraded scenes of another seed).
    """
    start = time.monotonic()
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, target = rendered_set(n_train, seed)
    val_images, val_target = rendered_set(1000, seed + 10_000)
    val_images = degrade(val_images.float() / 255, torch.Generator().manual_seed(seed + 1))
    print(f"rendered {n_train} + 1000 scenes in {time.monotonic() - start:.0f} s")

    reader = Reader()
    optimizer = torch.optim.AdamW(reader.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    done = 0
    for step in range(steps):
        if time.monotonic() - start > minutes * 60 - 20:
            print(f"stopped at step {step} of {steps}: the {minutes}-minute budget is spent (not deterministic)")
            break
        idx = torch.randint(0, n_train, (batch_size,), generator=generator)
        batch = degrade(images[idx].float() / 255, generator)
        loss = _loss(reader.train().logits(batch), {k: v[idx] for k, v in target.items()})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        done = step + 1
        if step % 200 == 0:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.monotonic() - start:.0f} s")

    return ship_weights(reader, out_path, lambda r: accuracies(r, val_images, val_target), done, start)


def ship_weights(
    reader: nn.Module, out_path: str | Path, check: Callable[[nn.Module], dict[str, float]], steps: int, start: float
) -> dict[str, float]:
    """Save ``reader``'s weights in fp16 to ``out_path``, load them back (what ships is what is checked), and return
    and print ``check(reader)``, the held-out accuracy per head, after ``steps`` steps begun at ``start``
    (``time.monotonic``)."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().half().contiguous() for k, v in reader.state_dict().items()}, str(out_path))
    reader.load_state_dict({k: v.float() for k, v in load_file(str(out_path)).items()})
    acc = check(reader)
    print(f"trained {steps} steps in {time.monotonic() - start:.0f} s; saved {out_path}")
    print("held-out accuracy per head: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    return acc


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the toy-world reader and save its weights.")
    parser.add_argument("--out", default=str(ASSET_PATH), help="where to write the safetensors weights")
    parser.add_argument("--minutes", type=float, default=6.0, help="wall-clock budget, rendering included")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, initialisation and augmentation")
    parser.add_argument("--steps", type=int, default=2400, help="Adam steps of batch 32")
    args = parser.parse_args()
    train_reader(args.out, minutes=args.minutes, seed=args.seed, steps=args.steps)


if __name__ == "__main__":
    main()
