"""Resumable checkpoints ``output_dir/checkpoint-N/``, written atomically.

A checkpoint is first written to a hidden temporary folder next to it and then renamed into place, so a
crash mid-save leaves the previous checkpoints untouched and never a half-written ``checkpoint-N``.

Contents: ``adapter_state.safetensors`` (the trained parameters, fp32, by parameter name),
``optimizer.pt``, ``lr_scheduler.pt``, ``grad_scaler.pt`` (fp16 only), ``training_state.json``
(written last) and ``pytorch_lora_weights.safetensors``, loadable with ``pipe.load_dora_weights(checkpoint)``.
With ``--use_ema`` also ``ema_state.safetensors`` (the average of each trained tensor, fp32, by the same names);
the loadable file then holds the average, ``adapter_state.safetensors`` the raw weights that train on.
RNG states are not stored: every micro-batch reseeds from ``(seed, micro-batch, process)``, so the
random stream after a resume is the uninterrupted run's by construction.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import stat
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dora_diffusion.formats import DEFAULT_WEIGHT_NAME
from dora_diffusion.training.errors import CheckpointError, TrainingError

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(0|[1-9][0-9]*)$")
"""A checkpoint's name: ``checkpoint-<step>``, the step written as runs write it (no leading zeros)."""
MAX_STATE_BYTES = 16 * 1024 * 1024
"""``training_state.json`` is a few kB (up to ~50 kB with a dataset fingerprint); a bigger one is not ours."""
STATE_FILE = "training_state.json"
EMA_FILE = "ema_state.safetensors"
TMP_PREFIX = ".tmp-checkpoint-"


@dataclass
class TrainingState:
    """Counters that place a checkpoint in the run."""

    global_step: int
    micro_batch: int
    """Global micro-batches consumed (the data position)."""
    num_processes: int
    train_batch_size: int
    gradient_accumulation_steps: int
    seed: int
    settings: dict | None = None
    """The adapter settings (``RUN_KEYS``) the checkpoint was trained with; None in older checkpoints."""
    dataset: dict | None = None
    """The fingerprint of the training data (``fingerprint.py``); None in older checkpoints."""



def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest (lowest step) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = CHECKPOINT_RE.match(child.name)
        if m and child.is_dir() and (child / STATE_FILE).is_file():
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def read_state(path: str | os.PathLike) -> TrainingState:
    """The counters of the checkpoint ``path``, checked: integers, a non-negative step that matches the name."""
    path = Path(path)
    try:
        if not stat.S_ISREG((path / STATE_FILE).stat().st_mode):
            raise ValueError("not a regular file")
        if (path / STATE_FILE).stat().st_size > MAX_STATE_BYTES:
            raise ValueError(f"{(path / STATE_FILE).stat().st_size} bytes, more than a state file ever holds")
        data = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        state = TrainingState(**data)
    except (OSError, ValueError, RecursionError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} is unreadable ({err})") from None
    for name in ("settings", "dataset"):
        if not isinstance(getattr(state, name), (dict, type(None))):
            raise CheckpointError(f"checkpoint {path}: {STATE_FILE} has {name} = {getattr(state, name)!r:.80}; expected an object")
    for name, value in asdict(state).items():
        if name in ("settings", "dataset"):
            continue
        low = 0 if name in ("global_step", "micro_batch", "seed") else 1
        if isinstance(value, bool) or not isinstance(value, int) or (value < low and name != "seed"):
            raise CheckpointError(f"checkpoint {path}: {STATE_FILE} has {name} = {value!r}; expected an integer >= {low}")
    m = CHECKPOINT_RE.match(path.name)
    if m and int(m.group(1)) != state.global_step:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} says global_step {state.global_step}, its name says {m.group(1)}")
    return state


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why the checkpoint ``path`` cannot be resumed from (damaged, truncated, missing a file), or None.

    Reads every file once without unpickling anything: the state, the adapter tensors (floating point and
    finite, as training writes them), and the CRCs of the optimizer and scheduler archives.
    """
    path = Path(path)
    try:
        optional = [n for n in ("grad_scaler.pt",) if os.path.lexists(path / n)]
        for name in ("adapter_state.safetensors", "optimizer.pt", "lr_scheduler.pt", *optional):
            if not stat.S_ISREG(os.stat(path / name).st_mode):  # a link to /dev/zero or a FIFO would be read forever
                return f"{name} is not a regular file"
        read_state(path)
        tensor_files = ["adapter_state.safetensors"] + ([EMA_FILE] if os.path.lexists(path / EMA_FILE) else [])
        for file in tensor_files:
            if not stat.S_ISREG(os.stat(path / file).st_mode):
                return f"{file} is not a regular file"
            for name, tensor in load_file(path / file).items():
                if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
                    kind = "not floating point" if not tensor.is_floating_point() else "not finite"
                    return f"{file}: {name[:120]!r} is {kind} ({tensor.dtype})"
        for name in ("optimizer.pt", "lr_scheduler.pt"):
            with zipfile.ZipFile(path / name) as archive:
                bad = archive.testzip()
            if bad is not None:
                return f"{name} is corrupt ({bad})"
    except CheckpointError as err:
        return str(err).removeprefix(f"checkpoint {path}: ")
    except (OSError, ValueError, zipfile.BadZipFile, SafetensorError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def resolve_resume(output_dir: str | os.PathLike, value: str | None) -> Path | None:
    """The checkpoint ``--resume_from_checkpoint`` names: ``latest``/``auto`` or a path (absolute, or a name inside
    ``output_dir``).

    ``latest`` and ``auto`` skip damaged checkpoints (with a warning) and take the newest intact one. In a folder
    with no checkpoint and no weights they give None: the caller (``rundir.check_nothing_to_resume``) decides
    whether that stops (``latest``) or starts a new run (``auto``). In a folder that holds a run's weights or
    checkpoints but no intact checkpoint it is an error, since a new run there would write over that run's
    weights. A named checkpoint that is damaged is an error.
    """
    if value is None:
        return None
    if value in ("latest", "auto"):
        for candidate in reversed(list_checkpoints(output_dir)):
            problem = checkpoint_problem(candidate)
            if problem is None:
                return candidate
            logger.warning("skipping damaged checkpoint %s (%s); trying the one before it", candidate, problem)
        root = Path(output_dir)
        found = sorted(c.name for c in root.iterdir() if CHECKPOINT_RE.match(c.name) or c.name == DEFAULT_WEIGHT_NAME) if root.is_dir() else []
        if found:
            raise CheckpointError(
                f"--resume_from_checkpoint {value}: {root} holds an earlier run ({', '.join(found[:4])}"
                f"{', ...' if len(found) > 4 else ''}) but no intact checkpoint to continue from; a new run there would "
                "write over its weights, so nothing was started. Choose another --output_dir, or drop "
                "--resume_from_checkpoint and pass --overwrite_output_dir to delete that run's files and start over"
            )
        return None
    path = Path(value)
    for candidate in (path, Path(output_dir) / path):
        if candidate.is_dir():
            if not (candidate / STATE_FILE).is_file():
                raise CheckpointError(f"--resume_from_checkpoint {value}: {candidate} is not a complete checkpoint")
            problem = checkpoint_problem(candidate)
            if problem is not None:
                raise CheckpointError(
                    f"--resume_from_checkpoint {value}: {candidate} is damaged ({problem}); name an earlier "
                    "checkpoint or pass --resume_from_checkpoint latest (which skips damaged ones)"
                )
            return candidate
    raise CheckpointError(f"--resume_from_checkpoint {value}: no such checkpoint (looked in {Path(output_dir)})")


def remove_stale_temporaries(output_dir: str | os.PathLike) -> None:
    """Delete half-written checkpoints left by a crash."""
    root = Path(output_dir)
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(TMP_PREFIX) and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)


def checkpoint_bytes(named_params: list[tuple[str, nn.Parameter]], optimizer) -> int:
    """About how many bytes a checkpoint takes: the parameters twice (fp32 state and the loadable file), the
    optimizer's tensors, 256 bytes of archive and header entries per tensor and 8 kB of small files."""
    params = sum(p.numel() * 4 for _, p in named_params)
    state = [t for s in optimizer.state_dict()["state"].values() for t in s.values() if torch.is_tensor(t)]
    return 2 * params + sum(t.numel() * t.element_size() for t in state) + 256 * (2 * len(named_params) + len(state)) + 8192


def _size(n: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _write_failure(err: BaseException, root: Path, name: str, need: int) -> TrainingError | None:
    """The error to report when writing checkpoint ``name`` in ``root`` failed with ``err``; None if ``err`` is not
    about the disk (a bug, an interrupt: raise it as it is).

    Disk full shows as ``OSError(ENOSPC)`` from Python, a ``RuntimeError`` ("file write failed") from ``torch.save``
    and a ``SafetensorError`` from safetensors; those two count as a full disk when less than a checkpoint is free.
    """
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        free = None
    code = getattr(err, "errno", None)
    full = code in (errno.ENOSPC, errno.EDQUOT) or (
        isinstance(err, (RuntimeError, SafetensorError)) and free is not None and free < need
    )
    if not full and not isinstance(err, OSError):
        return None
    what = "no space left on device" if full else f"{type(err).__name__}: {err}"
    space = f"; a checkpoint takes about {_size(need)}" + (f", {_size(free)} is free there" if free is not None else "")
    return TrainingError(
        f"could not write {name} in {root} ({what}{space if full else ''}). Nothing of {name} was kept and the "
        "earlier checkpoints are intact; " + ("free some space, then " if full else "")
        + "continue with --resume_from_checkpoint latest"
    )


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_checkpoint(
    output_dir: str | os.PathLike,
    state: TrainingState,
    named_params: list[tuple[str, nn.Parameter]],
    optimizer,
    lr_scheduler,
    grad_scaler=None,
    write_weights=None,
    total_limit: int | None = None,
    owned: Callable[[Path], bool] | None = None,
    ema_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``checkpoint-<global_step>`` atomically; then keep only the newest ``total_limit`` checkpoints.

    ``write_weights(directory)`` adds the loadable adapter file. ``owned(checkpoint)`` says which checkpoints
    the pruning may delete (default: all). ``ema_state`` (``--use_ema``'s averages) goes to ``ema_state.safetensors``.
    Call on the main process only.
    """
    root = Path(output_dir)
    final = root / f"checkpoint-{state.global_step}"
    tmp = root / f"{TMP_PREFIX}{state.global_step}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        params = {name: p.detach().float().cpu().contiguous() for name, p in named_params}
        save_file(params, tmp / "adapter_state.safetensors")
        if ema_state is not None:
            save_file(ema_state, tmp / EMA_FILE)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
        if grad_scaler is not None:
            torch.save(grad_scaler.state_dict(), tmp / "grad_scaler.pt")
        if write_weights is not None:
            write_weights(tmp)
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2), encoding="utf-8")
        for f in tmp.iterdir():
            _fsync(f)
        if final.exists():  # a checkpoint of an earlier attempt at the same step: swap it out
            old = root / f"{TMP_PREFIX}old-{state.global_step}-{uuid.uuid4().hex[:8]}"
            final.rename(old)
            try:
                os.replace(tmp, final)
            except BaseException:
                old.rename(final)  # the earlier checkpoint stays, never left under a temporary name to be cleaned
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        reported = _write_failure(err, root, final.name, checkpoint_bytes(named_params, optimizer)) if isinstance(err, Exception) else None
        if reported is None:
            raise
        raise reported from err
    if total_limit is not None:
        ours = [c for c in list_checkpoints(root) if owned is None or owned(c)]
        for stale in ours[:-total_limit]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


_LEGACY_PARAM = re.compile(r"\.lora_(A|B|magnitude)\.([^.]+)$")
"""Parameter names of checkpoints written before adapters were modules: ``<module>.lora_A.<adapter>``."""


def _current_name(name: str) -> str:
    """``<module>.lora_A.<adapter>`` (older checkpoints) -> ``<module>.adapters.<adapter>.A``; others unchanged."""
    return _LEGACY_PARAM.sub(lambda m: f".adapters.{m.group(2)}.{m.group(1)}", name)


def load_checkpoint(
    path: str | os.PathLike,
    named_params: list[tuple[str, nn.Parameter]],
    optimizer,
    lr_scheduler,
    grad_scaler=None,
    ema=None,
) -> TrainingState:
    """Restore parameters, optimizer, schedule and counters from ``path``; every process calls this.

    ``ema`` (an ``AdapterEMA``, with ``--use_ema``) gets the checkpoint's averages; a checkpoint without them is an
    error (a run without ``--use_ema`` resumes from one with them, and leaves them)."""
    path = Path(path)
    state = read_state(path)
    saved = {_current_name(k): v for k, v in load_file(path / "adapter_state.safetensors").items()}
    names = [n for n, _ in named_params]
    missing, unexpected = sorted(set(names) - set(saved)), sorted(set(saved) - set(names))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not match this run's adapter ({len(missing)} parameters missing, e.g. "
            f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}); was it made with other "
            "--adapter/--rank/--unet_targets/--train_text_encoder settings?"
        )
    for name, p in named_params:
        if saved[name].shape != p.shape:
            raise CheckpointError(
                f"checkpoint {path}: {name} has shape {tuple(saved[name].shape)}, this run's has {tuple(p.shape)}; "
                "was it made with another --rank or --rank_pattern?"
            )
    if ema is not None:
        _load_ema(path, ema)
    loaded = {}
    for name in ("optimizer.pt", "lr_scheduler.pt") + (("grad_scaler.pt",) if grad_scaler is not None else ()):
        if name == "grad_scaler.pt" and not (path / name).is_file():
            continue
        try:
            loaded[name] = torch.load(path / name, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch's restricted unpickler raises several kinds
            raise CheckpointError(
                f"checkpoint {path}: {name} cannot be read with torch.load(weights_only=True) "
                f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); it holds more than tensors, or is damaged"
            ) from None
    _check_optimizer_state(path, loaded["optimizer.pt"], optimizer)
    with torch.no_grad():
        for name, p in named_params:
            p.copy_(saved[name])
    try:
        optimizer.load_state_dict(loaded["optimizer.pt"])
        lr_scheduler.load_state_dict(loaded["lr_scheduler.pt"])
        if "grad_scaler.pt" in loaded:
            grad_scaler.load_state_dict(loaded["grad_scaler.pt"])
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {path}: its optimizer or schedule state does not fit this run ({err})") from None
    return state


def _check_optimizer_state(path: Path, saved: object, optimizer) -> None:
    """Raise ``CheckpointError`` unless ``saved`` is an optimizer state of this run's shape: the same groups of
    the same sizes, and per-parameter tensors (Adam's moments) shaped like their parameters."""
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    state = saved.get("state") if isinstance(saved, dict) else None
    ours = optimizer.state_dict()["param_groups"]
    if not isinstance(groups, list) or not isinstance(state, dict) or not all(isinstance(g, dict) for g in groups):
        raise CheckpointError(f"checkpoint {path}: optimizer.pt is not an optimizer state")
    sizes = [len(g.get("params", ())) for g in groups]
    if sizes != [len(g["params"]) for g in ours]:
        raise CheckpointError(
            f"checkpoint {path}: optimizer.pt has parameter groups of sizes {sizes}, this run {[len(g['params']) for g in ours]}; "
            "was it made with other adapter settings, or with --loraplus_lr_ratio on one side only (LoRA+ gives B "
            "groups of its own)?"
        )
    by_id = dict(zip([i for g in ours for i in g["params"]], [p for g in optimizer.param_groups for p in g["params"]]))
    for key, values in state.items():
        p = by_id.get(key)
        if p is None or not isinstance(values, dict):
            raise CheckpointError(f"checkpoint {path}: optimizer.pt has state for parameter {key!r:.40}, which this run lacks")
        for field, t in values.items():
            if torch.is_tensor(t) and t.dim() > 0 and t.shape != p.shape:
                raise CheckpointError(
                    f"checkpoint {path}: optimizer.pt's {field!r:.40} of parameter {key} has shape {tuple(t.shape)}, "
                    f"the parameter {tuple(p.shape)}"
                )


def check_ema_state(path: str | os.PathLike) -> None:
    """Raise ``CheckpointError`` if the checkpoint ``path`` has no ``ema_state.safetensors`` for ``--use_ema``."""
    if not (Path(path) / EMA_FILE).is_file():
        raise CheckpointError(
            f"--use_ema: checkpoint {path} has no {EMA_FILE} (it was trained without --use_ema), so the average "
            "cannot continue; resume without --use_ema, or start a new run with it"
        )


def _load_ema(path: Path, ema) -> None:
    """``ema_state.safetensors`` of the checkpoint ``path`` into ``ema``, or ``CheckpointError`` saying why not."""
    check_ema_state(path)
    saved = {_current_name(k): v for k, v in load_file(path / EMA_FILE).items()}
    try:
        ema.load_state_dict(saved)
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: {EMA_FILE} does not fit this run's adapter ({err})") from None
