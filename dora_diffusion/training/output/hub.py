"""Upload a finished run to the Hugging Face Hub: exactly the run's own files, to a private repo unless asked.

What is sent is read from the run's manifest (``run_files.json``), never from a listing of the folder: of the paths
the run recorded, the files whose names a run writes (``PUBLISHED``), regular files only, no link followed. A user's
notes or photos in ``--output_dir`` are never sent, nor are checkpoints (resumable state, optimizer pickles), tracker
logs or the manifest. ``training_args.json`` is sent with every local path cut to its last part (``public_value``).
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path, PurePosixPath

from dora_diffusion.training.errors import TrainingError
from dora_diffusion.training.output.rundir import RESOLVED_KEY, SETTINGS_FILE, RunFiles

PUBLISHED = re.compile(
    r"(training_args\.json|training_log\.jsonl|README\.md|model_card\.md|pytorch_lora_weights\.safetensors"
    r"|[^/]+_(?:kohya|comfyui)\.safetensors|[^/]+_emb\.safetensors|validation/step-\d+/\d+\.png)"
)
"""The paths (relative to ``--output_dir``) a push may send, when the run's manifest lists them."""


def public_value(value: object) -> object:
    """A setting as it may be published: a local path (absolute, under ``~``, or naming something on this machine)
    as its last part (``/home/me/data/dog`` -> ``dog``); lists and dicts item by item; anything else as it is."""
    if isinstance(value, dict):
        return {k: public_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [public_value(v) for v in value]
    if isinstance(value, str) and value:
        local = os.path.isabs(value) or value.startswith("~") or ("/" in value or "\\" in value) and os.path.exists(value)
        if local:
            return Path(os.path.expanduser(value.rstrip("/\\"))).name or value
    return value


def public_settings(settings: dict) -> dict:
    """``training_args.json`` as published: without ``resolved_paths``, local paths cut to their last part."""
    return {k: public_value(v) for k, v in settings.items() if k != RESOLVED_KEY}


def create_hub_repo(repo_id: str, token: str | None = None, public: bool = False) -> str:
    """Create the model repo, private unless ``public``, or reuse it; returns its full id ``owner/name``.

    An existing public repo is refused without ``public`` (``TrainingError``): the run would publish into it.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    full_id = api.create_repo(repo_id, private=not public, exist_ok=True).repo_id
    private = getattr(api.repo_info(full_id), "private", None)
    if private is False and not public:
        raise TrainingError(
            f"--push_to_hub: the Hub repo {full_id} exists and is public; pass --hub_public to upload to it, make it "
            "private on the Hub, or choose another --hub_model_id. Nothing was trained or written"
        )
    return full_id


def _regular(root: Path, rel: str) -> bool:
    """True if ``root/rel`` is a regular file reached through no link."""
    parts = PurePosixPath(rel).parts
    if any(root.joinpath(*parts[:i]).is_symlink() for i in range(1, len(parts))):
        return False
    try:
        return stat.S_ISREG(os.lstat(root / rel).st_mode)
    except OSError:
        return False


def upload_list(output_dir: str | Path, run_files: RunFiles) -> list[str]:
    """The files a push sends (relative POSIX paths, sorted): those the manifest lists, directly or in a folder it
    lists, that match ``PUBLISHED`` and are regular files reached through no link."""
    root = Path(output_dir)
    found = set()
    for entry in run_files.entries:
        path = root / entry
        if path.is_dir() and not path.is_symlink():
            for dirpath, _, filenames in os.walk(path):  # links to folders are not entered
                found.update(Path(dirpath, n).relative_to(root).as_posix() for n in filenames)
        else:
            found.add(entry)
    return sorted(rel for rel in found if PUBLISHED.fullmatch(rel) and _regular(root, rel))


def upload_run(output_dir: str | Path, repo_id: str, run_files: RunFiles, token: str | None = None) -> list[str]:
    """Send ``upload_list`` to ``repo_id`` in one commit (``training_args.json`` through ``public_settings``);
    returns the paths sent."""
    from huggingface_hub import CommitOperationAdd, HfApi

    root = Path(output_dir)
    paths = upload_list(root, run_files)
    operations = []
    for rel in paths:
        content: str | bytes = str(root / rel)
        if rel == SETTINGS_FILE:
            settings = json.loads((root / rel).read_text(encoding="utf-8"))
            content = json.dumps(public_settings(settings), indent=2, sort_keys=True).encode("utf-8")
        operations.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=content))
    HfApi(token=token).create_commit(repo_id, operations, commit_message="End of training")
    return paths
