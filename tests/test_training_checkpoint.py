"""Checkpoints are atomic and restore exactly; the output folder refuses to mix runs."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from dora_diffusion.training.output import checkpoint as ckpt
from dora_diffusion.training.output.checkpoint import (
    TrainingState,
    list_checkpoints,
    load_checkpoint,
    remove_stale_temporaries,
    resolve_resume,
    save_checkpoint,
)
from dora_diffusion.training.output.rundir import (
    MANIFEST_FILE,
    OutputDirError,
    RunFiles,
    check_output_dir,
    remove_leftovers,
    with_resolved_paths,
)
from dora_diffusion.training.errors import TrainingError
from dora_diffusion.training.output.steplog import LOG_FILE, StepLog, read_step_log


WEIGHTS = "pytorch_lora_weights.safetensors"


def _setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    named = [(f"unet.{n}", p) for n, p in model.named_parameters()]
    opt = torch.optim.AdamW([p for _, p in named], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    return model, named, opt, sched


def _train(model, opt, sched, steps):
    for _ in range(steps):
        model(torch.ones(2, 4)).pow(2).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def _state(step):
    return TrainingState(step, step * 2, 1, 1, 2, 0)


def test_round_trip_restores_parameters_optimizer_and_schedule(tmp_path):
    model, named, opt, sched = _setup()
    _train(model, opt, sched, 2)
    path = save_checkpoint(tmp_path, _state(2), named, opt, sched)
    assert path.name == "checkpoint-2"
    _train(model, opt, sched, 2)
    straight = [p.detach().clone() for _, p in named]

    model2, named2, opt2, sched2 = _setup(seed=1)  # different initial weights
    state = load_checkpoint(path, named2, opt2, sched2)
    assert (state.global_step, state.micro_batch) == (2, 4)
    assert sched2.get_last_lr() == pytest.approx([0.1])
    _train(model2, opt2, sched2, 2)
    for a, (_, b) in zip(straight, named2):
        assert torch.equal(a, b)


def test_crash_mid_save_leaves_previous_checkpoint_as_latest(tmp_path, monkeypatch):
    model, named, opt, sched = _setup()
    save_checkpoint(tmp_path, _state(1), named, opt, sched)
    before = {f.name: f.read_bytes() for f in (tmp_path / "checkpoint-1").iterdir()}
    real_save = torch.save

    def crash_on_scheduler(obj, f, *a, **k):
        if str(f).endswith("lr_scheduler.pt"):
            raise OSError("disk full")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", crash_on_scheduler)
    with pytest.raises(TrainingError, match=r"could not write checkpoint-2 in .* \(OSError: disk full\)"):
        save_checkpoint(tmp_path, _state(2), named, opt, sched)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]  # no checkpoint-2, no temporary
    assert resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-1"
    assert {f.name: f.read_bytes() for f in (tmp_path / "checkpoint-1").iterdir()} == before


def _mb(text):
    """The sizes a disk-full message states, in bytes: ('a checkpoint takes about', 'is free there')."""
    units = {"bytes": 1, "kB": 1024, "MB": 1024**2, "GB": 1024**3}
    need, free = re.search(r"takes about ([\d.]+ \w+), ([\d.]+ \w+) is free", text).groups()
    return [float(v.split()[0]) * units[v.split()[1]] for v in (need, free)]


@pytest.mark.parametrize("how", ["ENOSPC from the tensor file", "torch.save's write failed on a full disk"])
def test_disk_full_names_the_path_and_the_space_and_keeps_no_half_checkpoint(tmp_path, monkeypatch, how):
    """Disk full while writing checkpoint-2: a TrainingError naming checkpoint-2, the folder, the space a checkpoint
    takes (within 1.5x of what checkpoint-1 takes on disk) and what is free; no checkpoint-2 and no temporary is left,
    checkpoint-1 is unchanged and is what --resume_from_checkpoint latest picks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.Linear(256, 64))  # 33 k parameters: a checkpoint of about 530 kB
    named = [(f"unet.{n}", p) for n, p in model.named_parameters()]
    opt = torch.optim.AdamW([p for _, p in named], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model(torch.ones(2, 64)).pow(2).sum().backward()
    opt.step()
    weights = lambda d: save_file({n: p.detach() for n, p in named}, d / "pytorch_lora_weights.safetensors")  # noqa: E731
    save_checkpoint(tmp_path, _state(1), named, opt, sched, write_weights=weights)
    before = {f.name: f.read_bytes() for f in (tmp_path / "checkpoint-1").iterdir()}
    if how.startswith("ENOSPC"):
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(ckpt, "save_file", full)
    else:
        def full(obj, f, *args, **kwargs):
            raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/0: file write failed")

        monkeypatch.setattr(ckpt.torch, "save", full)
        monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 100, 100))
    with pytest.raises(TrainingError) as err:
        save_checkpoint(tmp_path, _state(2), named, opt, sched)
    text = str(err.value)
    assert text.startswith(f"could not write checkpoint-2 in {tmp_path} (no space left on device; a checkpoint takes about ")
    assert "earlier checkpoints are intact; free some space, then continue with --resume_from_checkpoint latest" in text
    need, free = _mb(text)
    on_disk = sum(f.stat().st_size for f in (tmp_path / "checkpoint-1").iterdir())
    assert on_disk / 1.5 <= need <= on_disk * 1.5, (need, on_disk)
    if not how.startswith("ENOSPC"):
        assert free == 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]
    assert resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-1"
    assert {f.name: f.read_bytes() for f in (tmp_path / "checkpoint-1").iterdir()} == before


def test_a_failed_swap_keeps_the_earlier_checkpoint_of_the_same_step(tmp_path, monkeypatch):
    """Re-saving checkpoint-3 moves the old one aside first; if the rename of the new one fails, the old one is put
    back under its name (not left as a hidden temporary that the next start deletes)."""
    model, named, opt, sched = _setup()
    save_checkpoint(tmp_path, _state(3), named, opt, sched)
    before = {f.name: f.read_bytes() for f in (tmp_path / "checkpoint-3").iterdir()}
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(dst).name == "checkpoint-3":
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", failing_replace)
    with pytest.raises(TrainingError, match=r"could not write checkpoint-3 in .*Input/output error"):
        save_checkpoint(tmp_path, _state(3), named, opt, sched)
    remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]
    assert {f.name: f.read_bytes() for f in (tmp_path / "checkpoint-3").iterdir()} == before


def test_killed_process_leftovers_are_ignored_and_cleaned(tmp_path):
    model, named, opt, sched = _setup()
    save_checkpoint(tmp_path, _state(1), named, opt, sched)
    half = tmp_path / ".tmp-checkpoint-2-deadbeef"  # a process killed while writing
    half.mkdir()
    (half / "adapter_state.safetensors").write_bytes(b"\0" * 10)
    incomplete = tmp_path / "checkpoint-3"  # not ours / no training_state.json: never "latest"
    incomplete.mkdir()
    assert list_checkpoints(tmp_path) == [tmp_path / "checkpoint-1"]
    remove_stale_temporaries(tmp_path)
    assert not half.exists()


def test_total_limit_and_overwriting_a_step(tmp_path):
    model, named, opt, sched = _setup()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, _state(step), named, opt, sched, total_limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    save_checkpoint(tmp_path, _state(3), named, opt, sched, total_limit=2)  # same step again: replaced in place
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_resolve_resume(tmp_path):
    assert resolve_resume(tmp_path, None) is None
    assert resolve_resume(tmp_path, "latest") is None  # nothing yet: a fresh start
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint"):
        resolve_resume(tmp_path, "checkpoint-7")
    model, named, opt, sched = _setup()
    save_checkpoint(tmp_path, _state(7), named, opt, sched)
    assert resolve_resume(tmp_path, "checkpoint-7") == tmp_path / "checkpoint-7"
    assert resolve_resume(tmp_path, str(tmp_path / "checkpoint-7")) == tmp_path / "checkpoint-7"


def test_mismatching_checkpoint_is_refused(tmp_path):
    model, named, opt, sched = _setup()
    path = save_checkpoint(tmp_path, _state(1), named, opt, sched)
    other = nn.Linear(4, 3)
    named_other = [("unet.something.else", other.weight)]
    with pytest.raises(ValueError, match="does not match this run's adapter"):
        load_checkpoint(path, named_other, torch.optim.AdamW(other.parameters()), sched)


# ---------------------------------------------------------------- output folder
SETTINGS = {"pretrained_model_name_or_path": "m", "dataset": "d", "adapter": "dora", "rank": 8, "alpha": 8.0}
USER_FILES = {"README.md": "my notes", "notes.txt": "mine", "validation/mine.png": "png", "logs/mine.txt": "log",
              "mine_kohya.safetensors": "kohya"}  # fmt: skip


def _old_run(folder, **changes):
    """A finished run of ours: settings, a checkpoint and weights, recorded in the manifest."""
    files = RunFiles(folder)
    for name in ("training_args.json", "checkpoint-5", "pytorch_lora_weights.safetensors"):
        files.claim(name)
    (folder / "training_args.json").write_text(json.dumps({**SETTINGS, **changes}))
    (folder / "checkpoint-5").mkdir()
    (folder / "pytorch_lora_weights.safetensors").write_bytes(b"x")


def _user_files(folder):
    for rel, text in USER_FILES.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)


def _assert_user_files(folder):
    assert {rel: (folder / rel).read_text() for rel in USER_FILES} == USER_FILES


def test_output_dir_rules(tmp_path):
    check_output_dir(tmp_path / "new", SETTINGS, resuming=False, overwrite=False)  # fine
    (tmp_path / "unrelated").mkdir()
    (tmp_path / "unrelated" / "notes.txt").write_text("mine")
    check_output_dir(tmp_path / "unrelated", SETTINGS, resuming=False, overwrite=False)  # no earlier run in it

    _old_run(tmp_path / "same")
    with pytest.raises(OutputDirError, match=r"already holds an earlier run \(with the same settings\). It has no checkpoint"):
        check_output_dir(tmp_path / "same", SETTINGS, resuming=False, overwrite=False)  # its checkpoint-5 is empty
    check_output_dir(tmp_path / "same", SETTINGS, resuming=True, overwrite=False)

    _old_run(tmp_path / "other", rank=4)
    for resuming, match in ((False, r"a run with different settings \(rank: 4 -> 8\)"), (True, r"cannot resume .*rank: 4 -> 8")):
        with pytest.raises(OutputDirError, match=match) as err:
            check_output_dir(tmp_path / "other", SETTINGS, resuming=resuming, overwrite=False)
        assert "overwrite" not in str(err.value)  # never advise deleting the checkpoints over a settings mismatch
    files = check_output_dir(tmp_path / "other", SETTINGS, resuming=False, overwrite=True)
    (tmp_path / "other" / "notes.txt").write_text("kept")
    assert sorted(files.clear()) == ["checkpoint-5", "pytorch_lora_weights.safetensors", "training_args.json"]
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("resuming, overwrite", [(False, False), (True, False), (False, True)])
def test_user_files_survive_every_flag_combination(tmp_path, resuming, overwrite):
    """A folder holding the user's files named like a run's (README.md, validation/, logs/, *_kohya.safetensors):
    checking, clearing and writing what a run writes leave every one of them as it was."""
    folder = tmp_path / "out"
    _user_files(folder)
    files = check_output_dir(folder, SETTINGS, resuming, overwrite, outputs=["validation/step-2"])
    if overwrite:
        assert files.clear() == []
    written = ["training_args.json", "training_log.jsonl", "checkpoint-2/a", "validation/step-2/00.png", "logs/dora-dreambooth/ev"]
    for rel in written:  # what a run writes, each claimed first as the training loop does
        files.claim(rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text("ours")
    with pytest.raises(OutputDirError, match=r"README\.md exists and was not written by a dora-diffusion run"):
        files.claim("README.md")
    assert files.conflicts(["README.md", "model_card.md", "mine_kohya.safetensors"]) == ["README.md", "mine_kohya.safetensors"]
    again = check_output_dir(folder, SETTINGS, resuming=False, overwrite=True)
    assert sorted(again.clear()) == ["checkpoint-2", "logs/dora-dreambooth", "training_args.json", "training_log.jsonl",
                                     "validation/step-2"]  # fmt: skip
    _assert_user_files(folder)
    assert not (folder / MANIFEST_FILE).exists()


def test_user_files_named_like_outputs_are_refused_before_anything_is_written(tmp_path):
    folder = tmp_path / "out"
    _user_files(folder)
    (folder / "training_log.jsonl").write_text("my log")
    with pytest.raises(OutputDirError, match=r"holds mine_kohya\.safetensors, training_log\.jsonl, which this run would write"):
        check_output_dir(folder, SETTINGS, False, True, outputs=["mine_kohya.safetensors"])
    _assert_user_files(folder)
    assert not (folder / MANIFEST_FILE).exists()


def test_a_run_without_manifest_is_never_deleted(tmp_path):
    """Checkpoints and weights with no manifest (an older version's run, or somebody else's files): --overwrite_output_dir
    refuses instead of guessing; resuming adopts an older run's files only if it has settings and a checkpoint."""
    folder = tmp_path / "legacy"
    folder.mkdir()
    (folder / "pytorch_lora_weights.safetensors").write_bytes(b"someone else's adapter")
    with pytest.raises(OutputDirError, match="no run_files.json .* deletes nothing"):
        check_output_dir(folder, SETTINGS, resuming=False, overwrite=True)
    with pytest.raises(OutputDirError, match=r"holds pytorch_lora_weights\.safetensors, which this run would write"):
        check_output_dir(folder, SETTINGS, resuming=True, overwrite=False)
    model, named, opt, sched = _setup()
    save_checkpoint(folder, _state(3), named, opt, sched)
    (folder / "training_args.json").write_text(json.dumps(SETTINGS))
    files = check_output_dir(folder, SETTINGS, resuming=True, overwrite=False)
    assert sorted(files.entries) == ["checkpoint-3", "pytorch_lora_weights.safetensors", "training_args.json"]
    assert (folder / "pytorch_lora_weights.safetensors").read_bytes() == b"someone else's adapter"


def test_manifest_is_checked_and_clear_never_follows_links(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "a.txt").write_text("keep")
    (tmp_path / "precious" / "step-2").mkdir()
    files = RunFiles(folder)
    files.claim("logs")
    (folder / "logs").symlink_to(tmp_path / "precious")  # recorded as ours, then replaced by a link
    (folder / "validation").symlink_to(tmp_path / "precious")  # the user's folder, a link
    with pytest.raises(OutputDirError, match="validation/step-2 exists and was not written"):
        files.claim("validation/step-2")  # exists through the link, not ours
    files.entries.append("validation/step-2")  # as if recorded before the user made validation/ a link
    assert files.clear() == ["logs"]
    assert (tmp_path / "precious" / "a.txt").read_text() == "keep" and (tmp_path / "precious" / "step-2").is_dir()
    for entry in ("../precious", "/etc", "a/../../b", "", 5):
        (folder / MANIFEST_FILE).write_text(json.dumps({"files": [entry]}))
        with pytest.raises(OutputDirError, match="run_files.json is damaged"):
            RunFiles(folder)
    assert (tmp_path / "precious" / "a.txt").read_text() == "keep"


def test_settings_compare_paths_by_what_they_point_at(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    absolute = {**SETTINGS, "pretrained_model_name_or_path": str(tmp_path / "model"), "dataset": str(tmp_path / "data") + "/"}
    folder = tmp_path / "out"
    _old_run(folder)
    (folder / "training_args.json").write_text(json.dumps(with_resolved_paths(absolute)))
    relative = {**SETTINGS, "pretrained_model_name_or_path": "model", "dataset": "./data"}
    check_output_dir(folder, relative, resuming=True, overwrite=False)
    monkeypatch.chdir(folder)  # the recorded absolute form wins over the relative spelling of the new cwd
    check_output_dir(folder, absolute, resuming=True, overwrite=False)
    with pytest.raises(OutputDirError, match="pretrained_model_name_or_path: .* -> 'other/model'"):
        check_output_dir(folder, {**absolute, "pretrained_model_name_or_path": "other/model"}, resuming=True, overwrite=False)


def test_total_limit_prunes_only_checkpoints_of_this_run(tmp_path):
    model, named, opt, sched = _setup()
    save_checkpoint(tmp_path, _state(1), named, opt, sched)  # not ours
    files = RunFiles(tmp_path)
    for step in (2, 3, 4):
        files.claim(f"checkpoint-{step}")
        save_checkpoint(tmp_path, _state(step), named, opt, sched, total_limit=2, owned=lambda c: files.owns(c.name))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-3", "checkpoint-4"]


def test_total_limit_never_deletes_through_a_link(tmp_path):
    """A recorded checkpoint-1 later replaced by a link to the user's folder: pruning it leaves the folder whole."""
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("keep")
    model, named, opt, sched = _setup()
    save_checkpoint(precious / "x", _state(1), named, opt, sched)
    (precious / "x" / "checkpoint-1" / ckpt.STATE_FILE).rename(precious / ckpt.STATE_FILE)  # looks like a checkpoint
    out = tmp_path / "out"
    files = RunFiles(out)
    files.claim("checkpoint-1")
    (out / "checkpoint-1").symlink_to(precious)
    for step in (2, 3):
        files.claim(f"checkpoint-{step}")
        save_checkpoint(out, _state(step), named, opt, sched, total_limit=1, owned=lambda c: files.owns(c.name))
    assert (precious / "keep.txt").read_text() == "keep" and (precious / ckpt.STATE_FILE).is_file()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "checkpoint-3", MANIFEST_FILE]


# ---------------------------------------------------------------- damaged checkpoints and logs
def _damage(path, how):
    if how == "truncated tensors":
        data = (path / "adapter_state.safetensors").read_bytes()
        (path / "adapter_state.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "corrupt optimizer":
        data = bytearray((path / "optimizer.pt").read_bytes())
        data[len(data) // 3] ^= 0xFF
        (path / "optimizer.pt").write_bytes(bytes(data))
    elif how == "missing scheduler":
        (path / "lr_scheduler.pt").unlink()
    else:  # a state with a negative step, or half-written
        text = json.dumps({**json.loads((path / ckpt.STATE_FILE).read_text()), "global_step": -5})
        (path / ckpt.STATE_FILE).write_text(text if how == "negative step" else text[:20])


@pytest.mark.parametrize("how", ["truncated tensors", "corrupt optimizer", "missing scheduler", "negative step", "half-written state"])
def test_latest_falls_back_past_a_damaged_checkpoint(tmp_path, how, caplog):
    model, named, opt, sched = _setup()
    for step in (1, 2):
        save_checkpoint(tmp_path, _state(step), named, opt, sched)
    _damage(tmp_path / "checkpoint-2", how)
    assert resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-1"
    assert "skipping damaged checkpoint" in caplog.text and "checkpoint-2" in caplog.text
    with pytest.raises(ckpt.CheckpointError, match="checkpoint-2 is damaged"):
        resolve_resume(tmp_path, "checkpoint-2")
    _damage(tmp_path / "checkpoint-1", how)
    with pytest.raises(ckpt.CheckpointError, match=r"holds an earlier run \(checkpoint-1, checkpoint-2\) but no intact checkpoint"):
        resolve_resume(tmp_path, "latest")  # nothing intact: no new run over the old one, and no traceback


def test_negative_step_is_refused_on_load(tmp_path):
    model, named, opt, sched = _setup()
    path = save_checkpoint(tmp_path, _state(2), named, opt, sched)
    _damage(path, "negative step")
    with pytest.raises(ckpt.CheckpointError, match="global_step = -5; expected an integer >= 0"):
        load_checkpoint(path, named, opt, sched)


def test_half_written_last_log_line_is_tolerated(tmp_path):
    rows = [{"step": s, "loss": 0.5, "lr": 1e-4} for s in (1, 2, 3)]
    (tmp_path / LOG_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')
    assert read_step_log(tmp_path) == rows
    StepLog(tmp_path, start_step=2).write(3, 0.25, 1e-4)
    assert [r["step"] for r in read_step_log(tmp_path)] == [1, 2, 3]


def test_leftover_temporaries_of_our_atomic_writes_are_removed(tmp_path):
    ours = [".pytorch_lora_weights.safetensors.k2j4_8zq.tmp", ".out_comfyui.safetensors.abcdefgh.tmp", ".training_args.json.0a1b2c3d.tmp", ".run_files.json.abcdefgh.tmp"]
    theirs = [".notes.abcdefgh.tmp", ".mine.safetensors.abcdefgh.tmp", "x.tmp"]
    for name in ours + theirs:
        (tmp_path / name).write_text("")
    remove_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(theirs)


def test_outputs_of_a_long_run_are_listed_from_the_folder_not_the_schedule(tmp_path):
    """--max_train_steps 100000000 --validation_steps 1: the validation folders a run would overwrite are found by
    listing validation/ (bounded by what exists), not by building the 10^8 names of the schedule."""
    import argparse
    import time

    from dora_diffusion.training.plan import planned_outputs as _outputs

    for name in ("step-5", "step-100000", "step-100000000", "step-100000001", "step-05", "mine"):
        (tmp_path / "validation" / name).mkdir(parents=True)
    args = argparse.Namespace(export_kohya=False, export_comfyui=False, validation_prompt="a TOK", validation_steps=1, max_train_steps=10**5)
    assert _outputs(args, tmp_path) == ["validation/step-100000", "validation/step-5"]
    args.max_train_steps = 10**8
    start = time.perf_counter()
    assert _outputs(args, tmp_path) == ["validation/step-100000", "validation/step-100000000", "validation/step-5"]
    assert time.perf_counter() - start < 1.0
    args.validation_steps = 3
    assert _outputs(args, tmp_path) == ["validation/step-100000000"]  # the last step always validates


# ---------------------------------------------------------------- what a checkpoint was trained with
def test_nothing_to_resume_in_a_used_folder_is_an_error_not_a_new_run(tmp_path):
    """The refusal names every setting that differs (--resolution too, not only the adapter's) and advises
    --resume_from_checkpoint latest only when there is a checkpoint; `latest` in a folder holding a finished run
    without checkpoints stops, where it used to start a new run over that run's weights."""
    folder = tmp_path / "out"
    files = RunFiles(folder)
    files.claim("training_args.json")
    (folder / "training_args.json").write_text(json.dumps({**SETTINGS, "resolution": 1024, "learning_rate": 1e-4, "output_dir": "x"}))
    files.claim(WEIGHTS)
    (folder / WEIGHTS).write_bytes(b"weights")
    new = {**SETTINGS, "resolution": 64, "learning_rate": 1e-4, "output_dir": "y"}
    with pytest.raises(OutputDirError) as err:
        check_output_dir(folder, new, resuming=False, overwrite=False)
    assert f"--output_dir {folder} already holds an earlier run (its settings differ: resolution: 1024 -> 64). It has no " \
        "checkpoint to continue from. Choose another --output_dir, or pass --overwrite_output_dir" in str(err.value)
    with pytest.raises(ckpt.CheckpointError, match=r"latest: .* holds an earlier run \(pytorch_lora_weights.safetensors\) but "
                       "no intact checkpoint to continue from; a new run there would write over its weights"):
        resolve_resume(folder, "latest")
    assert resolve_resume(tmp_path / "fresh", "latest") is None  # nothing there yet: a new run (one command for every start)
    model, named, opt, sched = _setup()
    files.claim("checkpoint-3")
    save_checkpoint(folder, _state(3), named, opt, sched)
    with pytest.raises(OutputDirError, match=r"its settings differ: resolution: 1024 -> 64\). Pass --resume_from_checkpoint latest"):
        check_output_dir(folder, new, resuming=False, overwrite=False)
    assert resolve_resume(folder, "latest") == folder / "checkpoint-3"
    assert (folder / WEIGHTS).read_bytes() == b"weights"


def _recorded_state(step, **settings):
    from dora_diffusion.training.output.rundir import adapter_settings

    return TrainingState(step, step * 2, 1, 1, 2, 0, adapter_settings({**SETTINGS, **settings}), None)


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"rank": 8, "alpha": 8.0}, "rank: 4 -> 8, alpha: 4.0 -> 8.0"),
        ({"adapter": "lora"}, "adapter: 'dora' -> 'lora'"),
        ({"unet_targets": "attn_ff"}, "unet_targets: 'attn' -> 'attn_ff'"),
        ({"alpha": 16.0}, "alpha: 4.0 -> 16.0"),
        ({"train_text_encoder": True}, "train_text_encoder: False -> True"),
    ],
)
def test_resuming_with_other_adapter_settings_names_them(tmp_path, changes, named):
    """A checkpoint records the adapter settings it was trained with; resuming it (from any folder) with others is
    refused before any model loads, naming each setting with both values. An older checkpoint without the record
    is compared with its run's training_args.json."""
    from dora_diffusion.training.output.rundir import check_resume

    old = {**SETTINGS, "rank": 4, "alpha": 4.0, "unet_targets": "attn", "train_text_encoder": False}
    model, named_params, opt, sched = _setup()
    path = save_checkpoint(tmp_path / "run", _recorded_state(2, **old), named_params, opt, sched)
    state = ckpt.read_state(path)
    assert state.settings["rank"] == 4 and "resolved_paths" in state.settings
    check_resume(path, state, old, {}, False)  # the same settings: fine
    with pytest.raises(ckpt.CheckpointError) as err:
        check_resume(path, state, {**old, **changes}, {}, False)
    assert str(err.value).startswith(f"--resume_from_checkpoint {path}: it was trained with other adapter settings ({named})")
    legacy = ckpt.TrainingState(2, 4, 1, 1, 2, 0)  # an older checkpoint: its run's training_args.json speaks for it
    (tmp_path / "run" / "training_args.json").write_text(json.dumps(old))
    with pytest.raises(ckpt.CheckpointError, match=re.escape(named)):
        check_resume(path, legacy, {**old, **changes}, {}, False)


def test_dataset_fingerprint_names_what_changed_and_is_bounded():
    """Names, sizes and captions exactly; pixels through 4 x 4 thumbnails with a tolerance, so the same images decoded
    at another --resolution are the same data, and a replaced image is not."""
    import numpy as np
    from PIL import Image

    from dora_diffusion.training.data.records import Record
    from dora_diffusion.training.data.fingerprint import MAX_ENTRIES, dataset_fingerprint, fingerprint_difference

    rng = np.random.default_rng(0)
    def photo():  # smooth colour fields, like photos at this scale (noise would average to grey)
        return Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)).resize((96, 128), Image.Resampling.BICUBIC)

    photos = [photo() for _ in range(3)]

    def records(n=3, caption="a TOK", side=None, images=photos):
        out = []
        for i in range(n):
            image = images[i % len(images)]
            shrunk = image.resize((side, side * 4 // 3), Image.Resampling.LANCZOS) if side else image
            out.append(Record(shrunk, f"{caption} {i}", f"{i:04d}.png", image.size))
        return out

    base = dataset_fingerprint(records())
    assert base["images"] == 3 and len(base["entries"]) == 3 and len(base["digest"]) == 64
    assert dataset_fingerprint(list(reversed(records()))) == base  # order does not matter
    assert fingerprint_difference(base, dataset_fingerprint(records(side=64))) is None  # decoded for --resolution 64
    assert fingerprint_difference(base, dataset_fingerprint(records(side=48))) is None
    assert fingerprint_difference(base, dataset_fingerprint(records(4))) == "3 images -> 4 images; added '0003.png'"
    assert fingerprint_difference(base, dataset_fingerprint(records(caption="a cat"))) == (
        "caption or size changed '0000.png', '0001.png', '0002.png'"
    )
    replaced = records()
    replaced[1].image = photo()  # another picture, same name, size and caption
    assert fingerprint_difference(base, dataset_fingerprint(replaced)) == "pixels changed '0001.png'"
    renamed = records()
    renamed[2].name = "other.png"
    assert fingerprint_difference(base, dataset_fingerprint(renamed)) == "added 'other.png'; removed '0002.png'"
    big = dataset_fingerprint([Record(Image.new("RGB", (8, 8)), "c", f"{i}.png") for i in range(MAX_ENTRIES + 1)])
    assert "entries" not in big and len(json.dumps(big)) < 200  # the digest alone beyond 1000 images
    assert fingerprint_difference(big, base) == f"{MAX_ENTRIES + 1} images -> 3 images"
    assert len(json.dumps(dataset_fingerprint([Record(Image.new("RGB", (8, 8)), "c" * 50, f"{i:08d}.png") for i in range(MAX_ENTRIES)]))) < 110_000
    tampered = {**base, "entries": [["a"], 5], "digest": "x"}  # a hand-edited checkpoint: no traceback
    assert fingerprint_difference(tampered, base) == "the images or captions differ"


def test_resuming_on_other_data_is_refused_unless_allowed(tmp_path):
    from dora_diffusion.training.output.rundir import check_resume

    model, named_params, opt, sched = _setup()
    thumb = "A" * 64  # 48 zero bytes, base64
    recorded = {"images": 3, "digest": "a" * 64, "entries": [["0000.png", "1", thumb], ["0001.png", "2", thumb], ["0002.png", "3", thumb]]}
    state = TrainingState(2, 4, 1, 1, 2, 0, None, recorded)
    path = save_checkpoint(tmp_path, state, named_params, opt, sched)
    assert ckpt.read_state(path).dataset == recorded
    now = {"images": 2, "digest": "b" * 64, "entries": [["0000.png", "1", thumb], ["0001.png", "9", thumb]]}
    with pytest.raises(ckpt.CheckpointError) as err:
        check_resume(path, ckpt.read_state(path), {**SETTINGS, "dataset": "/data/other"}, now, False)
    assert str(err.value) == (
        f"--resume_from_checkpoint {path}: it was trained on other data than --dataset /data/other holds (3 images -> 2 "
        "images; removed '0002.png'; caption or size changed '0001.png'). Resume with the dataset it was trained "
        "on, or pass --allow_dataset_change to continue on this one (fixed captions, added images: the data order then "
        "differs from an uninterrupted run)"
    )
    check_resume(path, ckpt.read_state(path), SETTINGS, now, True)  # --allow_dataset_change
    check_resume(path, ckpt.read_state(path), SETTINGS, recorded, False)  # the same data


def test_a_signal_is_recorded_once_then_acts_as_usual(request):
    """stop_on_signals records the first SIGINT (the loop then saves and stops); a second Ctrl-C interrupts as
    usual; the handlers found before are put back."""
    import signal
    import time

    from dora_diffusion.training.signals import stop_on_signals

    # a process's usual Ctrl-C (a pytest-xdist worker ignores SIGINT, leaving it to the controller)
    runner = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, runner))
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with stop_on_signals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs between bytecodes of the main thread
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def _tamper(path, how, named, opt):
    if how == "NaN in the adapter tensors":
        state = {k: v.clone() for k, v in ckpt.load_file(path / "adapter_state.safetensors").items()}
        state["unet.0.bias"][0] = float("nan")
        save_file(state, path / "adapter_state.safetensors")
    elif how == "int8 adapter tensors":
        state = {k: v.to(torch.int8) for k, v in ckpt.load_file(path / "adapter_state.safetensors").items()}
        save_file(state, path / "adapter_state.safetensors")
    elif how == "a 20 MB state file":
        data = json.loads((path / ckpt.STATE_FILE).read_text())
        (path / ckpt.STATE_FILE).write_text(json.dumps({**data, "settings": {"x": "y" * 20_000_000}}))
    elif how == "optimizer moments of the wrong shape":
        sd = opt.state_dict()
        sd["state"][0]["exp_avg"] = torch.zeros(7, 7)
        torch.save(sd, path / "optimizer.pt")
    elif how == "optimizer of another parameter count":
        torch.save(torch.optim.AdamW([named[0][1]]).state_dict(), path / "optimizer.pt")
    elif how == "a pickled global in optimizer.pt":
        torch.save({"state": {}, "param_groups": [], "x": os.getcwd}, path / "optimizer.pt")


DAMAGED = {  # how -> (found by checkpoint_problem, or refused on load), message
    "NaN in the adapter tensors": ("problem", "adapter_state.safetensors: 'unet.0.bias' is not finite (torch.float32)"),
    "int8 adapter tensors": ("problem", "is not floating point (torch.int8)"),
    "a 20 MB state file": ("problem", "training_state.json is unreadable (20000"),
    "optimizer moments of the wrong shape": ("load", "optimizer.pt's 'exp_avg' of parameter 0 has shape (7, 7), the parameter (3, 4)"),
    "optimizer of another parameter count": ("load", "optimizer.pt has parameter groups of sizes [1], this run [4]"),
    "a pickled global in optimizer.pt": ("load", "optimizer.pt cannot be read with torch.load(weights_only=True) (UnpicklingError"),
}


@pytest.mark.parametrize("how", list(DAMAGED))
def test_tampered_checkpoints_are_refused_by_name_and_change_nothing(tmp_path, how):
    """A checkpoint edited by hand or by another program: a damaged one is skipped by `latest` (values training never
    writes: NaN, integers, a state file of megabytes); one whose optimizer state does not fit is a CheckpointError
    naming the file and the shapes before any parameter changes (was: a RuntimeError at the first optimizer step, a
    ValueError or UnpicklingError with a traceback)."""
    model, named, opt, sched = _setup()
    _train(model, opt, sched, 1)
    path = save_checkpoint(tmp_path, _state(2), named, opt, sched)
    _tamper(path, how, named, opt)
    where, message = DAMAGED[how]
    model2, named2, opt2, sched2 = _setup(seed=1)
    before = [p.detach().clone() for _, p in named2]
    if where == "problem":
        assert message in ckpt.checkpoint_problem(path)
        with pytest.raises(ckpt.CheckpointError, match="no intact checkpoint"):
            resolve_resume(tmp_path, "latest")
    else:
        assert ckpt.checkpoint_problem(path) is None  # well-formed archives: only loading shows the mismatch
        with pytest.raises(ckpt.CheckpointError) as err:
            load_checkpoint(path, named2, opt2, sched2)
        assert message in str(err.value) and str(path) in str(err.value)
        assert all(torch.equal(a, p) for a, (_, p) in zip(before, named2))


def test_only_canonical_checkpoint_names_count(tmp_path):
    """checkpoint-0002 (not a name a run writes) is not taken for checkpoint-2; checkpoint-<30 digits> is read."""
    model, named, opt, sched = _setup()
    save_checkpoint(tmp_path, _state(2), named, opt, sched)
    (tmp_path / "checkpoint-2").rename(tmp_path / "checkpoint-0002")
    assert list_checkpoints(tmp_path) == []
    huge = 10**30
    save_checkpoint(tmp_path, TrainingState(huge, huge, 1, 1, 2, 0), named, opt, sched)
    assert resolve_resume(tmp_path, "latest") == tmp_path / f"checkpoint-{huge}"


SPECIAL = ["optimizer.pt", "lr_scheduler.pt", "adapter_state.safetensors"]


def test_special_files_in_a_checkpoint_are_damage_not_a_hang(tmp_path):
    """A checkpoint file that is a FIFO, or a link to /dev/zero, would be read forever (zipfile.testzip on /dev/zero
    never returns; safetensors blocks opening a FIFO, holding the GIL): `latest` skips it and takes the checkpoint
    before, all three cases in one subprocess bounded at 30 s."""
    import subprocess
    import sys

    model, named, opt, sched = _setup()
    for name in SPECIAL:
        for step in (1, 2):
            save_checkpoint(tmp_path / name, _state(step), named, opt, sched)
        os.unlink(tmp_path / name / "checkpoint-2" / name)
        os.mkfifo(tmp_path / name / "checkpoint-2" / name)
    code = (
        "import sys; from dora_diffusion.training.output.checkpoint import resolve_resume\n"
        "for name in sys.argv[2:]: print(resolve_resume(sys.argv[1] + '/' + name, 'latest').name)"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path), *SPECIAL], capture_output=True, text=True, timeout=30, cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)})  # fmt: skip
    assert proc.stdout.split() == ["checkpoint-1"] * 3, proc.stderr[-2000:]
    for name in SPECIAL:
        target = tmp_path / name / "checkpoint-2" / name
        assert ckpt.checkpoint_problem(target.parent) == f"{name} is not a regular file"
        target.unlink()
        target.symlink_to("/dev/zero")
        assert ckpt.checkpoint_problem(target.parent) == f"{name} is not a regular file"
    os.mkfifo(tmp_path / "optimizer.pt" / "checkpoint-1" / "grad_scaler.pt")  # fp16 runs' scaler state
    assert ckpt.checkpoint_problem(tmp_path / "optimizer.pt" / "checkpoint-1") == "grad_scaler.pt is not a regular file"


def test_the_run_lock_excludes_a_second_holder_and_never_follows_a_link(tmp_path):
    """run_lock: a second holder of the same folder gets OutputDirError; a .dora-run.lock that is a link (to a file
    that does not exist yet) is refused, not followed to create a file outside the folder."""
    from dora_diffusion.training.output.rundir import LOCK_FILE, run_lock

    with run_lock(tmp_path / "out"):
        with pytest.raises(OutputDirError, match="is being written by another training run right now"):
            with run_lock(tmp_path / "out"):
                pass
    with run_lock(tmp_path / "out"):  # released when the block ends
        pass
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / LOCK_FILE).symlink_to(tmp_path / "elsewhere.txt")
    with pytest.raises(OutputDirError, match=r"\.dora-run\.lock cannot be opened as this run's lock"):
        with run_lock(tmp_path / "linked"):
            pass
    assert not (tmp_path / "elsewhere.txt").exists()
