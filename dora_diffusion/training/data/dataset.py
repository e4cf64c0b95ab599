"""Training samples: resize + crop + flip with SDXL micro-conditioning (the order they come in: ``sampling``).

Every sample is resized, cropped and flipped once, when the dataset is built, and kept as uint8 pixels
(3 MB per sample at 1024 px): a training step only converts them to floats.

Everything random here is a pure function of ``(seed, index)``: a sample's crop and flip are drawn once per
dataset item (each ``--repeats`` copy draws its own, as in diffusers), and the order of epoch ``e`` is a
permutation seeded by ``(seed, e)``. So cached latents equal fresh ones and a resumed run sees exactly the
micro-batches an uninterrupted run would.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from dora_diffusion.training.data.buckets import nearest_bucket
from dora_diffusion.training.data.records import Record, resized_size
from dora_diffusion.training.data.sampling import AUGMENT, CLASS_AUGMENT, derive_seed


@dataclass(frozen=True)
class CropPlan:
    """Where a sample comes from: resize to ``resized`` (w, h), crop ``target`` (w, h) at (top, left), maybe flip."""

    original_size: tuple[int, int]
    """(height, width) of the image before resizing."""
    resized: tuple[int, int]
    """(width, height) after resizing to cover the target."""
    top: int
    left: int
    flip: bool
    target: tuple[int, int]
    """(width, height) of the crop: the square resolution, or an aspect-ratio bucket."""

    @property
    def crop_top_left(self) -> tuple[int, int]:
        """(top, left) of the crop in the image the model sees: after a flip, left counts from the flipped side."""
        width = self.resized[0]
        left = width - self.target[0] - self.left if self.flip else self.left
        return self.top, left

    def time_ids(self) -> torch.Tensor:
        """SDXL's micro-conditioning: original size, crop top-left, target size (h, w), (6,) float32."""
        values = (*self.original_size, *self.crop_top_left, self.target[1], self.target[0])
        return torch.tensor(values, dtype=torch.float32)


def plan_crop(
    size: tuple[int, int], target: int | tuple[int, int], center_crop: bool, random_flip: bool, seed: int
) -> CropPlan:
    """The resize/crop/flip of an image of ``size`` (w, h) to ``target`` (a square side, or (w, h)), from ``seed``.

    The image is resized (keeping its aspect ratio) to the smallest size that covers the target.
    """
    w, h = size
    tw, th = (target, target) if isinstance(target, int) else target
    if tw == th:
        rw, rh = resized_size(size, tw)
    else:
        scale = max(tw / w, th / h)
        rw, rh = max(tw, round(w * scale)), max(th, round(h * scale))
    rng = random.Random(seed)
    if center_crop:
        top, left = int(round((rh - th) / 2)), int(round((rw - tw) / 2))
    else:
        top, left = rng.randint(0, rh - th), rng.randint(0, rw - tw)
    flip = random_flip and rng.random() < 0.5
    return CropPlan((h, w), (rw, rh), top, left, flip, (tw, th))


def crop_uint8(image: Image.Image, plan: CropPlan) -> torch.Tensor:
    """Resize (Lanczos; nothing to do for an image ``load_records`` already shrank), crop and flip ``image``:
    (3, res, res) uint8."""
    if image.size != plan.resized:
        image = image.resize(plan.resized, Image.Resampling.LANCZOS)
    tw, th = plan.target
    image = image.crop((plan.left, plan.top, plan.left + tw, plan.top + th))
    if plan.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:  # a greyscale mask
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def latent_mask(pixels: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """A (1, H, W) uint8 mask as loss weights on the latent grid: (1, H/f, W/f) float32 in [0, 1], the mean of
    each f x f block, f = ``factor`` (the VAE's; a latent pixel half covered by the mask counts half)."""
    return torch.nn.functional.avg_pool2d(pixels.float().div(255.0).unsqueeze(0), factor).squeeze(0)


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1]."""
    return pixels.float().div(127.5).sub(1.0)


def apply_crop(image: Image.Image, plan: CropPlan) -> torch.Tensor:
    """``crop_uint8`` as float32 pixels in [-1, 1], (3, res, res)."""
    return to_unit_range(crop_uint8(image, plan))


class DreamBoothDataset(torch.utils.data.Dataset):
    """Instance images (``len(records) * repeats`` items), each paired with class image ``i % len(class_records)``.

    ``dataset[i]`` is a dict with ``index``, ``caption``, ``time_ids`` and ``pixels`` (omitted when
    ``with_pixels`` is False, i.e. when latents are cached), plus the same keys prefixed ``class_`` with
    prior preservation. With ``buckets`` (sizes (w, h)) each item is cropped to the bucket nearest its image's
    aspect ratio (``bucket_of[i]``), and its class image to the same bucket: class crops are kept per
    (class image, bucket) pair, a "slot"; ``class_index`` is the slot.
    """

    def __init__(
        self,
        records: list[Record],
        resolution: int,
        center_crop: bool = False,
        random_flip: bool = False,
        repeats: int = 1,
        seed: int = 0,
        class_records: list[Record] | None = None,
        class_prompt: str | None = None,
        masks: list[Image.Image] | None = None,
        buckets: list[tuple[int, int]] | None = None,
        mask_factor: int = 8,
    ) -> None:
        if not records:
            raise ValueError("DreamBoothDataset needs at least one image")
        self.records = records
        self.repeats = repeats
        self.class_records = class_records or []
        self.class_prompt = class_prompt
        self.with_pixels = True
        n = len(records) * repeats
        self.bucket_of = [nearest_bucket(records[i % len(records)].size, buckets) if buckets else 0 for i in range(n)]
        """Bucket of each item (all 0 without buckets)."""
        targets = buckets or [(resolution, resolution)]
        self.plans = [
            plan_crop(records[i % len(records)].size, targets[self.bucket_of[i]], center_crop, random_flip,
                      derive_seed(seed, AUGMENT, i))
            for i in range(n)
        ]  # fmt: skip
        nc = len(self.class_records)
        pairs = sorted({(i % nc, self.bucket_of[i]) for i in range(n)}) if nc and buckets else [(c, 0) for c in range(nc)]
        self.slot_of = {pair: k for k, pair in enumerate(pairs)}
        """(class image, bucket) -> slot."""
        self.class_plans = [
            plan_crop(self.class_records[c].size, targets[b], center_crop, random_flip,
                      derive_seed(seed, CLASS_AUGMENT, c, b) if buckets else derive_seed(seed, CLASS_AUGMENT, c))
            for c, b in pairs
        ]  # fmt: skip
        self.pixels = [crop_uint8(records[i % len(records)].image, p) for i, p in enumerate(self.plans)]
        """Each sample's crop, made once: (3, h, w) uint8."""
        self.class_pixels = [crop_uint8(self.class_records[c].image, p) for (c, _), p in zip(pairs, self.class_plans)]
        self.mask_factor = mask_factor
        """Pixels per latent pixel along a side (the VAE's downscale factor): the block a mask is averaged over."""
        self.masks = None if masks is None else [crop_uint8(masks[i % len(masks)], p) for i, p in enumerate(self.plans)]
        """Each sample's loss mask, cropped and flipped as its image: (1, res, res) uint8, or None."""

    def __len__(self) -> int:
        return len(self.plans)

    def class_index(self, index: int) -> int:
        """The class slot paired with item ``index``: class image ``index % len(class_records)`` in its bucket."""
        return self.slot_of[(index % len(self.class_records), self.bucket_of[index])]

    def __getitem__(self, index: int) -> dict:
        record = self.records[index % len(self.records)]
        item = {"index": index, "caption": record.caption, "time_ids": self.plans[index].time_ids()}
        if self.masks is not None:
            item["mask"] = latent_mask(self.masks[index], self.mask_factor)
        if self.with_pixels:
            item["pixels"] = to_unit_range(self.pixels[index])
        if self.class_records:
            c = self.class_index(index)
            item.update(class_index=c, class_caption=self.class_prompt, class_time_ids=self.class_plans[c].time_ids())
            if self.with_pixels:
                item["class_pixels"] = to_unit_range(self.class_pixels[c])
        return item


def collate(items: list[dict]) -> dict:
    """Stack a micro-batch; class samples (prior preservation) come after the instance samples."""
    batch = {
        "index": torch.tensor([it["index"] for it in items]),
        "captions": [it["caption"] for it in items],
        "time_ids": torch.stack([it["time_ids"] for it in items]),
    }
    if "pixels" in items[0]:
        batch["pixels"] = torch.stack([it["pixels"] for it in items])
    if "mask" in items[0]:
        batch["mask"] = torch.stack([it["mask"] for it in items])  # instance samples only
    if "class_caption" in items[0]:
        batch["class_index"] = torch.tensor([it["class_index"] for it in items])
        batch["captions"] += [it["class_caption"] for it in items]
        batch["time_ids"] = torch.cat([batch["time_ids"], torch.stack([it["class_time_ids"] for it in items])])
        if "pixels" in batch:
            batch["pixels"] = torch.cat([batch["pixels"], torch.stack([it["class_pixels"] for it in items])])
    return batch
