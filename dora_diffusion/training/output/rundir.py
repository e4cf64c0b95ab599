"""The output directory of a run: refuse to mix two runs in one folder, record the settings, and keep a
manifest of what the run wrote so that nothing else is ever overwritten or deleted.

The manifest ``run_files.json`` lists paths relative to the output folder, each recorded before it is
created; a recorded folder belongs to the run with everything in it. A path that exists and is not
recorded belongs to the user: a run never writes over it and ``--overwrite_output_dir`` never deletes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath

from dora_diffusion.formats import DEFAULT_WEIGHT_NAME
from dora_diffusion.training.args import PAIR, PATH_KEYS, RUN_DEFAULTS, RUN_KEYS
from dora_diffusion.training.output.checkpoint import CHECKPOINT_RE, STATE_FILE, CheckpointError, list_checkpoints, remove_stale_temporaries
from dora_diffusion.training.data.fingerprint import fingerprint_difference
from dora_diffusion.training.output.steplog import LOG_FILE
from dora_diffusion.training.errors import OutputDirError

SETTINGS_FILE = "training_args.json"
MANIFEST_FILE = "run_files.json"
LOCK_FILE = ".dora-run.lock"
"""Held (``flock``) by the run writing into the folder, so that a second run at the same time stops."""
RESOLVED_KEY = "resolved_paths"
"""Key of ``training_args.json`` holding the absolute form of local paths among ``PATH_KEYS``."""



def _checked_entry(entry: object) -> str:
    """A manifest entry: a relative POSIX path inside the output folder (no ``..``, not absolute)."""
    if not isinstance(entry, str) or not entry:
        raise ValueError(f"entry {entry!r} is not a path")
    pure = PurePosixPath(entry)
    if pure.is_absolute() or PureWindowsPath(entry).anchor or any(p in ("..", ".", "") for p in re.split(r"[/\\]", entry)):
        raise ValueError(f"entry {entry!r} is not a plain relative path")
    return str(pure)


class RunFiles:
    """The paths runs of dora-diffusion wrote in ``output_dir`` (read from and saved to ``run_files.json``)."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.root = Path(output_dir)
        self.entries: list[str] = []
        self.found = False
        """True if the folder had a manifest."""
        path = self.root / MANIFEST_FILE
        if not path.is_file():
            return
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            self.entries = [_checked_entry(e) for e in data["files"]]
        except (OSError, ValueError, RecursionError, KeyError, TypeError) as err:
            raise OutputDirError(
                f"{path} is damaged ({err}), so which files in {self.root} a run wrote is unknown; "
                "fix or delete it, or choose another --output_dir"
            ) from None
        self.found = True

    def owns(self, rel: str) -> bool:
        """True if ``rel`` or a folder above it was recorded."""
        parts = PurePosixPath(rel).parts
        return any("/".join(parts[: i + 1]) in self.entries for i in range(len(parts)))

    def conflicts(self, rels: list[str]) -> list[str]:
        """Those of ``rels`` that exist and no run of ours wrote."""
        return [r for r in rels if os.path.lexists(self.root / r) and not self.owns(r)]

    def claim(self, rel: str) -> Path:
        """Record ``rel`` (or the topmost folder above it that does not exist yet) before it is written.

        Raises ``OutputDirError`` if ``rel`` exists and no run of ours wrote it.
        """
        rel = _checked_entry(rel)
        if self.conflicts([rel]):
            raise OutputDirError(
                f"{self.root / rel} exists and was not written by a dora-diffusion run (it is not in "
                f"{MANIFEST_FILE}), so it is left alone; move it or choose another --output_dir"
            )
        if not self.owns(rel):
            parts = PurePosixPath(rel).parts
            first_new = next(i for i in range(len(parts)) if not os.path.lexists(self.root.joinpath(*parts[: i + 1])))
            self.entries.append("/".join(parts[: first_new + 1]))
            self.save()
        return self.root / rel

    def claim_if_new(self, rel: str) -> None:
        """Record ``rel`` if it does not exist yet (a folder others write into, e.g. the tracker's)."""
        if not os.path.lexists(self.root / rel):
            self.claim(rel)

    def adopt(self, rels: list[str]) -> None:
        """Record existing paths as a run's (in memory; saved with the next ``claim``)."""
        self.entries += [_checked_entry(r) for r in rels if not self.owns(r)]

    def save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        note = "files and folders written by dora-diffusion training runs; --overwrite_output_dir deletes only these"
        write_json_atomic(self.root / MANIFEST_FILE, {"note": note, "files": self.entries})

    def clear(self) -> list[str]:
        """Delete every recorded path (a link is removed, never followed) and the manifest; returns what went."""
        removed = []
        for entry in self.entries:
            if entry == LOCK_FILE:  # held by the run that clears: unlinking it would let a third run lock a new file
                continue
            parts = PurePosixPath(entry).parts
            if any(self.root.joinpath(*parts[:i]).is_symlink() for i in range(1, len(parts))):
                continue  # a folder above it became a link: what it points at is not ours
            path = self.root / entry
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.is_dir():
                shutil.rmtree(path)
            else:
                continue
            removed.append(entry)
        self.entries = [e for e in self.entries if e == LOCK_FILE]
        (self.root / MANIFEST_FILE).unlink(missing_ok=True)
        return removed


@contextlib.contextmanager
def run_lock(output_dir: Path) -> Iterator[None]:
    """Hold ``output_dir/.dora-run.lock`` (an exclusive ``flock``) for the block; raise ``OutputDirError`` if another
    run holds it. The lock goes with the process, so a killed run leaves none behind. No-op without ``fcntl``
    (Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    try:  # never through a link: O_CREAT would make a file wherever the link points
        fd = os.open(output_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as err:
        raise OutputDirError(
            f"{output_dir / LOCK_FILE} cannot be opened as this run's lock ({err.strerror}); it is not a plain file "
            "of ours: remove it, or choose another --output_dir"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise OutputDirError(
            f"--output_dir {output_dir} is being written by another training run right now (it holds {LOCK_FILE}); "
            "wait for that run to end, or choose another --output_dir"
        ) from None
    try:
        yield
    finally:
        os.close(fd)


def normalized_path(value: object) -> object:
    """A local path as its absolute form; anything else (a Hub id, None) as given without a trailing slash."""
    if not isinstance(value, str):
        return value
    path = Path(value).expanduser()
    if path.exists():
        return str(path.resolve())
    return value.rstrip("/\\") or value


def with_resolved_paths(settings: dict) -> dict:
    """``settings`` plus ``resolved_paths``: what ``PATH_KEYS`` point at, so a later run can compare paths."""
    return {**settings, RESOLVED_KEY: {k: normalized_path(settings.get(k)) for k in PATH_KEYS}}


def previous_settings(output_dir: Path) -> dict | None:
    """The settings recorded by the run that last used ``output_dir``, if any."""
    f = output_dir / SETTINGS_FILE
    if not f.is_file():
        return None
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        data = None
    if not isinstance(data, dict):
        raise OutputDirError(
            f"{f} is damaged, so the settings of the run in {output_dir} are unknown; restore it from a backup, "
            "or choose another --output_dir"
        )
    return data


def holds_run(output_dir: Path) -> bool:
    """True if ``output_dir`` holds weights or checkpoints of an earlier run (settings alone are no run)."""
    if not output_dir.is_dir():
        return False
    return any(child.name == DEFAULT_WEIGHT_NAME or CHECKPOINT_RE.match(child.name) for child in output_dir.iterdir())


def differences(old: dict, new: dict, keys=RUN_KEYS) -> dict[str, tuple]:
    """``{key: (old, new)}`` for the settings that differ; paths are compared by what they point at."""
    old_resolved = old.get(RESOLVED_KEY) if isinstance(old.get(RESOLVED_KEY), dict) else {}
    out = {}
    for k in keys:
        a, b = old.get(k, RUN_DEFAULTS.get(k)), new.get(k, RUN_DEFAULTS.get(k))
        if k in PATH_KEYS:
            same = old_resolved.get(k, normalized_path(a)) == normalized_path(b) or normalized_path(a) == normalized_path(b)
        else:
            same = a == b
        if not same:
            out[k] = (a, b)
    return out


def _listed(diff: dict[str, tuple], limit: int = 8) -> str:
    shown = ", ".join(f"{k}: {_short(a)} -> {_short(b)}" for k, (a, b) in list(diff.items())[:limit])
    return shown + (f" and {len(diff) - limit} more" if len(diff) > limit else "")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


NOT_SETTINGS = {RESOLVED_KEY, "output_dir", "logging_dir", "cache_dir", "report_to", "push_to_hub", "hub_model_id"}
"""Recorded keys that say where things go, not what is trained: never named as a difference between runs."""


def all_differences(old: dict, new: dict) -> dict[str, tuple]:
    """``differences`` over every recorded setting (resolution, steps, learning rate, ...), not only ``RUN_KEYS``."""
    return differences(old, new, sorted((set(old) | set(new)) - NOT_SETTINGS))


def adapter_settings(settings: dict) -> dict:
    """What a checkpoint records of the run's settings: ``RUN_KEYS``, with the absolute form of local paths."""
    return with_resolved_paths({k: settings.get(k, RUN_DEFAULTS.get(k)) for k in RUN_KEYS})


def check_resume(checkpoint: Path, state, settings: dict, fingerprint: dict, allow_dataset_change: bool) -> None:
    """Raise ``CheckpointError`` if the checkpoint was trained with other adapter settings than ``settings``, or on
    other data than ``fingerprint`` says (unless ``allow_dataset_change``). A checkpoint of an older version, which
    recorded neither, is compared with its run's ``training_args.json`` if it has one."""
    recorded = state.settings if state.settings is not None else previous_settings(checkpoint.parent)
    if recorded is not None:
        diff = differences(recorded, settings, tuple(k for k in RUN_KEYS if k != "dataset"))
        if diff:
            raise CheckpointError(
                f"--resume_from_checkpoint {checkpoint}: it was trained with other adapter settings ({_listed(diff)}); "
                "an adapter of another shape cannot continue from it. Resume with its settings, or start a new run "
                "without --resume_from_checkpoint"
            )
    if state.dataset is None or allow_dataset_change:
        return
    change = fingerprint_difference(state.dataset, fingerprint)
    if change is not None:
        raise CheckpointError(
            f"--resume_from_checkpoint {checkpoint}: it was trained on other data than --dataset {settings.get('dataset')} "
            f"holds ({change}). Resume with the dataset it was trained on, or pass --allow_dataset_change to continue "
            "on this one (fixed captions, added images: the data order then differs from an uninterrupted run)"
        )


PAIR_FILE = "pair.json"
"""In a pair's folder (``--adapter dora,lora``, ``training/pair.py``): the halves that finished, each with the settings
it finished with."""


def refuse_pair_folder(output_dir: Path) -> None:
    """Raise ``OutputDirError`` if ``output_dir`` holds a pair's halves (``--adapter dora,lora``): a single run there
    would write beside them (or, with ``--overwrite_output_dir``, delete the pair's own files)."""
    halves = [kind for kind in PAIR if holds_run(output_dir / kind) or (output_dir / kind / SETTINGS_FILE).is_file()]
    record = [PAIR_FILE] if (output_dir / PAIR_FILE).is_file() else []
    if halves or record:
        raise OutputDirError(
            f"--output_dir {output_dir} holds a DoRA/LoRA pair (--adapter dora,lora: "
            f"{', '.join([f'{k}/' for k in halves] + record)}); a single run would write its files beside the pair's "
            "halves. Choose another --output_dir, or continue the pair with --adapter dora,lora "
            "--resume_from_checkpoint latest"
        )


def check_nothing_to_resume(output_dir: Path, value: str = "latest") -> None:
    """``--resume_from_checkpoint latest|auto`` found no checkpoint in ``output_dir``: raise ``CheckpointError``
    unless a new run may start there. A folder holding anything an earlier run wrote (its settings, manifest, log)
    always stops, since a new run would write over them. A folder with no run of ours (missing, empty, or the user's
    files alone) starts a new run only with ``auto`` (one command for the first start and every restart, the
    diffusers idiom); ``latest`` asks to continue something, so with nothing to continue it stops and writes
    nothing, not even the folder."""
    refuse_pair_folder(output_dir)
    found = [n for n in (SETTINGS_FILE, MANIFEST_FILE, LOG_FILE) if (output_dir / n).is_file()]
    if not found:
        if value == "auto":
            return
        state = "does not exist" if not output_dir.exists() else "holds no checkpoint-N folder and no run"
        raise CheckpointError(
            f"--resume_from_checkpoint {value}: {output_dir} {state}, so there is nothing to resume; nothing was "
            "started or written. Drop --resume_from_checkpoint to start a new run there, or pass "
            "--resume_from_checkpoint auto to continue from the newest checkpoint when there is one and start a new "
            "run when the folder holds no run (one command for the first start and every restart)"
        )
    old = previous_settings(output_dir) or {}
    when = f" (trained at --resolution {old['resolution']})" if "resolution" in old else ""
    raise CheckpointError(
        f"--resume_from_checkpoint {value}: {output_dir} holds an earlier run{when} ({', '.join(found)}) but no checkpoint "
        "to continue from, so there is nothing to resume and nothing was started or written. Drop "
        "--resume_from_checkpoint to see what differs, pass --overwrite_output_dir (without --resume_from_checkpoint) "
        "to delete that run's files and start over, or choose another --output_dir"
    )


def check_apart(written: dict[str, str | None], read: dict[str, str | None]) -> None:
    """Raise ``OutputDirError`` if a folder the run writes (``{flag: path}``) is, holds or lies inside a folder it
    reads: the run's images would become training data on the next run. Hub ids and unset flags are skipped."""
    def real(value: str | None, must_exist: bool) -> Path | None:
        path = Path(value).expanduser() if value else None
        return None if path is None or (must_exist and not path.exists()) else Path(os.path.realpath(path))

    for out_flag, out_value in written.items():
        for in_flag, in_value in read.items():
            out, src = real(out_value, False), real(in_value, True)  # a read path that does not exist is a Hub id
            if out is None or src is None or not (out == src or src in out.parents or out in src.parents):
                continue
            relation = "is" if out == src else "lies inside" if src in out.parents else "holds"
            raise OutputDirError(
                f"{out_flag} {out_value} {relation} {in_flag} {in_value}: what the run writes there (images, "
                f"checkpoints, cards) would mix with what it reads, and become training data on the next run. "
                f"Choose {out_flag} apart from {in_flag}"
            )


def check_output_dir(
    output_dir: Path, settings: dict, resuming: bool, overwrite: bool, outputs: list[str] = (), keys=RUN_KEYS
) -> RunFiles:
    """Raise ``OutputDirError`` if this run would mix with an earlier one or write over a file it does not own.

    Allowed: a new folder, or one without an earlier run; ``--overwrite_output_dir`` when a manifest says
    what the earlier run wrote (only that is removed, see ``RunFiles.clear``); resuming a run whose adapter
    settings (``keys``, default ``RUN_KEYS``) are the same. ``outputs`` are the paths (relative) this run will write; any that
    exists and is not a run's is refused. Writes nothing; returns the folder's manifest.
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputDirError(f"--output_dir {output_dir} is a file")
    refuse_pair_folder(output_dir)
    files = RunFiles(output_dir)
    earlier = holds_run(output_dir)
    if earlier and not files.found:
        if overwrite:
            raise OutputDirError(
                f"--output_dir {output_dir} holds checkpoints or weights but no {MANIFEST_FILE} saying which files a "
                "run wrote (a run of an older version, or not a run of ours), so --overwrite_output_dir deletes "
                "nothing there. Remove that run's files yourself or choose another --output_dir"
            )
        if resuming:  # the user calls it our run: adopt what an older version's run wrote, if it looks like one
            found = [c.name for c in output_dir.iterdir() if CHECKPOINT_RE.match(c.name) and (c / STATE_FILE).is_file()]
            if found and (output_dir / SETTINGS_FILE).is_file():
                files.adopt(found + [n for n in (SETTINGS_FILE, LOG_FILE, DEFAULT_WEIGHT_NAME) if (output_dir / n).is_file()])
    if earlier and not overwrite:
        old = previous_settings(output_dir)
        diff = differences(old, settings, keys) if old is not None else {}
        if resuming and diff:
            raise OutputDirError(
                f"cannot resume in {output_dir}: its checkpoints were made with other adapter settings "
                f"({_listed(diff)}). Resume with the settings in its {SETTINGS_FILE}, or train into another --output_dir"
            )
        if not resuming and diff:
            raise OutputDirError(
                f"--output_dir {output_dir} already holds a run with different settings ({_listed(diff)}). "
                "Choose another --output_dir, or continue that run with its own settings and --resume_from_checkpoint latest"
            )
        if not resuming:
            other = all_differences(old, settings) if old is not None else {}
            named = f" (its settings differ: {_listed(other)})" if other else " (with the same settings)" if old is not None else ""
            advice = (
                "Pass --resume_from_checkpoint latest to continue it, choose"
                if list_checkpoints(output_dir)
                else "It has no checkpoint to continue from. Choose"
            )
            raise OutputDirError(
                f"--output_dir {output_dir} already holds an earlier run{named}. {advice} another --output_dir, or "
                "pass --overwrite_output_dir to delete that run's files and start over"
            )
    checkpoints = [c.name for c in output_dir.iterdir() if CHECKPOINT_RE.match(c.name)] if output_dir.is_dir() else []
    taken = files.conflicts(sorted(set(outputs) | set(checkpoints) | {SETTINGS_FILE, LOG_FILE, DEFAULT_WEIGHT_NAME}))
    if taken:
        raise OutputDirError(
            f"--output_dir {output_dir} holds {', '.join(taken)}, which this run would write but {MANIFEST_FILE} "
            "does not list as a run's (your files, or a run of an older version); they are left alone. Move them "
            "or choose another --output_dir"
        )
    return files


_ATOMIC_TMP = re.compile(r"^\.(?P<target>.+)\.[0-9a-z_]{8}\.tmp$")
"""Temporary file of an atomic write (``write_json_atomic``, ``write_safetensors``): ``.<name>.<random>.tmp``."""


def remove_leftovers(output_dir: Path) -> None:
    """Delete what a killed run left half-written: hidden checkpoint folders, and temporary files of the
    atomic writes of its settings, manifest and weights."""
    remove_stale_temporaries(output_dir)
    if not output_dir.is_dir():
        return
    for child in output_dir.iterdir():
        m = _ATOMIC_TMP.match(child.name)
        if m and child.is_file() and not child.is_symlink():
            target = m["target"]
            if target in (MANIFEST_FILE, SETTINGS_FILE, DEFAULT_WEIGHT_NAME) or target.endswith(("_kohya.safetensors", "_comfyui.safetensors")):
                child.unlink()


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON through a temporary file (``.<name>.<random>.tmp``, the usual permissions) and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True, default=str)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
