"""A Hugging Face Hub cache filled offline, so the real Hub code paths run without a network.

``fill_hub_cache`` copies a local folder into the hub cache layout under a real repo id::

    <cache>/models--stabilityai--stable-diffusion-xl-base-1.0/
        refs/main                  the commit the branch points at
        snapshots/<commit>/...     the files

``huggingface_hub.snapshot_download``, ``hf_hub_download`` and every ``from_pretrained`` then find them with
``HF_HUB_OFFLINE=1``. ``make_3d_icon_like`` writes a dataset shaped like ``linoyts/3d_icon`` as the Hub serves
it (23 JPEGs ``00.jpg``-``22.jpg`` of 4:3 and one 9:16 photo, ``metadata.jsonl`` with a ``prompt`` column,
captions "a 3dicon, ..."), and, for its old revision, the captions "In the style of TOK, ...".
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from dora_diffusion.testing import make_toy_images

ICON_SUBJECTS = (
    "spotify app icon with music notes", "a pizza", "a rocket", "a cat", "a camera", "a coffee cup", "a house",
    "a tree", "a car", "a guitar", "a light bulb", "a clock", "a book", "a heart", "a cloud with rain",
    "a shopping bag", "a trophy", "an umbrella", "a paper plane", "a lock", "a gift box", "a planet", "a crown",
)  # fmt: skip
"""Subjects of the 23 captions (the first is the dataset's own first caption)."""
ICON_OLD_REVISION = "6e1cf947876b1ec5b34daf6a99f11433d87791f5"
"""linoyts/3d_icon before 2024-08-14, when its captions still read "In the style of TOK, ..."."""


def commit_of(repo_id: str, revision: str = "main") -> str:
    """A stable 40-hex commit id for a fake revision."""
    return hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()


def fill_hub_cache(
    cache: str | os.PathLike,
    repo_id: str,
    folder: str | os.PathLike,
    repo_type: str = "model",
    commit: str | None = None,
    branch: str | None = "main",
) -> Path:
    """Copy ``folder`` into the hub cache ``cache`` as ``repo_id`` at ``commit`` (default: derived from the id);
    ``branch`` (if any) points at it. Returns the snapshot folder."""
    commit = commit or commit_of(repo_id)
    repo = Path(cache) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot, dirs_exist_ok=True)
    if branch is not None:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / branch).write_text(commit)
    return snapshot


def make_3d_icon_like(path: str | os.PathLike, size: int = 96, old_captions: bool = False, seed: int = 0) -> Path:
    """Write a small copy of linoyts/3d_icon's layout into ``path``: ``00.jpg``-``22.jpg`` (4:3, ``size`` wide; the
    last one 9:16, as the dataset's one 8640x15360 photo) and ``metadata.jsonl`` (``file_name``, ``prompt``)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    height = size * 3 // 4
    rows = []
    for i, (image, subject) in enumerate(zip(make_toy_images(len(ICON_SUBJECTS), size=size, seed=seed), ICON_SUBJECTS)):
        shape = (height * 9 // 16, height) if i == len(ICON_SUBJECTS) - 1 else (size, height)
        name = f"{i:02d}.jpg"
        image.resize(shape).save(path / name, quality=90)
        caption = f"In the style of TOK, {subject}" if old_captions else f"a 3dicon, {subject}"
        rows.append({"file_name": name, "prompt": caption})
    with open(path / "metadata.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return path
