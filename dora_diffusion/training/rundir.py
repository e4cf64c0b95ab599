"""The output directory of a run: refuse to mix two runs in one folder, record the settings."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ..formats import DEFAULT_WEIGHT_NAME
from .args import RUN_KEYS
from .checkpoint import CHECKPOINT_RE
from .steplog import LOG_FILE

SETTINGS_FILE = "training_args.json"
RUN_ARTEFACTS = (SETTINGS_FILE, DEFAULT_WEIGHT_NAME, LOG_FILE, "README.md", "validation", "logs")
"""What a run writes besides its checkpoints (removed by --overwrite_output_dir)."""


class OutputDirError(ValueError):
    """The output directory holds something this run must not overwrite."""


def previous_settings(output_dir: Path) -> dict | None:
    """The settings recorded by the run that last used ``output_dir``, if any."""
    f = output_dir / SETTINGS_FILE
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def holds_run(output_dir: Path) -> bool:
    """True if ``output_dir`` holds settings, weights or checkpoints of an earlier run."""
    if not output_dir.is_dir():
        return False
    return any(
        child.name in (SETTINGS_FILE, DEFAULT_WEIGHT_NAME) or CHECKPOINT_RE.match(child.name)
        for child in output_dir.iterdir()
    )


def differences(old: dict, new: dict, keys=RUN_KEYS) -> dict[str, tuple]:
    """``{key: (old, new)}`` for the settings that differ."""
    return {k: (old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)}


def check_output_dir(output_dir: Path, settings: dict, resuming: bool, overwrite: bool) -> None:
    """Raise ``OutputDirError`` if ``output_dir`` holds an earlier run this one must not touch.

    Allowed: an empty or new folder; ``--overwrite_output_dir`` (the earlier run is removed, see
    ``clear_run``); resuming a run whose adapter settings (``RUN_KEYS``) are the same.
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputDirError(f"--output_dir {output_dir} is a file")
    if overwrite or not holds_run(output_dir):
        return
    old = previous_settings(output_dir)
    if resuming:
        diff = differences(old or {}, settings) if old is not None else {}
        if diff:
            listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in diff.items()))
            raise OutputDirError(
                f"cannot resume in {output_dir}: its checkpoints were made with other adapter settings ({listed}). "
                "Use the same settings, another --output_dir, or --overwrite_output_dir to start over"
            )
        return
    diff = differences(old, settings) if old else {}
    what = (
        "a run with different settings (" + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items()) + ")"
        if diff
        else "an earlier run"
    )
    raise OutputDirError(
        f"--output_dir {output_dir} already holds {what}. Pass --resume_from_checkpoint latest to continue it, "
        "--overwrite_output_dir to replace it, or choose another --output_dir"
    )


def clear_run(output_dir: Path) -> None:
    """Remove an earlier run's files (checkpoints, weights, settings, card, validation images, logs)."""
    if not output_dir.is_dir():
        return
    for child in output_dir.iterdir():
        if child.name in RUN_ARTEFACTS or CHECKPOINT_RE.match(child.name) or child.name.endswith("_kohya.safetensors"):
            shutil.rmtree(child) if child.is_dir() else child.unlink()


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)
