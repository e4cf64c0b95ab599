"""Bad input: a clear error naming the problem, and the pipeline exactly as it was before."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_adapter_file
from dora_diffusion import AdapterFileError
from dora_diffusion.inject import adapted_layers


def snapshot(pipe) -> dict:
    """Module objects and weights of every component, to check that nothing changed."""
    out = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, comp)
        out[comp] = (
            {n: id(m) for n, m in model.named_modules()},
            {k: v.clone() for k, v in model.state_dict().items()},
        )
    return out


def assert_unchanged(pipe, before: dict) -> None:
    after = snapshot(pipe)
    for comp, (mods, sd) in before.items():
        assert after[comp][0] == mods, f"{comp}: modules changed"
        assert after[comp][1].keys() == sd.keys(), f"{comp}: state dict keys changed"
        assert all(torch.equal(after[comp][1][k], v) for k, v in sd.items()), f"{comp}: weights changed"


@pytest.fixture
def good(tmp_path):
    return load_file(make_adapter_file(tmp_path / "good"))


def fails(pipe, source, match: str, **kwargs) -> None:
    before = snapshot(pipe)
    with pytest.raises((AdapterFileError, ValueError, RuntimeError)) as err:
        pipe.load_dora_weights(source, **kwargs)
    assert err.match(match), str(err.value)
    assert_unchanged(pipe, before)
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
    before = snapshot(pipe)
    with pytest.raises(ValueError, match="'x' is already in use"):
        pipe.load_dora_weights(good, adapter_name="x")
    assert_unchanged(pipe, before)


def test_failure_mid_injection_rolls_back(pipe, good, monkeypatch) -> None:
    """An error after some modules were wrapped leaves no wrapper and no adapter behind."""
    from dora_diffusion.layers import AdaptedLayer

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
