"""Checkpoints are atomic and restore exactly; the output folder refuses to mix runs."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from dora_diffusion.training import checkpoint as ckpt
from dora_diffusion.training.checkpoint import (
    TrainingState,
    list_checkpoints,
    load_checkpoint,
    remove_stale_temporaries,
    resolve_resume,
    save_checkpoint,
)
from dora_diffusion.training.rundir import OutputDirError, check_output_dir, clear_run


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
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, _state(2), named, opt, sched)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]  # no checkpoint-2, no temporary
    assert resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-1"
    assert {f.name: f.read_bytes() for f in (tmp_path / "checkpoint-1").iterdir()} == before


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
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
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


def _old_run(folder, **changes):
    folder.mkdir()
    (folder / "training_args.json").write_text(json.dumps({**SETTINGS, **changes}))
    (folder / "checkpoint-5").mkdir()
    (folder / "pytorch_lora_weights.safetensors").write_bytes(b"x")


def test_output_dir_rules(tmp_path):
    check_output_dir(tmp_path / "new", SETTINGS, resuming=False, overwrite=False)  # fine
    (tmp_path / "unrelated").mkdir()
    (tmp_path / "unrelated" / "notes.txt").write_text("mine")
    check_output_dir(tmp_path / "unrelated", SETTINGS, resuming=False, overwrite=False)  # no earlier run in it

    _old_run(tmp_path / "same")
    with pytest.raises(OutputDirError, match="already holds an earlier run. Pass --resume_from_checkpoint latest"):
        check_output_dir(tmp_path / "same", SETTINGS, resuming=False, overwrite=False)
    check_output_dir(tmp_path / "same", SETTINGS, resuming=True, overwrite=False)

    _old_run(tmp_path / "other", rank=4)
    with pytest.raises(OutputDirError, match=r"a run with different settings \(rank: 4 -> 8\)"):
        check_output_dir(tmp_path / "other", SETTINGS, resuming=False, overwrite=False)
    with pytest.raises(OutputDirError, match=r"cannot resume .*rank: 4 -> 8"):
        check_output_dir(tmp_path / "other", SETTINGS, resuming=True, overwrite=False)
    check_output_dir(tmp_path / "other", SETTINGS, resuming=False, overwrite=True)
    (tmp_path / "other" / "notes.txt").write_text("kept")
    clear_run(tmp_path / "other")
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["notes.txt"]
