"""Bad input: a clear error naming the problem, and the pipeline exactly as it was before."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from dora_diffusion import AdapterFileError
from dora_diffusion.core.inject import adapted_layers
from helpers import assert_unchanged, make_adapter_file, pipeline_state


pytestmark = pytest.mark.exactness  # rollback: "a failed load changes nothing"


@pytest.fixture
def good(tmp_path):
    return load_file(make_adapter_file(tmp_path / "good"))


def fails(pipe, source, match: str, **kwargs) -> None:
    before = pipeline_state(pipe)
    with pytest.raises((AdapterFileError, ValueError, RuntimeError)) as err:
        pipe.load_dora_weights(source, **kwargs)
    assert err.match(match), str(err.value)
    assert_unchanged(before, pipe, "after a failed load: ")
    assert pipe.get_dora_adapters() == []


def test_sd15_adapter_matches_nothing(pipe) -> None:
    sd15 = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 320),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(320, 4),
    }
    fails(pipe, sd15, r"no key of this diffusers adapter matches a module of StableDiffusionXLPipeline.*"
          r"down_blocks\.0\.attentions.*SD 1\.5")  # fmt: skip


def test_partial_match_strict_and_lenient(pipe, good) -> None:
    extra = dict(good)
    extra["unet.not_a_block.to_q.lora_A.weight"] = torch.zeros(4, 8)
    extra["unet.not_a_block.to_q.lora_B.weight"] = torch.zeros(8, 4)
    fails(pipe, extra, r"2 keys of this adapter match no module .*not_a_block.*strict=False")
    name = pipe.load_dora_weights(extra, strict=False)
    assert pipe.get_dora_adapters() == [name]


def test_shape_mismatch_names_module_and_shapes(pipe, good) -> None:
    bad = dict(good)
    key = next(k for k in bad if k.endswith("attn1.to_q.lora_A.weight"))
    r, d_in = bad[key].shape
    bad[key] = torch.zeros(r, d_in + 3)
    module = key.removeprefix("unet.").removesuffix(".lora_A.weight")
    fails(pipe, bad, rf"shape mismatch at StableDiffusionXLPipeline\.unet\.{module}.*\({r}, {d_in + 3}\).*\({r}, {d_in}\)")


def test_mismatched_ranks(pipe, good) -> None:
    bad = dict(good)
    key = next(k for k in bad if k.endswith("to_k.lora_B.weight"))
    bad[key] = torch.zeros(bad[key].shape[0], bad[key].shape[1] + 1)
    fails(pipe, bad, r"ranks do not match")


def test_nan_and_int_tensors(pipe, good) -> None:
    bad = dict(good)
    key = next(k for k in bad if k.endswith("lora_magnitude_vector"))
    bad[key] = bad[key].clone()
    bad[key][0] = float("nan")
    fails(pipe, bad, rf"{key}.*NaN or inf")
    bad[key] = torch.ones_like(bad[key], dtype=torch.int64)
    fails(pipe, bad, rf"{key}.*dtype torch.int64")


def test_unknown_suffix(pipe, good) -> None:
    bad = dict(good)
    bad["unet.down_blocks.1.attentions.0.proj_in.lora_C.weight"] = torch.zeros(3)
    fails(pipe, bad, r"no known suffix.*lora_C")


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".ckpt"])
def test_pickle_files_refused(tmp_path, pipe, good, suffix: str) -> None:
    path = tmp_path / f"adapter{suffix}"
    path.write_bytes(pickle.dumps({"x": 1}))
    fails(pipe, path, r"not a safetensors file.*Pickle")


def test_pickle_renamed_to_safetensors_refused(tmp_path, pipe) -> None:
    path = tmp_path / "sneaky.safetensors"
    torch.save({"unet.x.lora_A.weight": torch.zeros(2, 2)}, path)  # a zip-based pickle
    fails(pipe, path, r"not a safetensors file.*Pickle")


def test_directory_with_only_pickles_refused(tmp_path, pipe) -> None:
    (tmp_path / "pytorch_lora_weights.bin").write_bytes(pickle.dumps({}))
    fails(pipe, tmp_path, r"Pickle")


def test_truncated_and_corrupt_files(tmp_path, pipe, good) -> None:
    path = tmp_path / "full.safetensors"
    save_file(good, path)
    data = path.read_bytes()
    for cut in (4, 100, len(data) // 2, len(data) - 1):
        trunc = tmp_path / f"cut{cut}.safetensors"
        trunc.write_bytes(data[:cut])
        fails(pipe, trunc, r"truncated")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(data[:8] + b"\xff" * 20 + data[28:])
    fails(pipe, corrupt, r"corrupt safetensors header")


def test_header_claiming_huge_shape(tmp_path, pipe) -> None:
    """A header that claims a gigantic tensor is refused before anything is allocated."""
    import json
    import struct

    header = json.dumps({"unet.x.lora_A.weight": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 16]}})
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * 16)
    fails(pipe, path, r"claims shape \[1048576, 1048576\].*does not fit")


def test_missing_path_and_duplicate_name(tmp_path, pipe, good) -> None:
    fails(pipe, tmp_path / "nope" / "x.safetensors", r"not an existing file or directory")
    fails(pipe, tmp_path, r"holds no \.safetensors")
    pipe.load_dora_weights(good, adapter_name="x")
    before = pipeline_state(pipe)
    with pytest.raises(ValueError, match="'x' is already in use"):
        pipe.load_dora_weights(good, adapter_name="x")
    assert_unchanged(before, pipe)


def test_failure_mid_injection_rolls_back(pipe, good, monkeypatch) -> None:
    """An error after some modules were wrapped leaves no wrapper and no adapter behind."""
    from dora_diffusion.core.layers import AdaptedLayer

    calls = {"n": 0}
    real = AdaptedLayer.load_adapter_tensors

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 40:
            raise RuntimeError("simulated failure")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(AdaptedLayer, "load_adapter_tensors", flaky)
    fails(pipe, good, "simulated failure")
    assert not adapted_layers(pipe.unet)


def fails_within(pipe, source, match: str, seconds: float = 5.0) -> None:
    """``fails``, run in a daemon thread: a loader that hangs (FIFO) or reads forever (/dev/zero) fails the test."""
    import threading

    outcome: list = []

    def attempt() -> None:
        try:
            fails(pipe, source, match)
            outcome.append(None)
        except BaseException as err:  # noqa: BLE001  (reported below, in the test's thread)
            outcome.append(err)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"loading {source} did not finish within {seconds} s"
    if outcome[0] is not None:
        raise outcome[0]


def test_special_files_are_refused_not_read(tmp_path, pipe) -> None:
    """A link to /dev/zero, a FIFO and a folder named *.safetensors: a one-line error, never a hang or an endless read."""
    import os

    zero = tmp_path / "zero"
    zero.mkdir()
    (zero / "a.safetensors").symlink_to("/dev/zero")
    fails_within(pipe, zero, r"holds no \.safetensors adapter file \(a\.safetensors is not a regular file\)")
    fails_within(pipe, zero / "a.safetensors", r"not a regular file")
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "a.safetensors")
    fails_within(pipe, fifo, r"a\.safetensors is not a regular file")
    fails_within(pipe, fifo / "a.safetensors", r"not a regular file")
    folder = tmp_path / "folder"
    (folder / "a.safetensors").mkdir(parents=True)
    fails_within(pipe, folder, r"a\.safetensors is not a regular file")
    with pytest.raises(AdapterFileError, match="is a directory"):
        from dora_diffusion.formats import read_safetensors

        read_safetensors(folder / "a.safetensors")


def test_huge_sparse_file_is_refused_without_reading_it(tmp_path, pipe, good) -> None:
    """A valid adapter followed by 2 GiB of (sparse) zeros is refused before its data is read."""
    import resource

    from safetensors.torch import save

    path = tmp_path / "sparse.safetensors"
    path.write_bytes(save(good))
    with open(path, "r+b") as f:
        f.truncate(2 * 1024**3)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fails(pipe, path, r"bytes after its last tensor")
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 64  # MiB


def test_missing_relative_path_says_so_without_waiting_for_the_hub(pipe, monkeypatch) -> None:
    """``nope/none`` looks like a Hub id: with the Hub unreachable the error comes at once and says what was tried."""
    import socket
    import time

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    start = time.perf_counter()
    fails(pipe, "nope/none", r"'nope/none' is not an existing file or directory here, and the Hugging Face Hub cannot "
          r"be reached .*cannot be resolved")  # fmt: skip
    fails(pipe, "nope/none.safetensors", r"'nope/none.safetensors' is not an existing file or directory \(no such file here\)")
    assert time.perf_counter() - start < 2.0


def test_adapter_name_and_strengths_are_checked(pipe, good) -> None:
    fails(pipe, good, r"adapter_name must be a string, got int 123", adapter_name=123)
    name = pipe.load_dora_weights(good)
    for weights, match in ((float("nan"), "finite numbers, got nan"), ({"unet": float("inf")}, "got inf"), ("1", "got '1'")):
        with pytest.raises(ValueError, match=match):
            pipe.set_dora_adapters(name, weights)
    with pytest.raises(ValueError, match=r"\['default_0'\] are named more than once"):
        pipe.set_dora_adapters([name, name], [1.0, 0.5])
    assert pipe.get_active_dora_adapters() == {name: 1.0}


def test_fuse_after_disable_is_refused(pipe, good, base_images) -> None:
    from helpers import max_diff, render

    pipe.load_dora_weights(good)
    pipe.disable_dora()
    with pytest.raises(RuntimeError, match=r"disabled .*enable_dora\(\) before fuse_dora\(\)"):
        pipe.fuse_dora()
    assert max_diff(render(pipe), base_images) == 0.0


def test_saved_adapter_has_the_usual_permissions(tmp_path, pipe, good) -> None:
    import os
    import stat

    pipe.load_dora_weights(good)
    umask = os.umask(0o022)
    os.umask(umask)
    path = pipe.save_dora_weights(tmp_path / "out")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in path.parent.iterdir()] == [path.name]
