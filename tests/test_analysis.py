"""Weight-decomposition analysis (paper section 3): closed-form cases, the tiny pipeline, CSV/PNG, the command."""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import dora_diffusion  # noqa: F401  (installs the pipeline methods)
from dora_diffusion import AdapterConfig, add_adapter
from dora_diffusion.analysis import (
    Fit,
    Row,
    adapter_sources,
    add_analyze_parser,
    analysis_plot_for,
    analyze_pipeline,
    channel_changes,
    decompose,
    fit_line,
    plot,
    summarize,
    write_csv,
)
from dora_diffusion.core.inject import adapted_layers
from dora_diffusion.pipeline import adaptable_models
from dora_diffusion.testing import build_tiny_sdxl_pipeline, save_tiny_sdxl_pipeline
from helpers import make_adapter_file

CSV_HEADER = ["adapter", "module", "component", "kind", "rank", "delta_M", "delta_D", "method"]
TAB10_BLUE, TAB10_ORANGE = (31, 119, 180), (255, 127, 14)  # the first two adapter colours


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _reference(w0: torch.Tensor, w: torch.Tensor) -> tuple[float, float]:
    """Eq. 3-4 in plain torch, float64: mean |m' - m0| and mean (1 - cosine similarity) of flattened rows."""
    a, b = w0.detach().double().flatten(1), w.detach().double().flatten(1)
    return float((b.norm(dim=1) - a.norm(dim=1)).abs().mean()), float((1 - F.cosine_similarity(b, a, dim=1)).mean())


# ---------------------------------------------------------------------------------------------- closed form


@pytest.mark.parametrize(
    "w0, w, expected",
    [
        ([[3.0, 4.0]], [[6.0, 8.0]], (5.0, 0.0)),  # doubled: |10 - 5|, same direction
        ([[1.0, 0.0]], [[0.6, 0.8]], (0.0, 0.4)),  # unit vector turned: cos = 0.6
        ([[1.0, 0.0], [0.0, 2.0]], [[0.0, 1.0], [0.0, 4.0]], (1.0, 0.5)),  # row 0 turned 90 deg, row 1 doubled
        ([[1.0, 1.0]], [[-1.0, -1.0]], (0.0, 2.0)),  # flipped: cos = -1
        ([[0.0, 0.0], [1.0, 0.0]], [[0.0, 0.0], [0.0, 3.0]], (1.0, 0.5)),  # zero row unchanged; (2, 1) for row 1
        ([[0.0, 0.0]], [[1.0, 0.0]], (1.0, 1.0)),  # a zero row that grows counts as orthogonal
    ],
)
def test_decompose_by_hand(w0, w, expected):
    delta_m, delta_d = decompose(torch.tensor(w0), torch.tensor(w))
    assert delta_m == pytest.approx(expected[0], abs=1e-7)
    assert delta_d == pytest.approx(expected[1], abs=1e-7)


@pytest.mark.parametrize("shape", [(6, 9), (5, 3, 3, 3)], ids=["linear", "conv2d"])
def test_pure_rescaling_changes_magnitude_only(shape):
    w0 = torch.randn(shape, generator=_gen(1))
    c = torch.tensor([0.5, 0.9, 1.0, 1.3, 2.0, 1.1][: shape[0]], dtype=torch.float64)
    w = w0.double() * c.view(-1, *[1] * (len(shape) - 1))
    delta_m, delta_d = decompose(w0, w)
    row_norms = w0.double().flatten(1).norm(dim=1)
    assert delta_d == pytest.approx(0.0, abs=1e-15)
    assert delta_m == pytest.approx(float(((c - 1).abs() * row_norms).mean()), rel=1e-12)


def test_rotation_in_the_plane_changes_direction_only():
    theta = math.pi / 3  # cos = 1/2
    rot = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]], dtype=torch.float64)
    w0 = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, -2.0]], dtype=torch.float64)
    delta_m, delta_d = decompose(w0, w0 @ rot.T)  # every row turned by theta
    assert delta_m == pytest.approx(0.0, abs=1e-12)
    assert delta_d == pytest.approx(0.5, abs=1e-12)


def test_layers_that_trade_magnitude_for_direction_give_a_negative_slope():
    """The paper's FT pattern, built by hand: layer k rescales its rows by 1 + 0.1 (5 - k) / 5 and turns them by
    k * 6 degrees, so the more a layer turns the less it rescales. The fit over the layers must read a negative
    slope (docs/analysis.md: a positive FT slope on the toy world is not made by the method)."""
    g = torch.Generator().manual_seed(0)
    points = []
    for k in range(6):
        w0 = torch.randn(8, 2, generator=g, dtype=torch.float64)
        theta = math.radians(6 * k)
        rot = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]], dtype=torch.float64)
        w = (1 + 0.1 * (5 - k) / 5) * (w0 @ rot.T)
        delta_m, delta_d = decompose(w0, w)
        assert delta_d == pytest.approx(1 - math.cos(theta), abs=1e-12)
        points.append((delta_d, delta_m))
    fit = fit_line([d for d, _ in points], [m for _, m in points])
    assert fit.slope < 0 and fit.r < -0.8


@pytest.mark.parametrize("shape", [(6, 9), (5, 3, 3, 3)], ids=["linear", "conv2d"])
def test_orthogonal_map_on_the_input_side_keeps_magnitudes(shape):
    w0 = torch.randn(shape, generator=_gen(2), dtype=torch.float64)
    k = w0[0].numel()
    q, _ = torch.linalg.qr(torch.randn(k, k, generator=_gen(3), dtype=torch.float64))
    w = (w0.flatten(1) @ q).view(shape)  # row norms kept, directions moved
    delta_m, delta_d = decompose(w0, w)
    assert delta_m == pytest.approx(0.0, abs=1e-6)
    assert delta_d == pytest.approx(_reference(w0, w)[1], rel=1e-10)
    assert delta_d > 0.1


def test_tiny_angles_keep_their_precision():
    """1 - cos of a 1e-6 rad turn is 5e-13: computed from unit-vector differences, not by cancellation."""
    eps = 1e-6
    _, delta_d = decompose(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, eps]]))
    root = math.sqrt(1 + eps * eps)
    assert delta_d == pytest.approx(eps * eps / (root * (1 + root)), rel=1e-6)


def test_channel_changes_and_shape_check():
    dm, dd = channel_changes(torch.tensor([[3.0, 4.0], [1.0, 0.0]]), torch.tensor([[6.0, 8.0], [0.0, 1.0]]))
    assert dm.tolist() == pytest.approx([5.0, 0.0]) and dd.tolist() == pytest.approx([0.0, 1.0])
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        decompose(torch.zeros(2, 3), torch.zeros(3, 2))


def test_fit_line_closed_form():
    assert fit_line([0, 1, 2, 3], [1, 3, 5, 7]) == Fit(4, 2.0, 1.0, 1.0)
    f = fit_line([0, 1, 2, 4], [0, -1, -2, -4])
    assert (f.slope, f.r) == pytest.approx((-1.0, -1.0))
    f = fit_line([1, 2, 3], [1, 3, 2])  # r = 0.5 by hand: sxy = 1, sxx = 2, syy = 2
    assert (f.slope, f.intercept, f.r) == pytest.approx((0.5, 1.0, 0.5))
    assert all(math.isnan(v) for v in (fit_line([1.0], [2.0]).slope, fit_line([2, 2], [1, 3]).r))
    flat = fit_line([1, 2, 3], [5, 5, 5])
    assert flat.slope == 0 and math.isnan(flat.r)


# ---------------------------------------------------------------------------------------------- pipelines


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "dora": make_adapter_file(root / "dora", seed=1),
        "lora": make_adapter_file(root / "lora", seed=2, use_dora=False),
    }


@pytest.fixture(scope="module")
def two_adapters(files):
    pipe = build_tiny_sdxl_pipeline(seed=0)
    pipe.load_dora_weights(files["dora"], adapter_name="dora")
    pipe.load_dora_weights(files["lora"], adapter_name="lora")
    return pipe


@pytest.fixture(scope="module")
def rows(two_adapters) -> list[Row]:
    return analyze_pipeline(two_adapters)


def _layers_with(pipe, name):
    models = adaptable_models(pipe).items()
    return {(c, n): layer for c, m in models for n, layer in adapted_layers(m).items() if name in layer.adapters}


def test_one_row_per_adapted_module_per_adapter(two_adapters, rows):
    assert [r.adapter for r in rows] == ["dora"] * (len(rows) // 2) + ["lora"] * (len(rows) // 2)
    for name in ("dora", "lora"):
        layers = _layers_with(two_adapters, name)
        mine = [r for r in rows if r.adapter == name]
        assert [(r.component, r.module) for r in mine] == list(layers)
        for r in mine:
            layer = layers[(r.component, r.module)]
            assert r.kind == type(layer.base_layer).__name__
            assert r.rank == (4 if r.component == "unet" else 2)
            assert r.method == ("DoRA" if name == "dora" else "LoRA")
    assert {r.kind for r in rows} == {"Linear", "Conv2d"}
    assert {r.component for r in rows} == {"unet", "text_encoder", "text_encoder_2"}


def test_dora_magnitude_change_is_the_trained_magnitude(two_adapters, rows):
    """DoRA's W' has row norms m exactly, so delta_M = mean |m - ||w0_i|||, read straight off the parameters."""
    layers = _layers_with(two_adapters, "dora")
    for r in (r for r in rows if r.adapter == "dora"):
        layer = layers[(r.component, r.module)]
        m0 = layer.weight.double().flatten(1).norm(dim=1)
        expected = float((layer.adapters["dora"].magnitude.detach().double() - m0).abs().mean())
        assert r.delta_M == pytest.approx(expected, rel=1e-5), r.module


def test_lora_matches_a_plain_torch_reference(two_adapters):
    layers = _layers_with(two_adapters, "lora")
    for r in analyze_pipeline(two_adapters, ["lora"]):  # one adapter by name
        layer = layers[(r.component, r.module)]
        spec = layer.adapters["lora"].spec
        a, b = layer.adapters["lora"].A.double(), layer.adapters["lora"].B.double()
        w0 = layer.weight.double()
        w = w0 + spec.scale * (b.flatten(1) @ a.flatten(1)).view_as(w0)
        ref_m, ref_d = _reference(w0, w)
        assert (r.delta_M, r.delta_D) == pytest.approx((ref_m, ref_d), rel=1e-6), r.module


def test_magnitude_only_dora_has_no_direction_change():
    pipe = build_tiny_sdxl_pipeline(seed=0)
    add_adapter(pipe.unet, AdapterConfig(rank=4, use_dora=True, targets="all"), "mag")  # B = 0
    expected = {}
    with torch.no_grad():
        for name, layer in adapted_layers(pipe.unet).items():
            m = layer.adapters["mag"].magnitude
            c = 0.5 + torch.rand(m.shape, generator=_gen(len(name)))
            m.mul_(c)
            expected[name] = float(((c.double() - 1).abs() * layer.weight.double().flatten(1).norm(dim=1)).mean())
    rows = analyze_pipeline(pipe)
    assert len(rows) == len(expected)
    assert max(r.delta_D for r in rows) < 1e-12
    for r in rows:
        assert r.delta_M == pytest.approx(expected[r.module], rel=1e-5)


def test_analysis_ignores_strengths_and_disable_but_refuses_fused(two_adapters, rows):
    pipe = two_adapters
    before = rows
    pipe.set_dora_adapters(["dora", "lora"], [0.3, -1.0])
    pipe.disable_dora()
    try:
        assert analyze_pipeline(pipe) == before
    finally:
        pipe.enable_dora()
        pipe.set_dora_adapters(["dora", "lora"])
    pipe.fuse_dora()
    try:
        with pytest.raises(RuntimeError, match="unfuse_dora"):
            analyze_pipeline(pipe)
    finally:
        pipe.unfuse_dora()
    with pytest.raises(ValueError, match=r"\['nope'\] are not loaded; loaded adapters: \['dora', 'lora'\]"):
        analyze_pipeline(pipe, ["nope"])
    with pytest.raises(ValueError, match="no adapters are loaded"):
        analyze_pipeline(build_tiny_sdxl_pipeline(seed=0))


def test_summaries(rows):
    summaries = summarize(rows)
    assert list(summaries) == ["dora", "lora"]
    for name, s in summaries.items():
        mine = [r for r in rows if r.adapter == name]
        assert s.n == len(mine) and s.method == ("DoRA" if name == "dora" else "LoRA")
        assert math.isfinite(s.fit.slope) and -1 <= s.fit.r <= 1
        assert s.fit == fit_line([r.delta_D for r in mine], [r.delta_M for r in mine])
        assert sum(f.n for f in s.components.values()) == s.n
        assert all(math.isfinite(f.r) for f in s.components.values())
    assert set(summaries["dora"].components) == {"unet", "text_encoder", "text_encoder_2"}


def test_csv_and_png(rows, tmp_path):
    path = write_csv(rows, tmp_path / "sub" / "a.csv")
    with open(path, newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == CSV_HEADER
    assert len(table) == len(rows) + 1
    first = table[1]
    assert first[:5] == [rows[0].adapter, rows[0].module, rows[0].component, rows[0].kind, str(rows[0].rank)]
    assert (float(first[5]), float(first[6])) == (rows[0].delta_M, rows[0].delta_D)

    png = plot(rows, tmp_path / "a.png", title="tiny")
    image = Image.open(png)
    assert image.format == "PNG" and image.size == (800, 550)
    pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    for color in (TAB10_BLUE, TAB10_ORANGE):  # both adapters were drawn in their own colour
        assert (np.abs(pixels - np.array(color)).max(axis=-1) < 8).sum() > 200


def test_plot_for_the_app(two_adapters, tmp_path):
    path, markdown = analysis_plot_for(two_adapters, directory=tmp_path)
    assert path.parent == tmp_path and Image.open(path).size == (800, 550)
    lines = markdown.splitlines()
    assert lines[0] == "| adapter | method | modules | slope | r | r unet | r text_encoder | r text_encoder_2 |"
    assert lines[2].startswith("| dora | DoRA | 397 |") and lines[3].startswith("| lora | LoRA | 397 |")


# ---------------------------------------------------------------------------------------------- the command


def _touch_adapter(directory: Path, name: str = "pytorch_lora_weights.safetensors") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_bytes(b"")
    return directory / name


def test_sources_labels_and_step_order(tmp_path):
    run = tmp_path / "run"
    for step in (10, 2):
        _touch_adapter(run / f"checkpoint-{step}")
        _touch_adapter(run / f"checkpoint-{step}", "adapter_state.safetensors")  # the trainer's resume state
    _touch_adapter(run)
    single = _touch_adapter(tmp_path / "styles", "my.style.safetensors")
    a = _touch_adapter(tmp_path / "a")
    got = adapter_sources([single, run, a])
    assert got == [
        ("my_style", single),  # usable as an adapter name
        ("checkpoint-2", (run / "checkpoint-2" / "pytorch_lora_weights.safetensors").resolve()),
        ("checkpoint-10", (run / "checkpoint-10" / "pytorch_lora_weights.safetensors").resolve()),
        ("run", (run / "pytorch_lora_weights.safetensors").resolve()),
        ("a", a.resolve()),  # the default file name is labelled by its directory
    ]
    # checkpoint dirs passed one by one (a shell glob sorts 10 before 2) are ordered by step, beside each other
    got = adapter_sources([run / "checkpoint-10", single, run / "checkpoint-2"])
    assert [label for label, _ in got] == ["checkpoint-2", "checkpoint-10", "my_style"]
    # the same label twice: the parent directory goes in front
    x, y = _touch_adapter(tmp_path / "x", "style.safetensors"), _touch_adapter(tmp_path / "y", "style.safetensors")
    assert [label for label, _ in adapter_sources([x, y, x])] == ["x/style", "y/style", "x/style#2"]
    with pytest.raises(dora_diffusion.AdapterFileError, match="nothere does not exist"):
        adapter_sources([tmp_path / "nothere"])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("base") / "tiny-sdxl")


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="dora-diffusion")
    add_analyze_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["analyze", *argv])
    return args.func(args)


def _training_run(root: Path, files: dict[str, Path]) -> Path:
    """The folder layout train_dreambooth_dora.py writes: checkpoint-N/ with the loadable file beside the resume
    state, and the final weights on top (here the same tensors as the last checkpoint, so shown once)."""
    run = root / "dora-run"
    for step, key in ((2, "lora"), (10, "dora")):
        ckpt = run / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        shutil.copy(files[key], ckpt / "pytorch_lora_weights.safetensors")
        save_file({"x": torch.zeros(1)}, ckpt / "adapter_state.safetensors")
        (ckpt / "training_state.json").write_text(json.dumps({"global_step": step}))
    shutil.copy(files["dora"], run / "pytorch_lora_weights.safetensors")
    return run


def test_analyze_command_end_to_end(base_dir, files, tmp_path, capsys):
    run = _training_run(tmp_path, files)
    out = tmp_path / "report"
    assert _run("--base", str(base_dir), str(files["lora"]), str(run), "--out", str(out)) == 0
    stdout = capsys.readouterr().out
    lines = stdout.splitlines()
    assert lines[0].split()[:5] == ["adapter", "method", "modules", "slope", "r"]
    assert [line.split()[:3] for line in lines[1:4]] == [
        ["lora", "LoRA", "397"],
        ["checkpoint-2", "LoRA", "397"],
        ["checkpoint-10", "DoRA", "397"],
    ]
    assert lines[4] == f"wrote {out / 'analysis.csv'} (1191 rows)" and lines[5] == f"wrote {out / 'analysis.png'}"
    with open(out / "analysis.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3 * 397
    assert [table[i]["adapter"] for i in (0, 397, 794)] == ["lora", "checkpoint-2", "checkpoint-10"]
    values = [(r["delta_M"], r["delta_D"]) for r in table]
    assert values[397:794] == values[:397]  # the same file twice gives the same numbers
    assert Image.open(out / "analysis.png").size == (800, 550)


def test_analyze_command_fits_one_kind_of_module(base_dir, files, tmp_path, capsys):
    """``--modules to_q``: the paper's Figure 2 fits the query matrices alone; the summary, CSV and plot hold only
    them, with the same numbers as the unfiltered run's query rows."""
    everything, queries = tmp_path / "all", tmp_path / "q"
    assert _run("--base", str(base_dir), str(files["dora"]), "--out", str(everything)) == 0
    assert _run("--base", str(base_dir), str(files["dora"]), "--out", str(queries), "--modules", "to_q,.attn2.to_v") == 0
    read = lambda d: list(csv.DictReader(open(d / "analysis.csv", newline="")))  # noqa: E731
    full, kept = read(everything), read(queries)
    expected = [r for r in full if r["module"].endswith((".to_q", ".attn2.to_v"))]
    assert kept == expected and 0 < len(kept) < len(full)
    assert {r["module"].rsplit(".", 1)[1] for r in kept} == {"to_q", "to_v"}
    summary = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in summary if line.startswith("dora ")][-1] == ["dora", "DoRA", str(len(kept))]
    assert _run("--base", str(base_dir), str(files["dora"]), "--modules", "to_qq", "--out", str(tmp_path / "n")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("dora-diffusion analyze: error: --modules to_qq: no module an adapter changes has a name ending with to_qq")
    assert not (tmp_path / "n").exists()


def test_analyze_command_errors(base_dir, files, tmp_path, capsys):
    assert _run("--base", str(tmp_path / "missing"), str(files["dora"])) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--base" in err and "missing" in err

    assert _run("--base", str(base_dir), str(tmp_path / "nothere.safetensors")) == 2
    assert "nothere.safetensors does not exist" in capsys.readouterr().err

    module = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # Linear 64 -> 64 in the tiny UNet
    bad = tmp_path / "sd15.safetensors"
    save_file({f"unet.{module}.lora_A.weight": torch.zeros(4, 320), f"unet.{module}.lora_B.weight": torch.zeros(64, 4)},
              bad)  # fmt: skip
    assert _run("--base", str(base_dir), str(files["dora"]), str(bad), "--out", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err.strip().splitlines()  # above it: the progress bars of loading the base
    assert [line for line in err if "error" in line] == err[-1:]
    assert err[-1].startswith(f"dora-diffusion analyze: error: adapter {bad} does not fit")
    assert "shape mismatch" in err[-1]
    assert not (tmp_path / "o").exists()


def test_row_fields_are_the_csv_columns():
    assert [f for f in Row.__dataclass_fields__] == CSV_HEADER
