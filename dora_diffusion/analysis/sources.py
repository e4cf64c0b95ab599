"""The adapters the ``analyze`` command measures: files, folders and training runs' checkpoints, labelled.

``adapter_sources`` turns the command's ``ADAPTER`` arguments into ``(label, file)`` pairs in plotting order;
``file_method`` reads the method (``DoRA``, ``LoRA``, ``FT``...) a file's own metadata names.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dora_diffusion.formats import DEFAULT_WEIGHT_NAME, AdapterFileError, read_safetensors
from dora_diffusion.hub import resolve_file
from dora_diffusion.formats.diffusers import OWN_METADATA_KEY
from dora_diffusion.training.output.checkpoint import CHECKPOINT_RE


@dataclass(frozen=True)
class _Source:
    label: str
    context: str
    """Name of the directory holding the thing the label names, put in front when labels repeat."""
    path: Path
    group: int
    step: float


def _same_tensors(a: Path, b: Path) -> bool:
    """True if two adapter files hold the same tensors (their headers may differ); False if either is unreadable."""
    try:
        (sa, _), (sb, _) = read_safetensors(a), read_safetensors(b)
    except (AdapterFileError, OSError):
        return False
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def adapter_sources(paths: Sequence[str | os.PathLike]) -> list[tuple[str, Path]]:
    """Expand the ``ADAPTER`` arguments of ``analyze`` into ``(label, adapter file)`` pairs, in plotting order.

    A file is labelled by its name without suffix (``pytorch_lora_weights.safetensors`` by its directory's
    name), a directory holding one adapter file by its own name. A training output directory with
    ``checkpoint-N/`` subdirectories (each holding ``pytorch_lora_weights.safetensors``, as
    ``train_dreambooth_dora.py`` and diffusers' DreamBooth scripts write them) gives one entry per checkpoint,
    by step, then its final weights unless they equal the last checkpoint's. Checkpoint directories passed one
    by one (``run/checkpoint-*``) are ordered by step too. Labels are usable as adapter names (``.`` becomes
    ``_``); labels that repeat get their parent directory's name in front, then ``#2``, ``#3``.
    """
    found: list[_Source] = []
    groups: dict[Path, int] = {}  # run directory -> position of its first checkpoint among the arguments
    for i, raw in enumerate(paths):
        path = Path(raw)
        if not path.exists():
            raise AdapterFileError(f"adapter {path} does not exist")
        path = path.resolve()
        m = CHECKPOINT_RE.match(path.name)
        if path.is_dir() and m:
            g = groups.setdefault(path.parent, i)
            found.append(_Source(path.name, path.parent.name, resolve_file(path), g, int(m.group(1))))
            continue
        ckpts = sorted(
            (int(mm.group(1)), child)
            for child in (path.iterdir() if path.is_dir() else ())
            if child.is_dir() and (mm := CHECKPOINT_RE.match(child.name))
        )
        if ckpts:
            g = groups.setdefault(path, i)
            found += [_Source(c.name, path.name, resolve_file(c), g, step) for step, c in ckpts]
            try:
                final = resolve_file(path)
            except AdapterFileError:
                continue  # a run that has not finished: checkpoints only
            if not _same_tensors(final, found[-1].path):  # saved at the last checkpoint's step: shown once
                found.append(_Source(path.name, path.parent.name, final, g, math.inf))
            continue
        if path.is_file() and path.name != DEFAULT_WEIGHT_NAME:
            found.append(_Source(path.stem, path.parent.name, path, i, 0))
        else:  # a directory, or the default file name that only its directory tells apart
            where = path if path.is_dir() else path.parent
            found.append(_Source(where.name, where.parent.name, resolve_file(path), i, 0))
    found.sort(key=lambda s: (s.group, s.step))  # stable: same group and step keep argument order
    counts: dict[str, int] = {}
    for s in found:
        counts[s.label] = counts.get(s.label, 0) + 1
    out: list[tuple[str, Path]] = []
    taken: set[str] = set()
    for s in found:
        label = (f"{s.context}/{s.label}" if counts[s.label] > 1 else s.label).replace(".", "_")
        unique, k = label, 1
        while unique in taken:
            k += 1
            unique = f"{label}#{k}"
        taken.add(unique)
        out.append((unique, s.path))
    return out


def file_method(path: str | os.PathLike) -> str | None:
    """The ``method`` an adapter file's own metadata names (``dora_diffusion`` header key), if any."""
    _, metadata = read_safetensors(path)
    try:
        method = json.loads(metadata.get(OWN_METADATA_KEY, "{}")).get("method")
    except (ValueError, AttributeError, RecursionError):
        return None
    return str(method) if method else None
