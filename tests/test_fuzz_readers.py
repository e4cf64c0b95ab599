"""Fuzzing the file readers: every broken file gives an AdapterFileError naming the problem.

No other exception, no hang, no allocation sized by what a header claims.
"""

from __future__ import annotations

import json
import random
import resource
import struct

import pytest
import torch
from safetensors.torch import save

from dora_diffusion import AdapterFileError
from dora_diffusion.formats import parse_state_dict, read_safetensors
from dora_diffusion.testing import build_tiny_sdxl_pipeline

Q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"  # Linear 64 -> 64 in the tiny UNet
CONV = "lora_unet_output_blocks_2_0_in_layers_2"  # Conv2d 128 -> 64, 3x3


def kohya_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        f"{Q}.lora_down.weight": torch.randn(4, 64, generator=g),
        f"{Q}.lora_up.weight": torch.randn(64, 4, generator=g),
        f"{Q}.alpha": torch.tensor(4.0),
        f"{Q}.dora_scale": torch.rand(64, 1, generator=g) + 0.5,
        f"{CONV}.lora_down.weight": torch.randn(2, 128, 3, 3, generator=g).half(),
        f"{CONV}.lora_up.weight": torch.randn(64, 2, 1, 1, generator=g).half(),
        f"{CONV}.dora_scale": torch.rand(64, 1, 1, 1, generator=g) + 0.5,
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(2, 32, generator=g),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(128, 2, generator=g),
    }


def diffusers_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    name = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    return {
        f"{name}.lora_A.weight": torch.randn(4, 64, generator=g),
        f"{name}.lora_B.weight": torch.randn(64, 4, generator=g),
        f"{name}.lora_magnitude_vector": torch.rand(64, generator=g),
    }


def read_and_parse(path) -> None:
    state_dict, metadata = read_safetensors(path)
    parse_state_dict(state_dict, metadata)


def with_header(header: dict, body: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


@pytest.mark.parametrize("make", [kohya_state_dict, diffusers_state_dict])
def test_truncated_files(tmp_path, make) -> None:
    data = save(make())
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data)
    read_and_parse(path)  # the whole file is fine
    (n,) = struct.unpack("<Q", data[:8])
    cuts = sorted(set(range(0, 8 + n + 16)) | set(range(8 + n, len(data), 97)) | {len(data) - 1})
    for cut in cuts:
        path.write_bytes(data[:cut])
        with pytest.raises(AdapterFileError, match="truncated|corrupt|not a safetensors|could not be read"):
            read_and_parse(path)


@pytest.mark.parametrize("make", [kohya_state_dict, diffusers_state_dict])
def test_random_byte_mutations(tmp_path, make) -> None:
    """Flip, insert and delete bytes: each file either reads as a valid adapter or raises AdapterFileError."""
    data = save(make())
    (n,) = struct.unpack("<Q", data[:8])
    rng = random.Random(0)
    path = tmp_path / "mutant.safetensors"
    outcomes = {"ok": 0, "error": 0}
    for _ in range(400):
        buf = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(0, 8 + n + 32) if rng.random() < 0.8 else rng.randrange(len(buf))
            op = rng.random()
            if op < 0.6:
                buf[i % len(buf)] = rng.randrange(256)
            elif op < 0.8:
                buf.insert(i, rng.randrange(256))
            else:
                del buf[i % len(buf)]
        path.write_bytes(bytes(buf))
        try:
            read_and_parse(path)
            outcomes["ok"] += 1
        except AdapterFileError:
            outcomes["error"] += 1
    print(outcomes)
    assert outcomes["error"] > 100 and sum(outcomes.values()) == 400


def test_header_claiming_huge_shapes_allocates_nothing(tmp_path) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    path = tmp_path / "huge.safetensors"
    cases = [
        ({f"{Q}.lora_down.weight": {"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 16]}}, b"\0" * 16),
        ({f"{Q}.lora_down.weight": {"dtype": "F32", "shape": [1 << 62, 4], "data_offsets": [0, 1 << 62]}}, b"\0" * 16),
        ({f"{Q}.lora_down.weight": {"dtype": "F32", "shape": [-4, -4], "data_offsets": [0, 64]}}, b"\0" * 64),
        ({f"{Q}.lora_down.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [64, 0]}}, b"\0" * 64),
    ]
    for header, body in cases:
        path.write_bytes(with_header(header, body))
        with pytest.raises(AdapterFileError, match="does not fit the file|malformed"):
            read_and_parse(path)
    for claimed in (1 << 62, 50 * 1024 * 1024, 2**64 - 1):  # header length larger than the file
        path.write_bytes(struct.pack("<Q", claimed) + b"{}")
        with pytest.raises(AdapterFileError, match="truncated"):
            read_and_parse(path)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 64


@pytest.mark.parametrize(
    "tensor, match",
    [
        (torch.zeros(4, 64, dtype=torch.int64), "has dtype torch.int64"),
        (torch.zeros(4, 64, dtype=torch.bool), "has dtype torch.bool"),
        (torch.full((4, 64), float("nan")), "NaN or inf"),
        (torch.zeros(4, 64, dtype=torch.float8_e4m3fn), "has dtype torch.float8_e4m3fn"),
    ],
)
def test_wrong_dtypes(tmp_path, tensor, match) -> None:
    sd = kohya_state_dict()
    sd[f"{Q}.lora_down.weight"] = tensor
    path = tmp_path / "dtype.safetensors"
    path.write_bytes(save(sd))
    with pytest.raises(AdapterFileError, match=match):
        read_and_parse(path)


def test_unknown_dtype_in_header(tmp_path) -> None:
    path = tmp_path / "c64.safetensors"
    path.write_bytes(with_header({f"{Q}.alpha": {"dtype": "C64", "shape": [], "data_offsets": [0, 8]}}, b"\0" * 8))
    with pytest.raises(AdapterFileError, match="unsupported dtype C64"):
        read_and_parse(path)


@pytest.mark.parametrize(
    "edit, match",
    [
        ({f"{Q}.lora_q.weight": torch.zeros(4, 4)}, r"lora_q\.weight.*not supported"),
        ({"lora_unet_.lora_down.weight": torch.zeros(4, 4)}, "not a kohya/LyCORIS key"),
        ({f"{Q}": torch.zeros(4, 4)}, "not a kohya/LyCORIS key"),
        ({f"{Q}.lora_up.weight": torch.zeros(64, 3)}, "ranks do not match"),
        ({f"{Q}.lora_up.weight": torch.zeros(64, 4, 3)}, "not a Linear"),
        ({f"{Q}.lora_down.weight": torch.zeros(0, 64), f"{Q}.lora_up.weight": torch.zeros(64, 0)}, "rank 0"),
        ({f"{Q}.dora_scale": torch.ones(1, 1, 64)}, r"dora_scale has shape \(1, 1, 64\)"),
        ({f"{Q}.dora_scale": torch.ones(32)}, "magnitude has shape"),
        ({f"{Q}.magnitude": torch.ones(64)}, "both .dora_scale and .magnitude"),
        ({f"{Q}.alpha": torch.ones(2)}, r"alpha has shape \(2,\)"),
        ({f"{CONV}.lora_up.weight": torch.zeros(64, 2, 3, 3)}, "ranks do not match"),
    ],
)
def test_inconsistent_kohya_modules(edit, match) -> None:
    sd = kohya_state_dict()
    sd.update(edit)
    with pytest.raises(AdapterFileError, match=match):
        parse_state_dict(sd)


def test_missing_half_of_a_module() -> None:
    sd = kohya_state_dict()
    del sd[f"{Q}.lora_up.weight"]
    with pytest.raises(AdapterFileError, match=f"{Q}' has no up/B weight"):
        parse_state_dict(sd)


def random_kohya_module(rng: random.Random) -> tuple[dict[str, torch.Tensor], bool]:
    """A module of random, often inconsistent shapes; returns it and whether it should parse."""
    conv = rng.random() < 0.3
    n_in, n_out, r = rng.choice([3, 8]), rng.choice([5, 8]), rng.choice([0, 1, 2])
    k = (3, 3) if conv else ()
    down, up = (r, n_in, *k), (n_out, r, *((1, 1) if conv else ()))
    ok = r > 0
    if rng.random() < 0.2:
        up = (n_out, r + 1, *up[2:])
        ok = False
    ones = (1,) * len(k)
    sd = {"lora_down.weight": torch.zeros(down), "lora_up.weight": torch.zeros(up)}
    choice = rng.random()
    if choice < 0.3:
        valid = [(n_out, 1, *ones), (1, n_in, *ones), (n_out,)]
        shape = rng.choice(valid + [(n_in, 1, *ones), (1, n_out, *ones), (n_in,)])
        sd["dora_scale"] = torch.ones(shape)
        ok = ok and shape in valid
    elif choice < 0.4:
        sd["magnitude"] = torch.ones(rng.choice([n_out, n_in]))
        ok = ok and sd["magnitude"].numel() == n_out
    if rng.random() < 0.5:
        sd["alpha"] = torch.tensor(float(rng.choice([0, 1, 4]))) if rng.random() < 0.9 else torch.ones(2)
        ok = ok and sd["alpha"].numel() == 1
    return sd, ok


def test_random_module_shapes_parse_or_fail_cleanly() -> None:
    rng = random.Random(0)
    seen = {True: 0, False: 0}
    for _ in range(600):
        params, ok = random_kohya_module(rng)
        sd = {f"{Q}.{p}": t for p, t in params.items()}
        try:
            module = parse_state_dict(sd).modules["unet"]["input_blocks_4_1_transformer_blocks_0_attn1_to_q"]
        except AdapterFileError:
            assert not ok, params
            seen[False] += 1
            continue
        assert ok, {p: tuple(t.shape) for p, t in params.items()}
        seen[True] += 1
        assert module.b.shape[1] == module.a.shape[0] == module.rank > 0
        if module.magnitude is not None:
            channels = module.b.shape[0] if module.norm_axis == "out" else module.a.shape[1]
            assert module.magnitude.shape == (channels,)
    assert seen[True] > 50 and seen[False] > 50


def test_modules_that_do_not_fit_the_model_leave_the_pipeline_alone() -> None:
    pipe = build_tiny_sdxl_pipeline()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    wrong_in = {f"{Q}.lora_down.weight": torch.zeros(4, 48), f"{Q}.lora_up.weight": torch.zeros(64, 4)}
    conv_on_linear = {f"{Q}.lora_down.weight": torch.zeros(2, 64, 3, 3), f"{Q}.lora_up.weight": torch.zeros(64, 2, 1, 1)}
    second_bad = {  # the first module fits; the second (Conv2d 128 -> 64) gets 64 input channels
        f"{Q}.lora_down.weight": torch.zeros(4, 64), f"{Q}.lora_up.weight": torch.zeros(64, 4),
        f"{Q}.dora_scale": torch.ones(1, 64),
        f"{CONV}.lora_down.weight": torch.zeros(2, 64, 3, 3), f"{CONV}.lora_up.weight": torch.zeros(64, 2, 1, 1),
    }  # fmt: skip
    elsewhere = {"lora_unet_input_blocks_99_1_proj_in.lora_down.weight": torch.zeros(2, 64),
                 "lora_unet_input_blocks_99_1_proj_in.lora_up.weight": torch.zeros(64, 2)}  # fmt: skip
    cases = [
        (wrong_in, "shape mismatch"),
        (conv_on_linear, "shape mismatch"),
        (second_bad, r"shape mismatch at \w+\.unet\.up_blocks\.0\.resnets\.2\.conv1"),
        (elsewhere, "no key of this kohya adapter"),
    ]
    for sd, match in cases:
        with pytest.raises(AdapterFileError, match=match):
            pipe.load_dora_weights(sd)
        assert pipe.get_dora_adapters() == []
    after = pipe.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
