"""Read a DreamBooth dataset into memory: images (EXIF-rotated, RGB) with their captions.

Sources, tried in this order for ``--dataset``:

1. a local folder with ``metadata.jsonl`` / ``metadata.csv`` (Hugging Face imagefolder, e.g. a download of
   ``linoyts/3d_icon``) or any other local dataset ``datasets.load_dataset`` reads;
2. a local folder of images with same-name ``.txt`` captions (``cat.png`` + ``cat.txt``);
3. a local folder of images only: every image gets ``--instance_prompt``;
4. a Hugging Face Hub dataset id (``linoyts/3d_icon``): the repository is fetched with
   ``huggingface_hub.snapshot_download`` (at ``--dataset_revision``) and read as a local folder, so a filled
   Hub cache also works offline (``HF_HUB_OFFLINE=1``), where ``datasets.load_dataset("owner/name")`` does not.

Every file read from a dataset must lie inside its folder once links are followed (a caption or image linked to a
file elsewhere is a ``DatasetError`` naming it) and be a regular file, opened without blocking (a FIFO, device,
socket or folder named like an image is skipped and counted; as a caption it is an error). ``metadata.jsonl`` and
``metadata.csv`` are checked line by line before ``datasets`` reads them (UTF-8, lines of at most 1 MiB, file names
relative and inside the folder); captions are UTF-8, at most 64 KiB, without control characters.

Images that cannot be decoded are skipped and counted; none left is an error. Given a training resolution,
each image is shrunk once, as it is decoded, to the size the crops are cut from (short side = resolution):
a 12800 x 9600 photo is never held, or resized per step, at full size.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import logging
import os
import stat
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from dora_diffusion.extras import require
from dora_diffusion.formats.safefile import open_nonblocking
from dora_diffusion.training.errors import DatasetError

logger = logging.getLogger(__name__)

CAPTION_COLUMNS = ("prompt", "text", "caption")
"""Caption columns detected when ``--caption_column`` is not given, in this order."""
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


MAX_CAPTION_BYTES = 1 << 16
"""Longest caption accepted (64 KiB): CLIP reads 77 tokens, and a caption can become the validation prompt and the
text of the model card."""
MAX_METADATA_LINE = 1 << 20
"""Longest line of ``metadata.jsonl`` / ``metadata.csv`` accepted (1 MiB); ``datasets`` holds several times a
line's size in memory while parsing it."""



MAX_DECODED_BYTES = 256 << 20
DECODED_PER_STORED_BYTE = 100
"""An image decodes to at most ``max(MAX_DECODED_BYTES, DECODED_PER_STORED_BYTE x its file size)`` (4 bytes a pixel
counted, after JPEG draft scaling): a 140 KB PNG of 144 megapixels, under Pillow's own bomb limit, would take 800 MB
and seconds; a 100 MP photo (JPEG, or a PNG of over 4 MB) passes."""


class DecompressionBomb(ValueError):
    """An image whose pixels would take far more memory than its file's size explains: skipped and counted."""


class NotRegularFile(OSError):
    """A dataset file is a FIFO, device, socket or folder: never read (an image is skipped, a caption refused)."""


def real_root(folder: str | os.PathLike) -> Path:
    """The folder whose files a dataset may read: ``folder`` with links resolved; for a Hub snapshot
    (``.../datasets--owner--name/snapshots/<rev>``) the repo's cache folder, where its files' links point."""
    root = Path(os.path.realpath(folder))
    return root.parents[1] if root.parent.name == "snapshots" and root.parents[1].name.startswith("datasets--") else root


def inside(path: str | os.PathLike, root: Path) -> Path:
    """The real path of ``path``; raises ``DatasetError`` if it lies outside ``root`` (see ``real_root``)."""
    real = Path(os.path.realpath(path))
    if real != root and root not in real.parents:
        raise DatasetError(
            f"{path} is a link to {real}, outside the dataset folder {root}; a dataset reads only files inside its "
            "folder (copy the file in if you mean to use it)"
        )
    return real


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))


def open_dataset_file(path: str | os.PathLike, root: Path) -> BinaryIO:
    """Open a file of the dataset for reading, without blocking: raises ``DatasetError`` if its real path is outside
    ``root`` and ``NotRegularFile`` if it is not a regular file (checked on the open descriptor)."""
    real = inside(path, root)
    try:
        fd, st = open_nonblocking(real)
    except OSError as err:
        if err.errno in (errno.ENXIO, errno.EISDIR):  # a socket; a folder (Windows)
            raise NotRegularFile(f"{path} is not a regular file (a socket or folder)") from None
        raise
    if not stat.S_ISREG(st.st_mode) or not os.path.samestat(st, os.stat(real)):  # swapped since the check: refuse
        os.close(fd)
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
        raise NotRegularFile(f"{path} is {kind}, not a regular file")
    return os.fdopen(fd, "rb")


_ALLOWED_CONTROLS = frozenset("\t\n\r")


def checked_caption(text: str, where: str) -> str:
    """``text`` stripped; raises ``DatasetError`` naming ``where`` for a control character (escape codes would reach
    the terminal, the model card and the Hub) or more than ``MAX_CAPTION_BYTES``."""
    bad = next((c for c in text if unicodedata.category(c) in ("Cc", "Cs") and c not in _ALLOWED_CONTROLS), None)
    if bad is not None:
        raise DatasetError(f"{where}: the caption holds the control character {bad!r}; remove it")  # or a lone surrogate
    if len(text.encode("utf-8", "surrogatepass")) > MAX_CAPTION_BYTES:
        raise DatasetError(f"{where}: the caption is over {MAX_CAPTION_BYTES} bytes (CLIP reads 77 tokens); shorten it")
    return text.strip()


def read_caption(path: Path, root: Path) -> str:
    """A ``.txt`` caption: a regular UTF-8 file inside ``root`` of at most ``MAX_CAPTION_BYTES``."""
    try:
        with open_dataset_file(path, root) as f:
            data = f.read(MAX_CAPTION_BYTES + 1)
    except NotRegularFile as err:
        raise DatasetError(f"caption {err}; a caption must be a regular .txt file") from None
    except OSError as err:
        raise DatasetError(f"caption {path} cannot be read ({err.strerror or err})") from None
    if len(data) > MAX_CAPTION_BYTES:
        raise DatasetError(f"caption {path} is over {MAX_CAPTION_BYTES} bytes (CLIP reads 77 tokens); shorten it")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DatasetError(f"caption {path} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
    return checked_caption(text, f"caption {path}")


@dataclass
class Record:
    """One training image and its caption."""

    image: Image.Image
    caption: str
    name: str
    original_size: tuple[int, int] | None = None
    """(width, height) of the image as stored, before ``load_records`` shrank it; None: ``image.size``."""

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the original image (SDXL's original-size conditioning)."""
        return self.original_size or self.image.size


def resized_size(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(width, height) of an image of ``size`` resized so that its short side is ``resolution`` (never below it)."""
    w, h = size
    scale = resolution / min(w, h)
    return max(resolution, round(w * scale)), max(resolution, round(h * scale))


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


_TRANSPOSED = (5, 6, 7, 8)
"""EXIF orientations that swap width and height."""


def open_image(source: str | Path | bytes | BinaryIO, resolution: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Decode an image (a path, an open file or encoded bytes), upright RGB; raises on bad data. Returns it with its upright size.

    With ``resolution``, the image is shrunk to ``resized_size(size, resolution)`` (Lanczos) as it is decoded;
    JPEGs are decoded at the smallest of 1/1, 1/2, 1/4, 1/8 scale that still covers that size (``draft``).
    """
    handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    with Image.open(handle) as image:
        w, h = image.size
        if image.format != "JPEG":  # before getexif, which decodes a PNG to find its eXIf chunk
            _check_decoded_size(image, source)
        size = (h, w) if image.getexif().get(0x0112, 1) in _TRANSPOSED else (w, h)
        target = None if resolution is None else resized_size(size, resolution)
        if target is not None and image.format == "JPEG":
            side = min(target)
            image.draft("RGB", (side, side))  # both sides stay >= the target's short side
        _check_decoded_size(image, source)
        image.load()
        image = to_rgb(image)
    return _shrink(image, size, resolution), size


def _check_decoded_size(image: Image.Image, source: str | Path | bytes | BinaryIO) -> None:
    """Raise ``DecompressionBomb`` if ``image`` (opened, not decoded) would take more than
    ``max(MAX_DECODED_BYTES, DECODED_PER_STORED_BYTE x its file size)``, counting 4 bytes a pixel."""
    decoded, stored = 4 * image.size[0] * image.size[1], _stored_size(source)
    if decoded > max(MAX_DECODED_BYTES, DECODED_PER_STORED_BYTE * stored):
        raise DecompressionBomb(
            f"{image.size[0]} x {image.size[1]} pixels from {stored} bytes would decode to {decoded >> 20} MiB (more "
            f"than {MAX_DECODED_BYTES >> 20} MiB and {DECODED_PER_STORED_BYTE} x the file): a decompression bomb?"
        )


def _stored_size(source: str | Path | bytes | BinaryIO) -> int:
    """Bytes of an encoded image: a path's file size, an open file's, or the length of ``bytes``."""
    if isinstance(source, (bytes, bytearray)):
        return len(source)
    if isinstance(source, (str, os.PathLike)):
        return os.path.getsize(source)
    return os.fstat(source.fileno()).st_size


def _shrink(image: Image.Image, size: tuple[int, int], resolution: int | None) -> Image.Image:
    """``image`` (of original ``size``) resized to ``resized_size(size, resolution)`` (Lanczos); as is without one."""
    target = None if resolution is None else resized_size(size, resolution)
    return image if target is None or image.size == target else image.resize(target, Image.Resampling.LANCZOS)


def _has_metadata(path: Path) -> bool:
    return any((d / m).is_file() for d in (path, *[c for c in path.iterdir() if c.is_dir()]) for m in METADATA_FILES)


def _image_files(path: Path) -> list[Path]:
    """Entries named like images (FIFOs, devices and folders among them: they are skipped and counted when read)."""
    return sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def check_tree(folder: Path, root: Path) -> None:
    """Before ``datasets`` reads ``folder``: no link to a folder (it would be followed, out of the dataset or round a
    loop), every link to a file inside ``root``, every metadata file checked (``check_metadata``)."""
    for dirpath, dirnames, filenames in os.walk(folder):  # links to folders are listed, not entered
        for name in dirnames:
            if os.path.islink(os.path.join(dirpath, name)):
                raise DatasetError(
                    f"{os.path.join(dirpath, name)} is a link to a folder; a dataset's folders must be real folders "
                    "inside it (copy the images in)"
                )
        for name in filenames:
            file = Path(dirpath, name)
            if file.is_symlink():
                inside(file, root)
            if name in METADATA_FILES[:2]:
                check_metadata(file, root)


def _lines(path: Path, root: Path):
    """``(number, text)`` of each line of a dataset text file; ``DatasetError`` naming the line for a line over
    ``MAX_METADATA_LINE`` bytes or one that is not UTF-8."""
    try:
        f = open_dataset_file(path, root)
    except NotRegularFile as err:
        raise DatasetError(f"{err}; a metadata file must be a regular file") from None
    except OSError as err:
        raise DatasetError(f"{path} cannot be read ({err.strerror or err})") from None
    with f:
        number = 0
        while raw := f.readline(MAX_METADATA_LINE + 1):
            number += 1
            if len(raw) > MAX_METADATA_LINE:
                raise DatasetError(f"{path}, line {number}: longer than {MAX_METADATA_LINE} bytes; one line holds one image's row")
            try:
                yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a BOM, as datasets accepts it
            except UnicodeDecodeError as err:
                raise DatasetError(
                    f"{path}, line {number}: not UTF-8 text ({err.reason} at byte {err.start} of the line); save it as UTF-8"
                ) from None


def _checked_file_name(value: object, path: Path, number: int) -> None:
    """A metadata ``file_name``: a relative path that stays in the metadata file's folder."""
    if not isinstance(value, str) or not value or any(unicodedata.category(c) == "Cc" for c in value):
        raise DatasetError(f"{path}, line {number}: file_name {value[:200] if isinstance(value, str) else value!r} is not a file name")
    parts = value.replace("\\", "/").split("/")
    if PurePosixPath(value).is_absolute() or os.path.isabs(value) or ":" in parts[0] or ".." in parts:
        raise DatasetError(
            f"{path}, line {number}: file_name {value[:200]!r} is not a path inside the dataset folder; write it "
            "relative to the metadata file, without '..'"
        )


def check_metadata(path: Path, root: Path) -> None:
    """``metadata.jsonl`` or ``metadata.csv``, line by line: UTF-8, bounded lines, JSON objects (jsonl), and
    ``file_name`` columns (``file_name``, ``*_file_name``) relative paths without ``..``; errors name the line."""
    if path.suffix == ".jsonl":
        for number, text in _lines(path, root):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except (ValueError, RecursionError) as err:
                raise DatasetError(f"{path}, line {number}: not a JSON object ({str(err)[:100]})") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{path}, line {number}: not a JSON object (a {type(row).__name__})")
            for key, value in row.items():
                if key == "file_name" or key.endswith("_file_name"):
                    _checked_file_name(value, path, number)
        return
    lines = _lines(path, root)
    reader = csv.reader(text for _, text in lines)
    try:
        header = next(reader, [])
        columns = [i for i, key in enumerate(header) if key == "file_name" or key.endswith("_file_name")]
        for row in reader:
            for i in columns:
                if i < len(row):
                    _checked_file_name(row[i], path, reader.line_num)
    except csv.Error as err:
        raise DatasetError(f"{path}, line {reader.line_num}: not CSV ({err})") from None


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
    revision: str | None = None,
    resolution: int | None = None,
) -> LoadedDataset:
    """Load every image of ``dataset`` with its caption (see the module docstring for the sources).

    ``revision`` (a Hub dataset's branch, tag or commit) is refused for a local folder. With ``resolution``
    the images are shrunk as they are decoded (see ``open_image``); ``Record.size`` keeps their original size.
    """
    path = Path(dataset).expanduser()
    if revision is not None and path.exists():
        raise DatasetError(f"--dataset_revision {revision}: --dataset {dataset} is a local folder, which has no revisions")
    if path.exists():
        if not path.is_dir():
            raise DatasetError(f"--dataset {dataset}: expected a folder of images (or a Hub dataset id), got a file")
        if _has_metadata(path) or (not _image_files(path) and any(c.is_dir() for c in path.iterdir())):
            if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*") if p.is_file()):
                raise DatasetError(f"--dataset {dataset} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            return _from_datasets(str(path), "imagefolder", image_column, caption_column, instance_prompt, None, cache_dir, resolution)
        if not _image_files(path):
            raise DatasetError(
                f"--dataset {dataset} holds no images ({', '.join(IMAGE_SUFFIXES)}) and no metadata.jsonl/.csv"
            )
        return _from_folder(path, instance_prompt, resolution)
    if not looks_like_hub_id(dataset):
        raise DatasetError(f"--dataset {dataset}: no such folder, and it is not a Hub dataset id ('owner/name')")
    local = hub_snapshot(dataset, revision, cache_dir)
    return _from_datasets(local, "hub", image_column, caption_column, instance_prompt, config_name, cache_dir, resolution, dataset)


def hub_snapshot(repo_id: str, revision: str | None = None, cache_dir: str | None = None) -> str:
    """The local folder of Hub dataset ``repo_id`` at ``revision``: downloaded, or found in the Hub cache.

    Works offline (``HF_HUB_OFFLINE=1``) when the cache holds the revision; errors name the dataset and the fix.
    """
    require("train", f"--dataset {repo_id}", ("huggingface_hub",))
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    from dora_diffusion.hub import quiet_hub_deprecations

    try:
        with quiet_hub_deprecations():
            return snapshot_download(repo_id, repo_type="dataset", revision=revision, cache_dir=cache_dir)
    except RevisionNotFoundError:
        raise DatasetError(f"--dataset_revision {revision}: the Hub dataset {repo_id} has no such branch, tag or commit") from None
    except RepositoryNotFoundError:
        raise DatasetError(
            f"--dataset {repo_id}: no such dataset on the Hugging Face Hub (or it is private: run `hf auth login`)"
        ) from None
    except LocalEntryNotFoundError as err:
        raise DatasetError(_unreachable(repo_id, revision, err)) from None
    except OSError as err:  # the network itself (httpx's ConnectError chains): one line, not the chain
        raise DatasetError(_unreachable(repo_id, revision, err)) from None


def _unreachable(repo_id: str, revision: str | None, err: BaseException) -> str:
    """One line for a ``--dataset`` that is no local folder and no Hub dataset this machine can reach."""
    where = f" at revision {revision}" if revision else ""
    parent = Path(repo_id).parent
    local = f"no folder {repo_id} (nor {parent})" if not parent.is_dir() else f"no folder {Path(repo_id).name!r} in {parent}/"
    offline = os.environ.get("HF_HUB_OFFLINE", "unset")
    lines = str(err).strip().splitlines()
    cause = f"HF_HUB_OFFLINE={offline}" + (f"; {lines[0][:100]}" if lines and offline in ("unset", "0") else "")
    return (
        f"--dataset {repo_id}: there is {local}, and as a Hub dataset id{where} it is not in the Hugging Face cache "
        f"and the Hub cannot be reached ({cause}). "
        f"Check the folder's path, or connect once, or `hf download {repo_id} --repo-type dataset --local-dir "
        f"./{repo_id.split('/')[-1]}`"
    )


def _from_folder(path: Path, instance_prompt: str | None, resolution: int | None = None) -> LoadedDataset:
    """Images with optional same-name .txt captions."""
    root = real_root(path)
    files = _image_files(path)
    with_txt = [f for f in files if os.path.lexists(f.with_suffix(".txt"))]
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
            image, size = read_image(f, root, resolution)
        except Unreadable:
            skipped.append(f.name)
            continue
        txt = f.with_suffix(".txt")
        caption = read_caption(txt, root) if os.path.lexists(txt) else ""
        records.append(Record(image, caption or instance_prompt or "", f.name, size))
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
    resolution: int | None = None,
    label: str | None = None,
) -> LoadedDataset:
    """A local imagefolder (or a Hub dataset's snapshot), read through ``datasets``; images decoded here (bad ones
    skipped). ``label`` names the dataset in messages (default ``name``)."""
    require("train", f"--dataset {name}", ("datasets",))
    import datasets

    folder, name = name, label or name
    root = real_root(folder)
    if Path(folder).is_dir():
        check_tree(Path(folder), root)
    try:
        loaded = datasets.load_dataset(folder, config_name, cache_dir=cache_dir)
    except FileNotFoundError as err:
        raise DatasetError(f"--dataset {name}: not found ({err})") from None
    except Exception as err:
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
            image, size = _decode_cell(cell, folder, resolution, root)
        except Unreadable:
            skipped.append(label)
            continue
        caption = checked_caption(str(row[column]), f"{name}, row {i + 1}") if column and row[column] is not None else ""
        if not caption:
            missing_captions += not instance_prompt
            caption = instance_prompt or ""
        records.append(Record(image, caption, label, size))
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


class Unreadable(Exception):
    """An image that is skipped and counted (logged with the reason)."""


def read_image(path: str | Path, root: Path, resolution: int | None) -> tuple[Image.Image, tuple[int, int]]:
    """``open_image`` of a dataset file through ``open_dataset_file``: ``DatasetError`` for a file outside ``root``,
    ``Unreadable`` for one that is not a regular file or cannot be decoded (the reason is logged)."""
    try:
        with open_dataset_file(path, root) as handle:
            return open_image(handle, resolution)
    except DatasetError:
        raise
    except (NotRegularFile, DecompressionBomb) as err:
        logger.warning("skipped %s: %s", path, err)
        raise Unreadable from None
    except Exception as err:  # noqa: BLE001 - any decoder failure means "unreadable"
        logger.debug("skipping %s: %s", path, err)
        raise Unreadable from None


def _decode_cell(cell, dataset: str, resolution: int | None, root: Path) -> tuple[Image.Image, tuple[int, int]]:
    """An image cell of a ``datasets`` table: {'bytes', 'path'}, a path string, or a PIL image (see ``open_image``);
    a path is read through ``read_image`` (inside ``root``, a regular file)."""
    try:
        if isinstance(cell, Image.Image):
            image = to_rgb(cell)
            return _shrink(image, image.size, resolution), image.size
        if isinstance(cell, dict) and cell.get("bytes"):
            return open_image(cell["bytes"], resolution)
    except Exception as err:  # noqa: BLE001
        logger.debug("skipping an image cell: %s", err)
        raise Unreadable from None
    path = cell.get("path") if isinstance(cell, dict) else cell if isinstance(cell, str) else None
    if not path:
        logger.debug("skipping an image cell of type %s", type(cell).__name__)
        raise Unreadable
    path = Path(path)
    if not path.is_absolute() and Path(dataset).is_dir():
        path = Path(dataset) / path
    return read_image(path, root, resolution)


def _check_readable(name: str, records: list[Record], skipped: list[str]) -> None:
    if skipped:
        logger.warning("skipped %d unreadable images of %s: %s", len(skipped), name, ", ".join(skipped[:5]))
    if not records:
        if skipped:
            raise DatasetError(f"none of the {len(skipped)} images of {name} could be read (e.g. {skipped[:3]})")
        raise DatasetError(f"{name} holds no images")


def load_masks(mask_dir: str | Path, records: list[Record]) -> list[Image.Image]:
    """The loss mask of each record: ``mask_dir/<image stem>.<any image suffix>``, greyscale (``L``), upright, at
    the size the record's image has now (bilinear). White pixels are learnt, black ones ignored.

    Raises ``DatasetError`` naming the images without a mask, or a mask that cannot be read.
    """
    folder = Path(mask_dir)
    if not folder.is_dir():
        raise DatasetError(f"--mask_dir {mask_dir} is not a folder")
    by_stem = {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}
    missing = [r.name for r in records if Path(r.name).stem not in by_stem]
    if missing:
        raise DatasetError(
            f"--mask_dir {mask_dir}: {len(missing)} of {len(records)} images have no mask of the same name "
            f"(e.g. {missing[:3]}; {Path(missing[0]).stem}.png would do)"
        )
    masks = []
    for r in records:
        path = by_stem[Path(r.name).stem]
        try:
            with Image.open(path) as mask:
                mask.load()
                mask = ImageOps.exif_transpose(mask).convert("L")
        except Exception as err:  # noqa: BLE001
            raise DatasetError(f"--mask_dir: mask {path} cannot be read ({err})") from None
        masks.append(mask if mask.size == r.image.size else mask.resize(r.image.size, Image.Resampling.BILINEAR))
    return masks


FILLER = frozenset("a an the of in on at by for with and photo picture image style".split())
"""Words that alone do not make a trigger phrase ("a photo of" is shared by many captions and means nothing)."""


def trigger_words(captions: list[str]) -> list[str]:
    """What the captions teach: the words a prompt must hold to call the concept, in order.

    1. Words in every caption written as a rare token (all capitals like ``TOK``, or ``<s0>``).
    2. Else, with two captions or more, the words every caption starts with, up to its first comma, less
       trailing filler, when they are more than filler: ``"a 3dicon, spotify app icon"`` and ``"a 3dicon, a pizza"``
       -> ``"a 3dicon"``; ``"a zwx heart on a red background"`` and ``"a zwx heart on a blue ..."`` -> ``"a zwx heart"``.

    ``[]`` when neither holds.
    """
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
    if found or len(captions) < 2:
        return found
    phrase = []
    for words in zip(*(c.split(",")[0].split() for c in captions)):
        if any(w != words[0] for w in words):
            break
        phrase.append(words[0])
    while phrase and phrase[-1].lower() in FILLER:
        phrase.pop()
    return [" ".join(phrase)] if phrase else []


VALIDATION_SUBJECT = "an astronaut riding a horse"
"""What the default validation prompt asks the trigger for (diffusers' README example)."""


def default_validation_prompt(triggers: list[str], captions: list[str]) -> str:
    """``"<trigger>, an astronaut riding a horse"``: the concept on something it was not trained on; without a
    trigger, the first training caption."""
    if triggers:
        return f"{' '.join(triggers)}, {VALIDATION_SUBJECT}"
    return captions[0]
