"""Aspect-ratio buckets: the sizes, the assignment, one bucket per micro-batch, and an exact resume."""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dora_diffusion.testing import make_toy_images, save_tiny_sdxl_pipeline
from dora_diffusion.training import main
from dora_diffusion.training.data.buckets import make_buckets, nearest_bucket
from dora_diffusion.training.data.sampling import BucketBatchSampler, micro_batches_per_epoch
from dora_diffusion.training.data.records import Record
from dora_diffusion.training.data.dataset import DreamBoothDataset


def test_bucket_sizes_at_1024():
    buckets = make_buckets(1024)
    assert (1024, 1024) in buckets and (1152, 896) in buckets and (896, 1152) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and 512 <= min(w, h) and max(w, h) <= 2048 for w, h in buckets)
    assert all(w * h <= 1024 * 1024 for w, h in buckets)
    assert all(w * h >= 0.85 * 1024 * 1024 for w, h in buckets)  # about the training area
    assert buckets == sorted(buckets, key=lambda b: b[0] / b[1]) and len(buckets) == len(set(buckets))
    # 3d_icon's 4:3 photos and its one 9:16 photo
    assert buckets[nearest_bucket((3200, 2400), buckets)] == (1152, 896)
    assert buckets[nearest_bucket((8640, 15360), buckets)] == (768, 1344)
    assert buckets[nearest_bucket((500, 500), buckets)] == (1024, 1024)


def _records(sizes):
    images = make_toy_images(len(sizes), size=32)
    return [Record(im.resize(s), f"c{i}", f"{i}.png") for i, (im, s) in enumerate(zip(images, sizes))]


def test_dataset_crops_to_buckets_with_micro_conditioning():
    buckets = make_buckets(64, step=8)
    records = _records([(96, 72), (72, 96), (64, 64), (128, 64), (90, 60)])
    ds = DreamBoothDataset(records, 64, random_flip=True, seed=3, buckets=buckets, class_records=_records([(64, 64)]),
                           class_prompt="a toy")  # fmt: skip
    for i in range(len(ds)):
        item = ds[i]
        w, h = buckets[ds.bucket_of[i]]
        assert item["pixels"].shape == (3, h, w) and item["class_pixels"].shape == (3, h, w)
        oh, ow, top, left, th, tw = item["time_ids"].tolist()
        assert (oh, ow) == records[i].size[::-1] and (th, tw) == (h, w)
        assert 0 <= top and 0 <= left
    assert buckets[ds.bucket_of[0]] == (72, 56) and buckets[ds.bucket_of[1]] == (56, 72)


@pytest.mark.parametrize("processes", [1, 2])
def test_every_micro_batch_is_one_bucket(processes):
    bucket_of = [0, 1, 1, 2, 0, 1, 1, 1, 2, 0, 0]
    samplers = [BucketBatchSampler(bucket_of, 2, processes, r, seed=5) for r in range(processes)]
    per_epoch = micro_batches_per_epoch(bucket_of, 2 * processes)
    assert samplers[0].per_epoch == per_epoch
    seen = Counter()
    for j in range(per_epoch):
        batch = [i for s in samplers for i in s.batch(j)]
        assert len(batch) == 2 * processes and len({bucket_of[i] for i in batch}) == 1
        seen.update(batch)
    assert set(seen) == set(range(len(bucket_of)))  # an epoch covers every sample
    it = iter(BucketBatchSampler(bucket_of, 2, processes, 0, seed=5, start=3))  # resuming at micro-batch 3
    assert [next(it) for _ in range(2 * per_epoch)] == [samplers[0].batch(j) for j in range(3, 3 + 2 * per_epoch)]


def test_buckets_train_and_resume_exactly(tmp_path):
    """Training with buckets on mixed shapes; 2 + 2 resumed steps equal 4 straight, bit for bit."""
    save_tiny_sdxl_pipeline(tmp_path / "model")
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i, r in enumerate(_records([(96, 72), (72, 96), (64, 64), (128, 64)])):
        r.image.save(data / r.name)
        rows.append({"file_name": r.name, "prompt": "a photo of TOK toy"})
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def run(out: str, steps: int, *extra: str) -> Path:
        argv = ["--pretrained_model_name_or_path", str(tmp_path / "model"), "--dataset", str(data),
                "--output_dir", str(tmp_path / out), "--resolution", "64", "--buckets", "--bucket_step", "8",
                "--train_batch_size", "2", "--gradient_accumulation_steps", "1", "--max_train_steps", str(steps),
                "--checkpointing_steps", "2", "--random_flip", "--cache_latents", "--validation_prompt", "none",
                "--report_to", "none", "--learning_rate", "1e-3", *extra]  # fmt: skip
        with contextlib.redirect_stdout(io.StringIO()) as out_text:
            path = main(argv)
        assert "aspect-ratio buckets" in out_text.getvalue()
        return path

    straight = load_file(run("straight", 4) / "pytorch_lora_weights.safetensors")
    run("resumed", 2)
    resumed = load_file(run("resumed", 4, "--resume_from_checkpoint", "latest") / "pytorch_lora_weights.safetensors")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert all(math.isfinite(float(v.abs().sum())) for v in straight.values())
