"""What the UNet is trained on, per micro-batch: latents from the VAE and prompt embeddings from the CLIPs.

Both can be computed once before training: latents with ``--cache_latents`` (the VAE's Gaussian is cached
and sampled every step, so cached and fresh latents follow the same distribution), prompt embeddings
whenever the text encoders are frozen.
"""

from __future__ import annotations

import torch
from torch import nn

from dora_diffusion.training.data.dataset import DreamBoothDataset, to_unit_range
from dora_diffusion.training.models import Components, encode_prompts


class LatentSource:
    """Latents of a micro-batch: from the VAE, or from distributions cached once with ``--cache_latents``."""

    def __init__(self, vae: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        self.vae, self.device, self.dtype = vae, device, dtype
        self.cache: dict[str, torch.Tensor] | None = None
        self.scale = float(vae.config.scaling_factor)
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)

    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist.parameters.float()  # (N, 8, h, w)

    @torch.no_grad()
    def fill_cache(self, dataset: DreamBoothDataset, batch_size: int = 4) -> None:
        """Encode every instance (and class) sample once; afterwards the dataset yields no pixels."""
        def encode_all(pixels: list[torch.Tensor]) -> list[torch.Tensor]:
            """One latent distribution per sample; samples of one shape (bucket) encoded ``batch_size`` at a time."""
            out: list[torch.Tensor | None] = [None] * len(pixels)
            by_shape: dict[tuple, list[int]] = {}
            for i, p in enumerate(pixels):
                by_shape.setdefault(tuple(p.shape), []).append(i)
            for members in by_shape.values():
                for first in range(0, len(members), batch_size):
                    chunk = members[first : first + batch_size]
                    encoded = self._encode(torch.stack([to_unit_range(pixels[i]) for i in chunk]))
                    for i, e in zip(chunk, encoded):
                        out[i] = e
            return out

        self.cache = {"instance": encode_all(dataset.pixels), "class": encode_all(dataset.class_pixels)}
        dataset.with_pixels = False

    def latents(self, batch: dict) -> torch.Tensor:
        """Sampled, scaled latents (N, 4, h, w) float32 for the micro-batch (instance then class samples)."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        if self.cache is not None:
            params = torch.stack([self.cache["instance"][i] for i in batch["index"].tolist()])
            if "class_index" in batch:
                params = torch.cat([params, torch.stack([self.cache["class"][c] for c in batch["class_index"].tolist()])])
        else:
            params = self._encode(batch["pixels"])
        z = DiagonalGaussianDistribution(params).sample()
        return ((z - self.shift) * self.scale).float()


class PromptSource:
    """Prompt embeddings of a micro-batch: precomputed once when the text encoders are frozen."""

    def __init__(self, components: Components, device: torch.device, trained: bool) -> None:
        self.components, self.device, self.trained = components, device, trained
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def fill_cache(self, prompts: list[str]) -> None:
        unique = list(dict.fromkeys(prompts))
        for first in range(0, len(unique), 8):
            chunk = unique[first : first + 8]
            hidden, pooled = encode_prompts(self.components, chunk, self.device)
            for k, p in enumerate(chunk):
                self.cache[p] = (hidden[k], pooled[k])

    def embeddings(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.trained:
            return encode_prompts(self.components, captions, self.device)
        hidden, pooled = zip(*(self.cache[c] for c in captions))
        return torch.stack(hidden), torch.stack(pooled)
