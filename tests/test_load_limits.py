"""What a crafted adapter file can cost: memory bounded by its size, values finite in the dtype used, one name per
module, a bounded number of tensors. Every refusal leaves the pipeline as it was."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dora_diffusion import AdapterFileError
from dora_diffusion.core.inject import adapted_layers
from helpers import assert_unchanged, fresh_pipe, max_diff, pipeline_state, render

TO_Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # Linear 64 -> 64
CONV = "down_blocks.0.resnets.0.conv1"  # Conv2d 32 -> 32, 3x3: K = 288


def refused(pipe, source, match: str) -> None:
    before = pipeline_state(pipe)
    with pytest.raises(AdapterFileError, match=match):
        pipe.load_dora_weights(source)
    assert_unchanged(before, pipe)


# ---------------------------------------------------------------------------------------------- rank (27.5)


def dense_dora(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, m: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain-torch reference: ``diag(m / ||W0 + s B A||) (W0 + s B A)`` per output channel, fp64."""
    d_out, r = b.shape[0], a.shape[0]
    w = w0.double().reshape(d_out, -1) + scale * (b.double().reshape(d_out, r) @ a.double().reshape(r, -1))
    return ((m.double() / w.norm(dim=1))[:, None] * w).reshape(w0.shape)


def test_rank_above_the_layer_size_loads_exactly_at_the_layer_size(pipe) -> None:
    """Rank 300 on a 64-wide Linear and on a Conv2d with K = 288 (kohya keys, alpha 150): stored as the exact
    product at rank min(d_out, K), rendered as the dense DoRA formula computed here in plain torch."""
    g = torch.Generator().manual_seed(4)
    sd, merged = {}, {}
    for name, key in ((TO_Q, "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"),
                      (CONV, "lora_unet_input_blocks_1_0_in_layers_2")):  # fmt: skip
        w0 = pipe.unet.get_submodule(name).weight.detach()
        a = torch.randn(300, *w0.shape[1:], generator=g) * 0.02
        b = torch.randn(w0.shape[0], 300, *((1, 1) if w0.dim() == 4 else ()), generator=g) * 0.02
        m = w0.reshape(w0.shape[0], -1).norm(dim=1) * (0.8 + 0.4 * torch.rand(w0.shape[0], generator=g))
        sd.update({f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b, f"{key}.alpha": torch.tensor(150.0),
                   f"{key}.dora_scale": m.reshape(-1, *[1] * (w0.dim() - 1))})  # fmt: skip
        merged[name] = dense_dora(w0, a, b, m, 150 / 300).float()
    ref = fresh_pipe()
    with torch.no_grad():
        for name, w in merged.items():
            ref.unet.get_submodule(name).weight.copy_(w)
    pipe.load_dora_weights(sd)
    layers = adapted_layers(pipe.unet)
    assert layers[TO_Q].adapters["default_0"].spec.rank == 64
    assert layers[CONV].adapters["default_0"].spec.rank == 32
    diff = max_diff(render(pipe), render(ref))
    print(f"rank 300 vs dense reference: max |diff| = {diff:.2e}")
    assert diff <= 1e-4


PEAK_SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, "tests")
    from helpers import fresh_pipe, render
    pipe = fresh_pipe()
    render(pipe)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    name = pipe.load_dora_weights(sys.argv[1])
    render(pipe)
    pipe.delete_dora_adapters(name)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
    """
)


def test_memory_of_a_huge_rank_file_is_bounded_by_its_size(tmp_path) -> None:
    """Rank 12000 on a 64-wide Linear (a 6 MB file): loading and rendering raise the process' peak memory by at
    most 8x the file's size (before: the 12000 x 12000 Gram matrix, 576 MB, on every render)."""
    key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "huge_rank.safetensors"
    save_file({f"{key}.lora_down.weight": torch.randn(12000, 64, generator=g) * 0.01,
               f"{key}.lora_up.weight": torch.randn(64, 12000, generator=g) * 0.01,
               f"{key}.dora_scale": torch.ones(64, 1)}, path)  # fmt: skip
    size = path.stat().st_size
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path)], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parent.parent)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    peak = int(out.stdout.split()[-1])
    print(f"file {size / 2**20:.1f} MiB, peak memory rose by {peak / 2**20:.1f} MiB ({peak / size:.2f}x the file)")
    assert peak <= 8 * size


# ---------------------------------------------------------------------------------------------- values (27.7)


@pytest.mark.parametrize("value", [1e300, -1e39])
def test_fp64_values_beyond_fp32_are_refused(pipe, value) -> None:
    key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    up = torch.zeros(64, 4, dtype=torch.float64)
    up[3, 1] = value
    sd = {f"{key}.lora_down.weight": torch.zeros(4, 64, dtype=torch.float64), f"{key}.lora_up.weight": up}
    refused(pipe, sd, rf"{key}.lora_up.weight' holds fp64 values beyond fp32's range")


def test_rank_product_overflowing_fp32_is_refused(pipe) -> None:
    """Finite factors whose dense product (rank above the layer size) overflows fp32."""
    key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    sd = {f"{key}.lora_down.weight": torch.full((100, 64), 1e30), f"{key}.lora_up.weight": torch.full((64, 100), 1e30)}
    refused(pipe, sd, rf"{key}'.*overflows fp32")


# ---------------------------------------------------------------------------------------------- names (27 Low)


def test_two_spellings_of_one_clip_module_are_refused(pipe) -> None:
    """``text_encoder.X`` and ``text_encoder.text_model.X`` in one diffusers file: refused naming both, as the
    kohya path and ``convert`` refuse the same."""
    inner = "encoder.layers.0.self_attn.q_proj"
    sd = {}
    for name in (inner, "text_model." + inner):
        sd.update({f"text_encoder.{name}.lora_A.weight": torch.zeros(2, 32),
                   f"text_encoder.{name}.lora_B.weight": torch.zeros(32, 2)})  # fmt: skip
    refused(pipe, sd, rf"text_encoder.{inner} and text_encoder.text_model.{inner} both name")


# ---------------------------------------------------------------------------------------------- header (27 Low)


def raw_safetensors(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def test_tensor_count_is_capped_before_the_header_is_parsed(tmp_path, pipe) -> None:
    """150,000 zero-size tensors (an 8 MB header): refused in well under a second (1.25 M took 34 s and 2.5 GB)."""
    entry = '"lora_unet_x{}.alpha":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'
    header = ("{" + ",".join(entry.format(i) for i in range(150_000)) + "}").encode()
    path = raw_safetensors(tmp_path / "many.safetensors", header)
    start = time.perf_counter()
    refused(pipe, path, r"holds more than 100,000 tensors")
    assert time.perf_counter() - start < 1.0
    from dora_diffusion.formats.safefile import MAX_TENSORS

    assert MAX_TENSORS >= 10 * 8472  # 10x the keys of an SDXL LyCORIS adapter on every module


def test_tensor_count_counts_real_entries_not_strings(tmp_path) -> None:
    """The pre-count only refuses what the parsed count would: a header under the cap whose metadata also spells
    "data_offsets" parses."""
    from dora_diffusion.formats.safefile import _check_header

    entries = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(1000)}
    raw = json.dumps({"__metadata__": {"note": "data_offsets"}, **entries}).encode()
    assert len(_check_header(tmp_path / "f", raw, 0)) == 1001


def test_tensors_of_many_dimensions_or_empty_factors_are_refused(tmp_path, pipe) -> None:
    """Adversarial pass: a 100-dimension tensor (PyTorch's own RuntimeError before), and factors (2^40, 0) /
    (0, 2^40) whose rank passes every other check."""
    key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    entry = {"dtype": "F32", "shape": [1] * 100, "data_offsets": [0, 4]}
    path = raw_safetensors(tmp_path / "dims.safetensors", json.dumps({f"{key}.lora_down.weight": entry}).encode(), b"\0" * 4)
    refused(pipe, path, r"lora_down.weight' has 100 dimensions; adapter tensors have at most 4")
    header = {
        f"{key}.lora_down.weight": {"dtype": "F32", "shape": [2**40, 0], "data_offsets": [0, 0]},
        f"{key}.lora_up.weight": {"dtype": "F32", "shape": [0, 2**40], "data_offsets": [0, 0]},
        f"{key}.alpha": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]},
    }
    path = raw_safetensors(tmp_path / "empty.safetensors", json.dumps(header).encode(), struct.pack("<f", 1.0))
    refused(pipe, path, rf"{key}'.*\(1099511627776, 0\).*dimension of size 0")


def test_header_strings_are_capped_before_the_header_is_parsed(tmp_path, pipe) -> None:
    """Adversarial pass: 700,000 metadata entries beside one valid module (a 10 MB header; 2 M took 14 s to load
    here). Refused in under a second; long strings with escaped quotes (ss_tag_frequency) count as one string."""
    key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    tensors = {f"{key}.lora_down.weight": {"dtype": "F32", "shape": [1, 64], "data_offsets": [0, 256]},
               f"{key}.lora_up.weight": {"dtype": "F32", "shape": [64, 1], "data_offsets": [256, 512]}}  # fmt: skip
    meta = ",".join(f'"k{i}":"v"' for i in range(700_000))
    header = ('{"__metadata__":{' + meta + "}," + json.dumps(tensors)[1:]).encode()
    path = raw_safetensors(tmp_path / "meta.safetensors", header, b"\0" * 512)
    start = time.perf_counter()
    refused(pipe, path, r"header of about 1,400,0\d\d strings \(at most 600,000\)")
    assert time.perf_counter() - start < 1.0
    tags = json.dumps({f"tag{i}": i for i in range(200_000)})  # one string of 400,000 escaped quotes
    header = json.dumps({"__metadata__": {"ss_tag_frequency": tags}, **tensors}).encode()
    path = raw_safetensors(tmp_path / "tags.safetensors", header, b"\0" * 512)
    pipe.load_dora_weights(path)
    assert pipe.get_dora_adapters() == ["default_0"]
