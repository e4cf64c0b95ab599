"""Upload a finished run to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

HUB_IGNORE = ["checkpoint-*", "checkpoint-*/**", ".*", "logs/**", "run_files.json"]
"""Not uploaded: resumable checkpoints, hidden temporaries, tracker logs, the manifest of the run's files."""


def create_hub_repo(repo_id: str, token: str | None = None) -> str:
    """Create (or reuse) the model repo; returns its full id ``owner/name``."""
    from huggingface_hub import create_repo

    return create_repo(repo_id, exist_ok=True, token=token).repo_id


def upload_run(output_dir: str | Path, repo_id: str, token: str | None = None) -> None:
    """Upload the adapter, the model card and the validation images (no checkpoints)."""
    from huggingface_hub import upload_folder

    upload_folder(
        repo_id=repo_id,
        folder_path=str(output_dir),
        commit_message="End of training",
        ignore_patterns=HUB_IGNORE,
        token=token,
    )
