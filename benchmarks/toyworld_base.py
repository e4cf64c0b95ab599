"""Score the toy world's base model: prompt fidelity on train and held-out captions, and a picture grid.

    python benchmarks/toyworld_base.py [--pipeline DIR] [--n 48] [--grid docs/img/toyworld_base.png]

Images: 20 Euler steps, guidance 4, seeds 0..n-1, one caption each (``toyworld.captions(split, n, seed=11)``).
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", default=None, help="Pretrained directory (default: the shipped one).")
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--grid", default=None, help="Also write a grid PNG (rows: caption, base model image) here.")
    args = p.parse_args()
    pipe = toyworld.load_pipeline(args.pipeline)
    start = time.perf_counter()
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
