"""The `dora-diffusion` command: convert (lossless both ways, refusals, overwrite) and inspect."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dora_diffusion.cli import main
from helpers import make_adapter_file


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def without_text_model(state_dict: dict) -> dict:
    """Text-encoder keys with the `text_model.` wrapper removed (the CLI writes the transformers-4 layout)."""
    return {k.replace(".text_model.", ".", 1) if k.startswith("text_encoder") else k: v for k, v in state_dict.items()}


@pytest.mark.parametrize("use_dora", [True, False])
def test_convert_diffusers_kohya_diffusers_is_bit_exact(tmp_path, capsys, use_dora) -> None:
    src = make_adapter_file(tmp_path / "src", use_dora=use_dora)
    kohya, back = tmp_path / "k.safetensors", tmp_path / "back.safetensors"
    assert run(capsys, "convert", src, kohya, "--to", "kohya")[0] == 0
    assert run(capsys, "convert", kohya, back, "--to", "diffusers")[0] == 0
    a, b = without_text_model(load_file(src)), without_text_model(load_file(back))
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)

    # the CLI's kohya file is the one save_dora_weights(format="kohya") writes
    from dora_diffusion.testing import build_tiny_sdxl_pipeline

    pipe = build_tiny_sdxl_pipeline()
    pipe.load_dora_weights(src)
    saved = load_file(pipe.save_dora_weights(tmp_path / "saved", format="kohya"))
    converted = load_file(kohya)
    assert saved.keys() == converted.keys() and all(torch.equal(saved[k], converted[k]) for k in saved)
    assert all(k.startswith(("lora_unet_", "lora_te1_text_model_", "lora_te2_text_model_")) for k in converted)


def lycoris_style_file(path, legacy: bool) -> dict:
    """Two UNet modules in diffusers-flattened `lycoris_` names and one text-encoder module, DoRA."""
    g = torch.Generator().manual_seed(0)
    mods = {
        "lycoris_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": ((4, 64), (64, 4)),
        "lycoris_up_blocks_0_resnets_2_conv1": ((2, 128, 3, 3), (64, 2, 1, 1)),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1": ((4, 48), (192, 4)),
    }
    sd = {}
    for name, (a, b) in mods.items():
        n_in, n_out, ones = a[1], b[0], (1,) * (len(a) - 2)
        sd[f"{name}.lora_down.weight"] = torch.randn(a, generator=g).half()
        sd[f"{name}.lora_up.weight"] = torch.randn(b, generator=g).half()
        sd[f"{name}.alpha"] = torch.tensor(3.0)
        sd[f"{name}.dora_scale"] = torch.rand((1, n_in, *ones) if legacy else (n_out, 1, *ones), generator=g)
    save_file(sd, path)
    return sd


def test_convert_kohya_names_to_sgm_and_back_to_diffusers(tmp_path, capsys) -> None:
    src = tmp_path / "lyco.safetensors"
    original = lycoris_style_file(src, legacy=False)
    code, out, err = run(capsys, "convert", src, tmp_path / "k.safetensors", "--to", "kohya")
    assert code == 0 and err == ""
    k = load_file(tmp_path / "k.safetensors")
    pairs = {
        "lycoris_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q":
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "lycoris_up_blocks_0_resnets_2_conv1": "lora_unet_output_blocks_2_0_in_layers_2",
        "lora_te2_text_model_encoder_layers_0_mlp_fc1": "lora_te2_text_model_encoder_layers_0_mlp_fc1",
    }  # fmt: skip
    assert {key.partition(".")[0] for key in k} == set(pairs.values())
    for old, new in pairs.items():
        for param in ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale"):
            assert torch.equal(k[f"{new}.{param}"], original[f"{old}.{param}"])
            assert k[f"{new}.{param}"].dtype == original[f"{old}.{param}"].dtype  # fp16 factors stay fp16

    assert run(capsys, "convert", tmp_path / "k.safetensors", tmp_path / "d.safetensors", "--to", "diffusers")[0] == 0
    d = load_file(tmp_path / "d.safetensors")
    name = "unet.up_blocks.0.resnets.2.conv1"
    assert torch.equal(d[f"{name}.lora_A.weight"], original["lycoris_up_blocks_0_resnets_2_conv1.lora_down.weight"])
    magnitude = original["lycoris_up_blocks_0_resnets_2_conv1.dora_scale"].reshape(1, -1, 1, 1)
    assert torch.equal(d[f"{name}.lora_magnitude_vector"], magnitude)  # PEFT's conv layout (1, out, 1, 1)
    assert "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_B.weight" in d


def test_legacy_per_input_refuses_diffusers_but_converts_to_kohya(tmp_path, capsys) -> None:
    src = tmp_path / "legacy.safetensors"
    original = lycoris_style_file(src, legacy=True)
    out = tmp_path / "d.safetensors"
    code, _, err = run(capsys, "convert", src, out, "--to", "diffusers")
    assert code == 1 and not out.exists()
    assert err.count("\n") == 1 and "per-input" in err and "--to kohya" in err and "Traceback" not in err

    assert run(capsys, "convert", src, tmp_path / "k.safetensors", "--to", "kohya")[0] == 0
    k = load_file(tmp_path / "k.safetensors")
    assert k["lora_unet_output_blocks_2_0_in_layers_2.dora_scale"].shape == (1, 128, 1, 1)
    assert torch.equal(k["lora_unet_output_blocks_2_0_in_layers_2.dora_scale"],
                       original["lycoris_up_blocks_0_resnets_2_conv1.dora_scale"])  # fmt: skip


def test_convert_never_overwrites_unless_asked(tmp_path, capsys) -> None:
    src = make_adapter_file(tmp_path / "src", targets="attn", text=False)
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    code, _, err = run(capsys, "convert", src, out, "--to", "kohya")
    assert code == 1 and out.read_bytes() == b"precious" and "--overwrite" in err and err.count("\n") == 1
    assert run(capsys, "convert", src, out, "--to", "kohya", "--overwrite")[0] == 0
    assert all(k.startswith("lora_unet_") for k in load_file(out))


def test_errors_are_one_line_without_traceback(tmp_path, capsys) -> None:
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(make_adapter_file(tmp_path / "src", targets="attn", text=False).read_bytes()[:500])
    sd15 = tmp_path / "sd15.safetensors"
    save_file({"lora_unet_down_blocks_3_resnets_0_conv1.lora_down.weight": torch.zeros(2, 8, 3, 3),
               "lora_unet_down_blocks_3_resnets_0_conv1.lora_up.weight": torch.zeros(8, 2, 1, 1)}, sd15)  # fmt: skip
    cases = [
        (("inspect", tmp_path / "missing.safetensors"), "does not exist"),
        (("inspect", broken), "truncated"),
        (("convert", broken, tmp_path / "x.safetensors", "--to", "kohya"), "truncated"),
        (("convert", sd15, tmp_path / "x.safetensors", "--to", "diffusers"), "not modules of SDXL base"),
    ]
    for argv, message in cases:
        code, out, err = run(capsys, *argv)
        assert code == 1 and out == "" and err.count("\n") == 1 and message in err and "Traceback" not in err, err
        assert not (tmp_path / "x.safetensors").exists()
    code, _, err = run(capsys, "convert", broken)  # usage error from argparse
    assert code == 2 and "required" in err


def rows(text: str) -> dict[str, str]:
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def test_inspect_kohya_dora_file(tmp_path, capsys) -> None:
    src = make_adapter_file(tmp_path / "src")  # UNet "all" rank 4 alpha 6, text encoders rank 2
    kohya = tmp_path / "k.safetensors"
    run(capsys, "convert", src, kohya, "--to", "kohya")
    code, out, _ = run(capsys, "inspect", kohya)
    info = rows(out)
    assert code == 0
    assert info["dialect"] == "kohya/LyCORIS (lora_unet_, lora_te1_, lora_te2_, UNet names: SGM)"
    assert info["adapter"] == "DoRA, per-output norm"
    assert info["rank"] == "4 (367 modules), 2 (30 modules)"
    assert info["alpha"] == "6 (367 modules), 2 (30 modules)"
    assert info["modules"] == "unet 367 (Linear 319, Conv2d 48); text_encoder 12 (Linear 12, Conv2d 0); " \
                              "text_encoder_2 18 (Linear 18, Conv2d 0)"  # fmt: skip
    n_params = sum(t.numel() for k, t in load_file(kohya).items() if not k.endswith(".alpha"))
    assert info["parameters"] == f"{n_params:,}"
    assert info["base model"].startswith("unknown: UNet cross-attention width 80")
    assert "ss_base_model_version=sdxl_base_v1-0" in info["metadata"]

    code, out, _ = run(capsys, "inspect", src)
    assert rows(out)["dialect"] == "diffusers" and rows(out)["parameters"] == f"{n_params:,}"


def test_inspect_legacy_mixed_and_sdxl_sized(tmp_path, capsys) -> None:
    src = tmp_path / "legacy.safetensors"
    lycoris_style_file(src, legacy=True)
    info = rows(run(capsys, "inspect", src)[1])
    assert info["dialect"] == "kohya/LyCORIS (lora_te2_, lycoris_, UNet names: diffusers-flattened)"
    assert info["adapter"] == "DoRA, per-input norm (legacy LyCORIS < 3.2 / OneTrainer)"
    assert info["modules"] == "unet 2 (Linear 1, Conv2d 1); text_encoder_2 1 (Linear 1, Conv2d 0)"
    assert info["alpha"] == "3 (3 modules)" and info["rank"] == "4 (2 modules), 2 (1 module)"

    sdxl = tmp_path / "sdxl.safetensors"
    key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    plain = "lora_unet_input_blocks_4_1_proj_in"
    save_file({f"{key}.lora_down.weight": torch.zeros(8, 2048), f"{key}.lora_up.weight": torch.zeros(640, 8),
               f"{key}.dora_scale": torch.ones(640, 1),
               f"{plain}.lora_down.weight": torch.zeros(8, 640),
               f"{plain}.lora_up.weight": torch.zeros(640, 8)}, sdxl)  # fmt: skip
    info = rows(run(capsys, "inspect", sdxl)[1])
    assert info["base model"] == "SDXL (UNet cross-attention width 2048)"
    assert info["adapter"] == "mixed: DoRA, per-output norm (1 module), LoRA (1 module)"
    assert info["alpha"] == "8 (2 modules)"  # no alpha key: alpha = rank


def paper_deltas(base_dir, adapter_path, scale: float) -> dict[str, tuple[float, float]]:
    """Paper Eq. 3-4 computed here in plain fp64 torch from the file's tensors and the saved base UNet:
    ``{module: (mean_i |m_i - ||W0_i|||, mean_i (1 - cos(W'_i, W0_i)))}`` with ``W' = diag(m / ||W0 + sBA||)(W0 + sBA)``."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base_dir / "unet")
    sd = load_file(adapter_path)
    out = {}
    for key in sd:
        if not key.endswith(".lora_A.weight"):
            continue
        name = key.removeprefix("unet.").removesuffix(".lora_A.weight")
        w0 = unet.get_submodule(name).weight.detach().double().reshape(-1, sd[key][0].numel())
        a = sd[key].double().reshape(sd[key].shape[0], -1)
        b = sd[f"unet.{name}.lora_B.weight"].double().reshape(w0.shape[0], -1)
        m = sd[f"unet.{name}.lora_magnitude_vector"].double().reshape(-1)
        w = w0 + scale * b @ a
        w1 = (m / w.norm(dim=1))[:, None] * w
        cos = (w1 * w0).sum(dim=1) / (w1.norm(dim=1) * w0.norm(dim=1))
        out[name] = (float((w1.norm(dim=1) - w0.norm(dim=1)).abs().mean()), float((1 - cos).mean()))
    return out


def test_cli_analyze_end_to_end(tmp_path) -> None:
    """`dora-diffusion analyze` through main(): a CSV with one row per module and a PNG that opens."""
    import csv

    from PIL import Image

    from helpers import make_adapter_file
    from dora_diffusion.cli import main
    from dora_diffusion.testing import save_tiny_sdxl_pipeline

    base = save_tiny_sdxl_pipeline(tmp_path / "base")
    adapter = make_adapter_file(tmp_path / "dora", seed=4, targets="attn", text=False)
    assert main(["analyze", "--base", str(base), str(adapter), "--out", str(tmp_path / "out")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "out" / "analysis.csv")))
    want = paper_deltas(base, adapter, scale=6 / 4)  # make_adapter_file: UNet rank 4, alpha 6
    assert {r["module"] for r in rows} == set(want) and len(rows) == len(want) > 0
    for r in rows:
        dm, dd = want[r["module"]]
        assert float(r["delta_M"]) == pytest.approx(dm, rel=1e-5, abs=1e-9)
        assert float(r["delta_D"]) == pytest.approx(dd, rel=1e-4, abs=1e-9)
    assert max(dd for _, dd in want.values()) > 1e-4  # the adapter did turn the weights
    with Image.open(tmp_path / "out" / "analysis.png") as im:
        assert im.size[0] > 100 and im.size[1] > 100
    assert main(["analyze", "--base", str(tmp_path / "missing"), str(adapter)]) == 2


def test_malformed_header_is_one_line_for_inspect_and_convert(tmp_path, capsys) -> None:
    """A NaN lora_alpha, a ReDoS alpha_pattern key, a 200k-deep header: exit 1, one line naming the key, no output."""
    import json

    from safetensors import safe_open

    src = make_adapter_file(tmp_path / "src", targets="attn", text=False)
    with safe_open(src, "pt") as f:
        metadata = f.metadata()
    sd = load_file(src)
    headers = {
        "nan": ({"unet.lora_alpha": float("nan")}, "unet.lora_alpha is nan"),
        "redos": ({"unet.alpha_pattern": {"(.*.*.*)*#": 4}}, "alpha_pattern key '(.*.*.*)*#' is not a module name"),
        "deep": ("[" * 200_000 + "]" * 200_000, "nested too deeply"),
    }
    for name, (config, message) in headers.items():
        path = tmp_path / f"{name}.safetensors"
        raw = config if isinstance(config, str) else json.dumps(config)
        save_file(sd, path, metadata={**metadata, "lora_adapter_metadata": raw})
        for argv in (("inspect", path), ("convert", path, tmp_path / "x.safetensors", "--to", "kohya")):
            code, out, err = run(capsys, *argv)
            assert code == 1 and out == "" and err.count("\n") == 1 and message in err, err
            assert not (tmp_path / "x.safetensors").exists()


def test_convert_refuses_an_output_name_inspect_would_refuse(tmp_path, capsys) -> None:
    src = make_adapter_file(tmp_path / "src", targets="attn", text=False)
    code, _, err = run(capsys, "convert", src, tmp_path / "out.bin", "--to", "kohya")
    assert code == 1 and "must end in .safetensors" in err and not (tmp_path / "out.bin").exists()


def test_analyze_refuses_an_unusable_out_before_any_work(tmp_path, capsys, monkeypatch) -> None:
    from dora_diffusion.analysis import command

    def no_work(*args, **kwargs):
        raise AssertionError("the base model was loaded")

    monkeypatch.setattr(command, "load_base", no_work)
    adapter = make_adapter_file(tmp_path / "a", targets="attn", text=False)
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        code, _, err = run(capsys, "analyze", "--base", tmp_path / "base", adapter, "--out", out)
        assert code == 2 and err.count("\n") == 1 and f"--out {out}" in err and "is a file" in err, err


def test_inspect_escapes_control_characters_of_header_strings(tmp_path, capsys) -> None:
    """Header strings are the file's: a terminal escape sequence is printed escaped, a long value shortened."""
    src = make_adapter_file(tmp_path / "src", targets="attn", text=False)
    path = tmp_path / "esc.safetensors"
    save_file(load_file(src), path, metadata={"ss_output_name": "x\x1b]0;pwned\x07" + "y" * 500, "ss_network_module": "a\nb"})
    code, out, _ = run(capsys, "inspect", path)
    assert code == 0 and "\x1b" not in out and "\x07" not in out
    assert "ss_output_name=x\\x1b]0;pwned\\x07yyy" in out and "ss_network_module=a\\nb" in out
    assert max(len(line) for line in out.splitlines()) < 400


def test_cli_escapes_file_names_and_header_strings_and_defuses_csv_formulas(tmp_path, capsys) -> None:
    """A file named with a terminal escape, a method in its header with another, a label that is a spreadsheet
    formula: printed escaped by inspect and analyze (errors too), written as text into analysis.csv."""
    import csv
    import json

    from dora_diffusion.testing import save_tiny_sdxl_pipeline

    src = make_adapter_file(tmp_path / "src", targets="attn", text=False)
    name = '=HYPERLINK("x")\x1b]0;pwned\x07\nwrote fake'
    path = tmp_path / f"{name}.safetensors"
    save_file(load_file(src), path, metadata={"dora_diffusion": json.dumps({"method": "+DoRA\x1b[2J"})})
    code, out, _ = run(capsys, "inspect", path)
    assert code == 0 and "\x1b" not in out and "\x07" not in out and "\\x1b]0;pwned\\x07" in out
    (tmp_path / f"{name}.bin").write_bytes(b"x")
    code, _, err = run(capsys, "inspect", tmp_path / f"{name}.bin")
    assert code == 1 and "\x1b" not in err and "\\x1b]0;pwned" in err and err.count("\n") == 1

    base = save_tiny_sdxl_pipeline(tmp_path / "base")
    code, out, err = run(capsys, "analyze", "--base", base, path, "--out", tmp_path / "out")
    assert code == 0 and "\x1b" not in out and "\x07" not in out and "+DoRA\\x1b[2J" in out
    assert "pwned\x07" not in err  # stderr has the base loader's progress bars, but not the file's escapes
    rows = list(csv.DictReader(open(tmp_path / "out" / "analysis.csv", encoding="utf-8")))
    assert "\nwrote fake" not in out  # a line break in a file name cannot forge a line of output
    escaped = '=HYPERLINK("x")\\x1b]0;pwned\\x07\\nwrote fake'
    assert rows and all(r["adapter"] == "'" + escaped and r["method"] == "'+DoRA\\x1b[2J" for r in rows)


def test_help_and_usage_errors_import_no_torch():
    """The entry point (``dora_diffusion_cli:main``) parses before importing the package: --help, a subcommand's
    --help, --version and a usage error answer without torch (was: 4.7 s importing torch and diffusers first)."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom dora_diffusion_cli import main\n"
        "codes = [main(a) for a in (['--help'], ['convert', '--help'], ['--version'], ['convert', 'a', 'b', '--to', 'pt'])]\n"
        "print(codes, 'torch' in sys.modules, 'dora_diffusion' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[1])
    assert result.stdout.splitlines()[-1] == "[0, 0, 0, 2] False False", result.stderr[-2000:]
    from dora_diffusion._version import __version__

    assert f"dora-diffusion {__version__}" in result.stdout
    assert "argument --to: invalid choice: 'pt' (choose from" in result.stderr


def test_entry_point_declarations_match_the_package():
    import dora_diffusion_cli
    from dora_diffusion.analysis.scan import BASE_DTYPES
    from dora_diffusion.formats import WRITE_FORMATS

    assert dora_diffusion_cli.CONVERT_FORMATS == WRITE_FORMATS
    assert dora_diffusion_cli.ANALYZE_DTYPES == tuple(sorted(BASE_DTYPES))
    from dora_diffusion.formats import COMPONENTS
    from dora_diffusion.tools.output import OUTPUT_FORMATS
    from dora_diffusion.tools.svd import DYNAMIC_METHODS

    assert dora_diffusion_cli.TOOL_FORMATS == OUTPUT_FORMATS and dora_diffusion_cli.DYNAMIC_METHODS == DYNAMIC_METHODS
    assert dora_diffusion_cli.COMPONENTS == COMPONENTS
    import tomllib

    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"dora-diffusion": "dora_diffusion_cli:main"}
