"""Score the toy world's base model: prompt fidelity on train and held-out captions, and a picture grid.

    python benchmarks/toyworld_base.py [--pipeline DIR] [--n 48] [--grid docs/img/toyworld_base.png]

Images: 20 Euler steps, guidance 4, seeds 0..n-1, one caption each (``toyworld.captions(split, n, seed=11)``).
First the ceiling the VAE sets: rendered scenes of each split, encoded and decoded, scored against their captions.
"""

from __future__ import annotations

import argparse
import time

import torch
from PIL import Image

from dora_diffusion import toyworld


def generate(pipe, prompts: list[str], seed: int = 0, batch: int = 16) -> list[Image.Image]:
    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        gens = [torch.Generator().manual_seed(seed + i + k) for k in range(len(chunk))]
        out += pipe(chunk, num_inference_steps=20, guidance_scale=4.0, generator=gens).images
    return out


@torch.no_grad()
def vae_ceiling(pipe, split: str, n: int) -> tuple[float, float]:
    """(MSE on [-1, 1], prompt fidelity) of ``n`` rendered ``split`` scenes after a VAE round trip."""
    import numpy as np

    world = toyworld.scenes(split, n, seed=5)
    x = torch.from_numpy(np.stack([np.asarray(toyworld.render(s)) for s in world])).permute(0, 3, 1, 2)
    x = x.float() / 127.5 - 1.0
    vae = pipe.vae
    y = vae.decode(vae.encode(x.to(vae.dtype)).latent_dist.mean).sample.float().clamp(-1, 1)
    images = [Image.fromarray(((im.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype("uint8")) for im in y]
    fidelity = toyworld.score(images, [toyworld.caption(s) for s in world])["prompt_fidelity"]
    return float(((y - x) ** 2).mean()), fidelity


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", default=None, help="Pretrained directory (default: the shipped one).")
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--grid", default=None, help="Also write a grid PNG (rows: caption, base model image) here.")
    args = p.parse_args()
    pipe = toyworld.load_pipeline(args.pipeline)
    start = time.perf_counter()
    for split in ("train", "heldout"):
        mse, fidelity = vae_ceiling(pipe, split, args.n)
        print(f"{split:>8}: VAE round trip of rendered scenes: MSE {mse:.4f}, prompt fidelity {fidelity:.3f}")
    shown = []
    for split in ("train", "heldout"):
        prompts = toyworld.captions(split, args.n, seed=11)
        images = generate(pipe, prompts)
        figures = toyworld.score(images, prompts)
        print(f"{split:>8}: prompt fidelity {figures['prompt_fidelity']:.3f} over {len(images)} images")
        shown += list(zip(prompts[:8], images[:8]))
    print(f"({time.perf_counter() - start:.0f} s)")
    if args.grid:
        grid = Image.new("RGB", (8 * 128, 2 * 128), "white")
        for k, (_, image) in enumerate(shown):
            grid.paste(image.resize((128, 128), Image.Resampling.NEAREST), ((k % 8) * 128, (k // 8) * 128))
        grid.save(args.grid)
        for k, (prompt, _) in enumerate(shown):
            print(f"row {k // 8 + 1} col {k % 8 + 1}: {prompt}")


if __name__ == "__main__":
    main()
