"""Read a DreamBooth dataset into memory: images (EXIF-rotated, RGB) with their captions.

Sources, tried in this order for ``--dataset``:

1. a local folder with ``metadata.jsonl`` / ``metadata.csv`` (Hugging Face imagefolder, e.g. a download of
   ``linoyts/3d_icon``) or any other local dataset ``datasets.load_dataset`` reads;
2. a local folder of images with same-name ``.txt`` captions (``cat.png`` + ``cat.txt``);
3. a local folder of images only: every image gets ``--instance_prompt``;
4. a Hugging Face Hub dataset id (``linoyts/3d_icon``).

Images that cannot be decoded are skipped and counted; none left is an error.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ..extras import require

logger = logging.getLogger(__name__)

CAPTION_COLUMNS = ("prompt", "text", "caption")
"""Caption columns detected when ``--caption_column`` is not given, in this order."""
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


class DatasetError(ValueError):
    """The dataset cannot be used for training; the message says why and what to do."""


@dataclass
class Record:
    """One training image and its caption."""

    image: Image.Image
    caption: str
    name: str


@dataclass
class LoadedDataset:
    """What ``load_records`` found."""

    records: list[Record]
    source: str
    """``hub``, ``imagefolder``, ``txt-captions`` or ``images-only``."""
    caption_column: str | None = None
    skipped: list[str] = field(default_factory=list)
    """Names of the images that could not be read."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright RGB: apply the EXIF orientation; transparent pixels are composited on white."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if image.mode.startswith(("I", "F")):  # 16/32-bit greyscale: scale to 8 bits
        values = np.asarray(image, dtype=np.float64)
        peak = values.max() if values.size else 0.0
        values = values * (255.0 / peak) if peak > 255 else values
        image = Image.fromarray(values.clip(0, 255).astype(np.uint8))  # 2-D uint8: mode L
    return image.convert("RGB") if image.mode != "RGB" else image


def open_image(source: str | Path | bytes) -> Image.Image:
    """Decode an image fully (a path or encoded bytes) and make it upright RGB; raises on bad data."""
    handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    with Image.open(handle) as image:
        image.load()
        return to_rgb(image)


def _has_metadata(path: Path) -> bool:
    return any((d / m).is_file() for d in (path, *[c for c in path.iterdir() if c.is_dir()]) for m in METADATA_FILES)


def _image_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def looks_like_hub_id(name: str) -> bool:
    """``owner/name`` or ``name`` with no path syntax."""
    if name.startswith((".", "/", "~")) or "\\" in name:
        return False
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(parts)


def load_records(
    dataset: str,
    image_column: str = "image",
    caption_column: str | None = None,
    instance_prompt: str | None = None,
    config_name: str | None = None,
    cache_dir: str | None = None,
) -> LoadedDataset:
    """Load every image of ``dataset`` with its caption (see the module docstring for the sources)."""
    path = Path(dataset).expanduser()
    if path.exists():
        if not path.is_dir():
            raise DatasetError(f"--dataset {dataset}: expected a folder of images (or a Hub dataset id), got a file")
        if _has_metadata(path) or any(c.is_dir() for c in path.iterdir()):
            if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*") if p.is_file()):
                raise DatasetError(f"--dataset {dataset} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            return _from_datasets(str(path), "imagefolder", image_column, caption_column, instance_prompt, None, cache_dir)
        if not _image_files(path):
            raise DatasetError(
                f"--dataset {dataset} holds no images ({', '.join(IMAGE_SUFFIXES)}) and no metadata.jsonl/.csv"
            )
        return _from_folder(path, instance_prompt)
    if not looks_like_hub_id(dataset):
        raise DatasetError(f"--dataset {dataset}: no such folder, and it is not a Hub dataset id ('owner/name')")
    return _from_datasets(dataset, "hub", image_column, caption_column, instance_prompt, config_name, cache_dir)


def _from_folder(path: Path, instance_prompt: str | None) -> LoadedDataset:
    """Images with optional same-name .txt captions."""
    files = _image_files(path)
    with_txt = [f for f in files if f.with_suffix(".txt").is_file()]
    source = "txt-captions" if with_txt else "images-only"
    if len(with_txt) < len(files) and not instance_prompt:
        missing = [f.name for f in files if f not in with_txt]
        what = f"{len(missing)} of {len(files)} images have no .txt caption (e.g. {missing[:3]})" if with_txt else (
            f"the {len(files)} images in {path} have no captions (no metadata.jsonl/.csv, no same-name .txt files)"
        )
        raise DatasetError(f"{what}; pass --instance_prompt, e.g. --instance_prompt 'a photo of TOK dog'")
    records, skipped = [], []
    for f in files:
        try:
            image = open_image(f)
        except Exception as err:  # noqa: BLE001 - any decoder failure means "unreadable"
            logger.debug("skipping %s: %s", f, err)
            skipped.append(f.name)
            continue
        txt = f.with_suffix(".txt")
        try:
            caption = txt.read_text(encoding="utf-8").strip() if txt.is_file() else ""
        except UnicodeDecodeError as err:
            raise DatasetError(f"caption {txt} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
        records.append(Record(image, caption or instance_prompt or "", f.name))
    _check_readable(str(path), records, skipped)
    return LoadedDataset(records, source, None, skipped)


def _from_datasets(
    name: str,
    source: str,
    image_column: str,
    caption_column: str | None,
    instance_prompt: str | None,
    config_name: str | None,
    cache_dir: str | None,
) -> LoadedDataset:
    """A Hub dataset or a local imagefolder, read through ``datasets``; images decoded here (bad ones skipped)."""
    require("train", f"--dataset {name}", ("datasets",))
    import datasets

    try:
        loaded = datasets.load_dataset(name, config_name, cache_dir=cache_dir)
    except FileNotFoundError as err:
        raise DatasetError(f"--dataset {name}: not found ({err})") from None
    except Exception as err:
        if source == "hub" and type(err).__name__ not in ("DatasetNotFoundError", "EmptyDatasetError"):
            raise  # network, authentication: the Hub's own message is the useful one
        raise DatasetError(f"--dataset {name}: datasets could not read it ({type(err).__name__}: {err})") from err
    if isinstance(loaded, datasets.DatasetDict):
        if not loaded:
            raise DatasetError(f"--dataset {name} has no splits")
        split = "train" if "train" in loaded else next(iter(loaded))
        table = loaded[split]
    else:
        table = loaded
    columns = list(table.column_names)
    if len(table) == 0:
        raise DatasetError(f"--dataset {name} is empty (0 rows; columns {columns})")
    if image_column not in columns:
        raise DatasetError(f"--image_column {image_column!r} is not a column of {name}; columns found: {columns}")
    column = pick_caption_column(columns, caption_column, instance_prompt, name)
    if isinstance(table.features[image_column], datasets.Image):
        table = table.cast_column(image_column, datasets.Image(decode=False))
    records, skipped = [], []
    missing_captions = 0
    for i, row in enumerate(table):
        cell = row[image_column]
        label = _cell_name(cell, i)
        try:
            image = _decode_cell(cell, name)
        except Exception as err:  # noqa: BLE001
            logger.debug("skipping %s: %s", label, err)
            skipped.append(label)
            continue
        caption = str(row[column]).strip() if column and row[column] is not None else ""
        if not caption:
            missing_captions += not instance_prompt
            caption = instance_prompt or ""
        records.append(Record(image, caption, label))
    if missing_captions:
        raise DatasetError(
            f"{missing_captions} rows of {name} have an empty {column!r} caption; pass --instance_prompt to use for them"
        )
    _check_readable(name, records, skipped)
    return LoadedDataset(records, source, column, skipped)


def pick_caption_column(
    columns: list[str], caption_column: str | None, instance_prompt: str | None, name: str = "the dataset"
) -> str | None:
    """``--caption_column`` if it exists, else the first of prompt/text/caption, else None with an instance prompt."""
    if caption_column is not None:
        if caption_column not in columns:
            raise DatasetError(f"--caption_column {caption_column!r} is not a column of {name}; columns found: {columns}")
        return caption_column
    for candidate in CAPTION_COLUMNS:
        if candidate in columns:
            return candidate
    if instance_prompt:
        return None
    raise DatasetError(
        f"{name} has no caption column (looked for {list(CAPTION_COLUMNS)}); columns found: {columns}. "
        "Pass --caption_column NAME, or --instance_prompt to caption every image the same"
    )


def _cell_name(cell, index: int) -> str:
    if isinstance(cell, dict) and cell.get("path"):
        return Path(cell["path"]).name
    if isinstance(cell, str):
        return Path(cell).name
    return f"row {index}"


def _decode_cell(cell, dataset: str) -> Image.Image:
    """An image cell of a ``datasets`` table: {'bytes', 'path'}, a path string, or a PIL image."""
    if isinstance(cell, Image.Image):
        return to_rgb(cell)
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return open_image(cell["bytes"])
        if cell.get("path"):
            return open_image(cell["path"])
    if isinstance(cell, str):
        path = Path(cell)
        if not path.is_absolute() and Path(dataset).is_dir():
            path = Path(dataset) / path
        return open_image(path)
    raise TypeError(f"unsupported image cell {type(cell).__name__}")


def _check_readable(name: str, records: list[Record], skipped: list[str]) -> None:
    if skipped:
        logger.warning("skipped %d unreadable images of %s: %s", len(skipped), name, ", ".join(skipped[:5]))
    if not records:
        if skipped:
            raise DatasetError(f"none of the {len(skipped)} images of {name} could be read (e.g. {skipped[:3]})")
        raise DatasetError(f"{name} holds no images")


def trigger_words(captions: list[str]) -> list[str]:
    """Words in every caption written as a rare token (all capitals like ``TOK``, or ``<s0>``), in order."""
    if not captions:
        return []
    sets = [set(c.replace(",", " ").split()) for c in captions]
    common = set.intersection(*sets)
    first = captions[0].replace(",", " ").split()
    found = []
    for w in first:
        rare = (w.isupper() and len(w) >= 2 and w.isalpha()) or (w.startswith("<") and w.endswith(">"))
        if w in common and rare and w not in found:
            found.append(w)
    return found
