"""Fuzzing the file readers: every broken file gives an AdapterFileError naming the problem.

No other exception, no hang, no allocation sized by what a header claims.
"""

from __future__ import annotations

import json
import random
import resource
import struct
import time

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


# ---------------------------------------------------------------- header metadata (diffusers/PEFT LoraConfig)
DEEP = "[" * 200_000 + "]" * 200_000
META = "lora_adapter_metadata"


def with_lora_config(tmp_path, config: dict | str, name: str = "meta.safetensors"):
    """A valid diffusers adapter file whose ``lora_adapter_metadata`` header is ``config``."""
    path = tmp_path / name
    raw = config if isinstance(config, str) else json.dumps(config)
    path.write_bytes(save(diffusers_state_dict(), metadata={META: raw}))
    return path


@pytest.mark.parametrize(
    "config, match",
    [
        ({"unet.lora_alpha": float("nan")}, r"unet\.lora_alpha is nan"),
        ({"unet.lora_alpha": float("inf")}, r"unet\.lora_alpha is inf"),
        ({"unet.lora_alpha": 1e300}, r"unet\.lora_alpha is 1e\+300; expected a finite number"),
        ({"unet.lora_alpha": 10**400}, r"unet\.lora_alpha is 1000.*expected a finite number"),
        ({"unet.lora_alpha": True}, r"unet\.lora_alpha is True; expected a number"),
        ({"unet.lora_alpha": "abc"}, r"unet\.lora_alpha is 'abc'; expected a number"),
        ({"unet.lora_alpha": [8]}, r"unet\.lora_alpha is \[8\]; expected a number"),
        ({"lora_alpha": "8"}, r"'lora_adapter_metadata' lora_alpha is '8'"),
        ({"unet.use_rslora": "false"}, r"unet\.use_rslora is 'false'; expected true or false"),
        ({"unet.use_dora": 1}, r"unet\.use_dora is 1"),
        ({"unet.r": -4}, r"unet\.r is -4; expected a positive integer"),
        ({"unet.alpha_pattern": ["to_q"]}, r"unet\.alpha_pattern is a list; expected an object"),
        ({"unet.alpha_pattern": {"to_q": "x"}}, r"unet\.alpha_pattern\['to_q'\] is 'x'"),
        ({"unet.rank_pattern": "to_q"}, r"unet\.rank_pattern is a str"),
        ({"unet.alpha_pattern": {"(.*.*.*)*#": 4}}, r"key '\(\.\*\.\*\.\*\)\*#' is not a module name"),
        ({"unet.alpha_pattern": {"(a|aa)*b": 4}}, r"key '\(a\|aa\)\*b' is not a module name"),
        ({"unet.alpha_pattern": {"to_.*": 4}}, r"key 'to_\.\*' is not a module name"),
        (DEEP, r"'lora_adapter_metadata' is nested too deeply"),
        ('{"unet.lora_alpha": 1' + "0" * 5000 + "}", r"'lora_adapter_metadata' is not valid JSON"),
        ("[8]", r"'lora_adapter_metadata' is not a JSON object"),
    ],
    ids=["nan", "inf", "1e300", "huge-int", "bool", "string", "list", "unprefixed-string", "rslora-string",
         "use_dora-int", "negative-r", "pattern-list", "pattern-value", "rank_pattern-str", "redos-nested",
         "redos-alternation", "regex-key", "deep", "long-int", "not-object"],  # fmt: skip
)
def test_malformed_lora_config_is_refused_naming_the_key(tmp_path, config, match) -> None:
    """Each bad header value: AdapterFileError naming the key, well within a second (the ReDoS keys hung before)."""
    path = with_lora_config(tmp_path, config)
    start = time.perf_counter()
    with pytest.raises(AdapterFileError, match=match):
        read_and_parse(path)
    assert time.perf_counter() - start < 1.0


def test_deeply_nested_safetensors_header_is_refused(tmp_path) -> None:
    path = tmp_path / "deep.safetensors"
    raw = b'{"__metadata__": {}, "x": ' + DEEP.encode() + b"}"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(AdapterFileError, match="nested too deeply"):
        read_and_parse(path)


def test_valid_lora_config_values_are_used(tmp_path) -> None:
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    config = {"unet.r": 4, "unet.lora_alpha": 8, "unet.use_rslora": True, "unet.use_dora": True,
              "unet.alpha_pattern": {f"^{name}": 2.5}, "unet.rank_pattern": {}}  # fmt: skip
    module = parse_state_dict(*read_safetensors(with_lora_config(tmp_path, config))).modules["unet"][name]
    assert (module.alpha, module.use_rslora) == (2.5, True)
    config["unet.alpha_pattern"] = {"attn2.to_q": 2.5}
    module = parse_state_dict(*read_safetensors(with_lora_config(tmp_path, config))).modules["unet"][name]
    assert (module.alpha, module.use_rslora) == (8.0, True)


def random_lora_config(rng: random.Random) -> dict:
    """A LoraConfig header with one to three fields of random type, shape and nesting."""
    values = [None, True, False, 0, -1, 4, 8.5, 1e300, float("nan"), "8", "false", "", [], [8], {}, {"to_q": 4},
              {"to_q": "4"}, {"(a+)+$": 2}, {"^x.y": 1}, [[[[1]]]], {"to_q": {"to_k": 1}}]  # fmt: skip
    fields = ["r", "lora_alpha", "use_rslora", "use_dora", "alpha_pattern", "rank_pattern", "target_modules"]
    prefix = rng.choice(["unet.", "text_encoder.", "", "vae."])
    return {prefix + rng.choice(fields): rng.choice(values) for _ in range(rng.randint(1, 3))}


def test_load_dora_weights_fuzzed_headers_fail_cleanly(tmp_path) -> None:
    """200 random headers through load_dora_weights: it loads, or raises AdapterFileError; in bounded time and
    memory; a failed load leaves the pipeline's weights and modules exactly as they were."""
    pipe = build_tiny_sdxl_pipeline()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    modules = {n: id(m) for n, m in pipe.unet.named_modules()}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rng = random.Random(0)
    outcomes = {"ok": 0, "error": 0}
    for i in range(200):
        path = with_lora_config(tmp_path, random_lora_config(rng), f"{i}.safetensors")
        start = time.perf_counter()
        try:
            pipe.load_dora_weights(path, adapter_name="fuzz")
            outcomes["ok"] += 1
            pipe.unload_dora_weights()
        except AdapterFileError:
            outcomes["error"] += 1
            assert pipe.get_dora_adapters() == []
            assert {n: id(m) for n, m in pipe.unet.named_modules()} == modules
        assert time.perf_counter() - start < 2.0
    after = pipe.unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024 < 200
    assert outcomes["ok"] > 20 and outcomes["error"] > 50, outcomes


@pytest.mark.parametrize("key", ["unet.x." + "a" * 100_000 + ".lora_C.weight", "lora_unet_" + "b" * 100_000 + ".lora_q.weight",
                                 "x\x1b[2J" * 20_000])  # fmt: skip
def test_errors_quote_file_keys_short_and_escaped(tmp_path, key) -> None:
    """A 100k-character or terminal-escaping key is quoted escaped and cut, not copied into the message."""
    path = tmp_path / "long.safetensors"
    path.write_bytes(save({key: torch.zeros(2)}))
    with pytest.raises(AdapterFileError) as err:
        read_and_parse(path)
    assert len(str(err.value)) < 1000 and "\x1b" not in str(err.value)
