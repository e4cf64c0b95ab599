"""The upload to the Hub (issue 27): only the run's own files, through no link, to a private repo unless asked."""

from __future__ import annotations

import json

import pytest

from dora_diffusion.training import TrainingError
from dora_diffusion.training.output.hub import create_hub_repo, public_settings, upload_list, upload_run
from dora_diffusion.training.output.rundir import RunFiles
from helpers import FakeHub


def _run_folder(tmp_path):
    """An output folder as a run leaves it, plus the user's files and a manifest that lists too much."""
    out = tmp_path / "out"
    files = {
        "pytorch_lora_weights.safetensors": "w", "README.md": "card", "training_args.json": "{}",
        "training_log.jsonl": "{}", "validation/step-2/00.png": "png", "checkpoint-2/optimizer.pt": "pickle",
        "logs/events": "tb", "notes.txt": "mine", "validation/step-2/mine.txt": "mine", "out_kohya.safetensors": "k",
    }  # fmt: skip
    for rel, text in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    secret = tmp_path / "secret.txt"
    secret.write_text("hf_SECRET")
    (out / "validation" / "step-2" / "01.png").symlink_to(secret)  # a link in a recorded folder
    (out / "validation" / "step-3").symlink_to(tmp_path)  # a recorded folder that became a link
    manifest = RunFiles(out)
    manifest.entries = ["training_args.json", "training_log.jsonl", "checkpoint-2", "logs", "validation/step-2",
                        "validation/step-3", "pytorch_lora_weights.safetensors", "README.md", "notes.txt"]  # fmt: skip
    manifest.save()
    return out, RunFiles(out)


def test_upload_list_is_the_runs_published_files_only(tmp_path):
    """Of what the manifest lists: names a run writes, regular files, no link followed. notes.txt (listed by a
    tampered manifest), a file the user put in a validation folder, a link to a secret, checkpoints, tracker logs
    and an unlisted kohya file all stay home."""
    out, manifest = _run_folder(tmp_path)
    assert upload_list(out, manifest) == [
        "README.md", "pytorch_lora_weights.safetensors", "training_args.json", "training_log.jsonl",
        "validation/step-2/00.png",
    ]  # fmt: skip


def test_the_runs_exports_are_published_when_listed(tmp_path):
    """--export_kohya and --export_comfyui files are sent when the run's manifest lists them (and only then)."""
    out, manifest = _run_folder(tmp_path)
    (out / "out_comfyui.safetensors").write_text("c")
    (out / "other_comfyui.safetensors").write_text("c")
    manifest.entries += ["out_kohya.safetensors", "out_comfyui.safetensors"]
    sent = upload_list(out, manifest)
    assert [p for p in sent if p.endswith("safetensors")] == [
        "out_comfyui.safetensors", "out_kohya.safetensors", "pytorch_lora_weights.safetensors"
    ]


def test_upload_run_sends_the_list_in_one_commit_without_local_paths(tmp_path, monkeypatch):
    import huggingface_hub

    out, manifest = _run_folder(tmp_path)
    home = str(tmp_path)
    settings = {"dataset": f"{home}/data/dog", "output_dir": str(out), "cache_dir": "~/cache", "rank": 4,
                "pretrained_model_name_or_path": "stabilityai/stable-diffusion-xl-base-1.0",
                "validation_prompt": "a TOK dog", "resolved_paths": {"dataset": f"{home}/data/dog"}}  # fmt: skip
    (out / "training_args.json").write_text(json.dumps(settings))
    hub = FakeHub()
    monkeypatch.setattr(huggingface_hub, "HfApi", hub)
    sent = upload_run(out, "me/run", manifest, token="tok")
    assert sent == upload_list(out, manifest) and sorted(hub.sent["me/run"]) == sent
    assert hub.log == [("commit", "me/run", "End of training", "tok")]
    published = json.loads(hub.sent["me/run"]["training_args.json"])
    assert published == {"dataset": "dog", "output_dir": "out", "cache_dir": "cache", "rank": 4,
                         "pretrained_model_name_or_path": "stabilityai/stable-diffusion-xl-base-1.0",
                         "validation_prompt": "a TOK dog"}  # fmt: skip
    assert public_settings({"x": [home, {"y": home + "/z"}]}) == {"x": [tmp_path.name, {"y": "z"}]}


def test_repo_is_private_unless_hub_public_and_an_existing_public_repo_is_refused(monkeypatch):
    import huggingface_hub

    hub = FakeHub(public={"me/shared"})
    monkeypatch.setattr(huggingface_hub, "HfApi", hub)
    assert create_hub_repo("run") == "me/run" and hub.log[-1] == ("create", "run", True, None)
    assert create_hub_repo("open", "tok", public=True) == "me/open" and hub.log[-1] == ("create", "open", False, "tok")
    with pytest.raises(TrainingError, match=r"the Hub repo me/shared exists and is public; pass --hub_public"):
        create_hub_repo("shared")
    assert create_hub_repo("shared", public=True) == "me/shared"
