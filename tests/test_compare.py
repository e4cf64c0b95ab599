"""dora_diffusion.compare: seeds, grid plans, captions, infotext, the grid PNG, and rendering on the tiny pipeline."""

from __future__ import annotations

import json
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from dora_diffusion import AdapterFileError
from dora_diffusion.compare import (
    MAX_SEED,
    SCHEDULERS,
    Cell,
    Column,
    CompareError,
    Comparer,
    GenerationSettings,
    ColumnScore,
    abs_difference,
    caption,
    column_table,
    default_pair,
    difference_grid,
    check_adapter_args,
    check_adapter_name,
    compose_grid,
    default_adapter_name,
    difference_maps,
    difference_pairs,
    pair_header,
    grid_infotext,
    infotext,
    load_base_pipeline,
    mean_differences,
    parse_adapter_arg,
    parse_infotext,
    parse_seeds,
    plan_grid,
    read_parameters,
    reproduce_snippet,
    restore_form,
    save_png,
    scheduler_from_a1111,
)
from dora_diffusion.compare import grid_image
from dora_diffusion.compare.differences import shared_gain
from dora_diffusion.compare.grid_image import shrink_factor
from dora_diffusion.compare.infotext import _fields
from dora_diffusion.compare.plan import MAX_PROMPT_LENGTH
from dora_diffusion.testing import TINY_RESOLUTION, save_tiny_sdxl_pipeline
from helpers import crafted_png, make_adapter_file, peak_rss_growth_mb, png_chunk, text_chunk

TINY = GenerationSettings("a photo of TOK toy", num_inference_steps=2, width=TINY_RESOLUTION, height=TINY_RESOLUTION)


# ------------------------------------------------------------------------------------------------ seeds


@pytest.mark.parametrize(
    "text, seeds",
    [
        ("0, 7, 42", [0, 7, 42]),
        ("0-3", [0, 1, 2, 3]),
        ("0-3, 10", [0, 1, 2, 3, 10]),
        ("5", [5]),
        ("3-3", [3]),
        ("  1 2\t3 ", [1, 2, 3]),
        ("0 - 2,9", [0, 1, 2, 9]),
        ("42,7,0", [42, 7, 0]),  # order kept: rows appear as listed
        (str(MAX_SEED), [MAX_SEED]),
    ],
)
def test_parse_seeds(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "at least one seed"),
        (" , ", "at least one seed"),
        ("a", "'a' is not a seed"),
        ("-1", "'-1' is not a seed"),
        ("1.5", "'1.5' is not a seed"),
        ("²", "'²' is not a seed"),
        ("0-3-5", "'0-3-5' is not a seed"),
        ("3-1", "counts down; write '1-3'"),
        ("1, 1", "seed 1 is listed twice"),
        ("0-3, 2", "seed 2 is listed twice"),
        (str(MAX_SEED + 1), "larger than 18446744073709551615"),
    ],
)
def test_parse_seeds_rejects(text, message):
    with pytest.raises(CompareError, match=message):
        parse_seeds(text)


def test_parse_seeds_counts_a_huge_range_without_expanding_it():
    with pytest.raises(CompareError, match="1000000000001 seeds are more than the limit of 64"):
        parse_seeds("0-1000000000000", max_count=64)
    assert parse_seeds("0-63", max_count=64) == list(range(64))


# ------------------------------------------------------------------------------------------------ names


@pytest.mark.parametrize("name", ["dora", "my-lora_v2", "Ä1", "x" * 64])
def test_check_adapter_name_accepts(name):
    assert check_adapter_name(name) == name


@pytest.mark.parametrize(
    "name, taken, message",
    [
        ("", (), "must be 1 to 64"),
        ("a.b", (), "must be 1 to 64"),
        ("a b", (), "must be 1 to 64"),
        ("a,b", (), "must be 1 to 64"),
        ("dora\n", (), "must be 1 to 64"),
        ("x" * 65, (), "must be 1 to 64"),
        ("base", (), "reserved for the base-model column"),
        ("dora", ("dora",), "already loaded"),
    ],
)
def test_check_adapter_name_rejects(name, taken, message):
    with pytest.raises(CompareError, match=message):
        check_adapter_name(name, taken)


@pytest.mark.parametrize(
    "source, taken, name",
    [
        ("runs/my_dora/", (), "my_dora"),
        ("runs/my_dora/pytorch_lora_weights.safetensors", (), "my_dora"),
        ("pytorch_lora_weights.safetensors", (), "pytorch_lora_weights"),
        ("/tmp/gradio/abc/style v1.2.safetensors", (), "style_v1_2"),
        ("user/sdxl-dora", ("sdxl-dora",), "sdxl-dora_2"),
        ("user/sdxl-dora", ("sdxl-dora", "sdxl-dora_2"), "sdxl-dora_3"),
        ("out/base", (), "adapter"),
    ],
)
def test_default_adapter_name(source, taken, name):
    assert default_adapter_name(source, taken) == name


def test_parse_adapter_arg(tmp_path):
    assert parse_adapter_arg("dora=runs/a") == ("dora", "runs/a")
    assert parse_adapter_arg("dora=runs/x=y") == ("dora", "runs/x=y")
    assert parse_adapter_arg("runs/a") == (None, "runs/a")
    odd = tmp_path / "run=3"
    odd.mkdir()
    assert parse_adapter_arg(str(odd)) == (None, str(odd))  # an existing path holding '=' is a path
    with pytest.raises(CompareError, match="no path after '='"):
        parse_adapter_arg("dora=")
    with pytest.raises(CompareError, match="must be 1 to 64"):
        parse_adapter_arg("my.dora=runs/a")


# ------------------------------------------------------------------------------------------------ settings and plans


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_inference_steps": 0}, "steps must be from 1 to 150"),
        ({"num_inference_steps": 151}, "steps must be from 1 to 150"),
        ({"num_inference_steps": 2.5}, "steps must be a whole number"),
        ({"num_inference_steps": None}, "steps must be a number, got None"),
        ({"width": "64"}, "width must be a number, got '64'"),
        ({"guidance_scale": float("nan")}, "guidance scale must be a number, got nan"),
        ({"guidance_scale": -0.5}, "guidance scale must be from 0 to 30"),
        ({"width": 100}, "width must be a multiple of 8"),
        ({"height": 56}, "height must be a multiple of 8 from 64"),
        ({"height": 2056}, "height must be a multiple of 8 from 64 to 2048"),
        ({"scheduler": "LMS"}, "unknown scheduler 'LMS'"),
    ],
)
def test_settings_rejects(change, message):
    kwargs = {"prompt": "p", **change}
    with pytest.raises(CompareError, match=message):
        GenerationSettings(**kwargs)


def test_settings_take_slider_floats():
    s = GenerationSettings("p", num_inference_steps=2.0, width=64.0, height=128.0, guidance_scale=5)
    assert (s.num_inference_steps, s.width, s.height, s.guidance_scale) == (2, 64, 128, 5.0)
    assert all(type(v) is int for v in (s.num_inference_steps, s.width, s.height))


def test_plan_grid_columns_follow_load_order_and_cells_are_row_major():
    plan = plan_grid(TINY, [7, 0], {"lora": 0.5, "dora": 1.0}, True, ["dora", "x", "lora"])
    assert [c.label for c in plan.columns] == ["base", "dora", "lora"]
    assert [c.strength for c in plan.columns] == [0.0, 1.0, 0.5]
    assert len(plan) == 6
    assert [(c.row, c.col, c.seed, c.column.label) for c in plan.cells] == [
        (0, 0, 7, "base"), (0, 1, 7, "dora"), (0, 2, 7, "lora"),
        (1, 0, 0, "base"), (1, 1, 0, "dora"), (1, 2, 0, "lora"),
    ]  # fmt: skip


def test_plan_grid_without_base():
    plan = plan_grid(TINY, [1], {"dora": 0.0}, False, ["dora"])
    assert plan.columns == (Column("dora", 0.0),)


@pytest.mark.parametrize(
    "seeds, adapters, include_base, message",
    [
        ([0], {"nope": 1.0}, True, r"adapters \['nope'\] are not loaded; loaded adapters: \['dora', 'lora'\]"),
        ([0], {"dora": 2.5}, True, "strength of 'dora' must be a number from 0 to 2"),
        ([0], {"dora": -0.1}, True, "strength of 'dora' must be a number from 0 to 2"),
        ([0], {"dora": "1, x"}, True, "'x' in the strengths of 'dora' is not a number"),
        ([0], {"dora": [0.5, 0.5]}, True, "strength of 'dora' is listed twice"),
        ([0], {"dora": "0.5 0.5"}, True, "strength 0.5 of 'dora' is listed twice"),
        ([0], {"dora": [1.0, 2.5]}, True, "strength of 'dora' must be a number from 0 to 2"),
        ([0], {"dora": True}, True, "strength of 'dora' must be a number"),
        ([0], {"dora": []}, True, "give 'dora' at least one strength"),
        ([0], {}, False, "tick at least one adapter or the base model"),
        ([], {"dora": 1.0}, True, "at least one seed"),
        (
            list(range(22)),
            {"dora": 1.0, "lora": 1.0},
            True,
            "22 seeds x 3 columns = 66 images, more than the limit of 64",
        ),
    ],
)
def test_plan_grid_rejects(seeds, adapters, include_base, message):
    with pytest.raises(CompareError, match=message):
        plan_grid(TINY, seeds, adapters, include_base, ["dora", "lora"])


def test_plan_grid_allows_exactly_the_limit():
    assert len(plan_grid(TINY, list(range(32)), {"dora": 1.0}, True, ["dora"], max_cells=64)) == 64
    with pytest.raises(CompareError, match="more than the limit of 63"):
        plan_grid(TINY, list(range(32)), {"dora": 1.0}, True, ["dora"], max_cells=63)


# ------------------------------------------------------------------------------------------------ text


def test_captions():
    assert caption(Cell(0, 1, 42, Column("dora", 1.0))) == "dora · 1.00 · seed 42"
    assert caption(Cell(0, 2, 42, Column("lora", 0.25))) == "lora · 0.25 · seed 42"
    assert caption(Cell(3, 0, 7, Column(None))) == "base · — · seed 7"


def test_infotext_is_a1111_parameters_plus_adapter():
    s = GenerationSettings("a photo of TOK toy", "blurry", 25, 7.5, 1024, 768, "DPM++ 2M Karras")
    text = infotext(s, Cell(0, 1, 42, Column("dora", 0.8)), "stabilityai/stable-diffusion-xl-base-1.0", "runs/dora")
    assert text == (
        "a photo of TOK toy\n"
        "Negative prompt: blurry\n"
        "Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 1024x768, "
        "Model: stabilityai/stable-diffusion-xl-base-1.0, Adapter: dora, Adapter strength: 0.8, "
        "Adapter source: runs/dora, Version: dora-diffusion 0.1.0"
    )
    base = infotext(TINY, Cell(0, 0, 3, Column(None)), "tiny")
    assert base == (
        "a photo of TOK toy\n"
        "Steps: 2, Sampler: Default, CFG scale: 5, Seed: 3, Size: 64x64, Model: tiny, Version: dora-diffusion 0.1.0"
    )


def test_infotext_round_trip_with_quoting():
    s = GenerationSettings("line one, with comma\nline two: colon", "bad, ugly", 30, 5.0, 64, 128, "Euler a")
    cell = Cell(0, 1, 123456789012, Column("my-lora", 1.25))
    text = infotext(s, cell, 'C:\\models\\sdxl, "v1"', "D:\\x, y.safetensors")
    assert 'Model: "C:\\\\models\\\\sdxl, \\"v1\\""' in text  # A1111 quotes values holding , : or "
    p = parse_infotext(text)
    assert p["Prompt"] == s.prompt
    assert p["Negative prompt"] == "bad, ugly"
    assert p["Model"] == 'C:\\models\\sdxl, "v1"'
    assert p["Adapter source"] == "D:\\x, y.safetensors"
    restored = restore_form(text)
    assert restored.settings == s
    assert (restored.seeds, restored.strengths, restored.whole_grid) == ((123456789012,), {"my-lora": [1.25]}, False)


def test_restore_form_of_a_base_cell_and_errors():
    r = restore_form(infotext(TINY, Cell(0, 0, 9, Column(None)), "tiny"))
    assert (r.settings, r.seeds, r.include_base, r.strengths, r.model) == (TINY, (9,), True, {}, "tiny")
    with pytest.raises(CompareError, match="have no CFG scale, Seed"):
        restore_form("a prompt\nSteps: 20, Sampler: Euler, Size: 64x64")
    with pytest.raises(CompareError, match="unreadable generation parameters"):
        restore_form("a prompt\nSteps: many, Sampler: Euler, CFG scale: 5, Seed: 1, Size: 64x64")


def test_grid_infotext_lists_seeds_and_columns():
    plan = plan_grid(TINY, [0, 7], {"dora": 1.0, "lora": 0.5}, True, ["dora", "lora"])
    p = parse_infotext(grid_infotext(plan, "tiny"))
    assert p["Seeds"] == "0, 7"
    assert p["Columns"] == "base, dora 1, lora 0.5"
    assert (p["Steps"], p["Size"], p["Prompt"]) == ("2", "64x64", "a photo of TOK toy")


def test_reproduce_snippet_text():
    s = GenerationSettings("a cat", "", 20, 6.0, 1024, 1024, "DPM++ 2M Karras")
    code = reproduce_snippet(
        s, Cell(0, 1, 7, Column("dora", 0.75)), "stabilityai/sdxl", "runs/dora", "cuda", torch.float16
    )
    compile(code, "snippet", "exec")
    assert "from diffusers import StableDiffusionXLPipeline, DPMSolverMultistepScheduler\n" in code
    assert "from_pretrained('stabilityai/sdxl', " in code and "=torch.float16).to('cuda')" in code
    scheduler = "DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type='dpmsolver++', "
    assert scheduler + "use_karras_sigmas=True)" in code
    assert "pipe.load_dora_weights('runs/dora', adapter_name='dora')\n" in code
    assert "pipe.set_dora_adapters('dora', adapter_weights=0.75)\n" in code
    assert "generator=torch.Generator('cuda').manual_seed(7)," in code
    assert "negative_prompt" not in code  # an empty negative prompt is passed as None, so it is left out
    base = reproduce_snippet(TINY, Cell(0, 0, 3, Column(None)), "tiny")
    assert "load_dora_weights" not in base and "scheduler" not in base
    assert "image.save('base_seed3.png')" in base


# ------------------------------------------------------------------------------------------------ images


def _solid(colour, size=(16, 12)):
    return Image.new("RGB", size, colour)


@pytest.mark.parametrize("zoom", [1, 3])
def test_compose_grid_places_cells_under_their_legends(zoom):
    colours = [[(255, 0, 0), (0, 255, 0), (0, 0, 255)], [(255, 255, 0), (0, 255, 255), (255, 0, 255)]]
    images = [[_solid(c) for c in row] for row in colours]
    cols = [["base model"], ["dora", "strength 1.00"], ["lora", "strength 0.50"]]
    grid = np.asarray(compose_grid(images, ["seed 0", "seed 7"], cols, title="a photo of TOK toy", zoom=zoom))
    boxes = {}
    for r, row in enumerate(colours):
        for c, colour in enumerate(row):
            ys, xs = np.nonzero(np.all(grid == colour, axis=-1))
            boxes[r, c] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert (xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()) == (16 * zoom, 12 * zoom)
            assert len(xs) == 16 * 12 * zoom * zoom  # the whole block, copied exactly, once
    assert boxes[0, 0][0] < boxes[0, 1][0] < boxes[0, 2][0]
    assert boxes[0, 1][0] == boxes[1, 1][0] and boxes[0, 0][1] < boxes[1, 0][1]
    dark = np.all(grid < 100, axis=-1)
    top = boxes[0, 0][1]
    for c in range(3):  # a legend above every column, between the title and the first row
        x0, _, x1, _ = boxes[0, c]
        assert dark[top // 2 : top, x0:x1].any()
    for r in range(2):  # a legend left of every row
        _, y0, _, y1 = boxes[r, 0]
        assert dark[y0:y1, : boxes[0, 0][0]].any()
    assert dark[: top // 3].any()  # the title


def test_compose_grid_widens_a_column_for_a_long_legend():
    images = [[_solid((255, 0, 0), (8, 8)), _solid((0, 0, 255), (8, 8))]]
    grid = np.asarray(compose_grid(images, ["seed 0"], [["a"], ["a-very-long-adapter-name"]]))
    red = np.nonzero(np.all(grid == (255, 0, 0), axis=-1))[1]
    blue = np.nonzero(np.all(grid == (0, 0, 255), axis=-1))[1]
    top = np.nonzero(np.all(grid == (0, 0, 255), axis=-1))[0].min()
    legend = np.nonzero(np.any(np.all(grid[:top] < 100, axis=-1), axis=0))[0]
    legend = legend[legend > red.max() + 8]  # the long legend, right of the first column
    assert legend.max() - legend.min() > 100  # not clipped to the 8 px image
    assert abs((legend.min() + legend.max()) / 2 - (blue.min() + blue.max()) / 2) <= 2  # image centred under it
    assert legend.max() < grid.shape[1] - 1


def test_compose_grid_rejects_mismatches():
    with pytest.raises(ValueError, match="need 1 row labels and 2 column labels"):
        compose_grid([[_solid(0), _solid(0)]], ["seed 0"], [["a"]])
    with pytest.raises(ValueError, match=r"image \[0\]\[1\] is 8x8, the first is 16x12"):
        compose_grid([[_solid(0), _solid(0, (8, 8))]], ["seed 0"], [["a"], ["b"]])


def test_png_parameters_round_trip_and_bad_files(tmp_path):
    path = save_png(_solid((1, 2, 3)), tmp_path / "cell.png", "a prompt\nSteps: 2, Sampler: Euler, CFG scale: 5")
    assert read_parameters(path) == "a prompt\nSteps: 2, Sampler: Euler, CFG scale: 5"
    assert np.asarray(Image.open(path)).tolist() == np.asarray(_solid((1, 2, 3))).tolist()
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(CompareError, match="notes.png is not a PNG image"):
        read_parameters(tmp_path / "notes.png")
    _solid(0).save(tmp_path / "plain.png")
    with pytest.raises(CompareError, match="plain.png carries no generation parameters"):
        read_parameters(tmp_path / "plain.png")


# ------------------------------------------------------------------------------------------------ untrusted PNG text
# (issue 27: a PNG's text is typed by whoever made the file; every read of it is linear and capped)

CELL_TEXT = infotext(TINY, Cell(0, 1, 42, Column("dora", 0.5)), "tiny", "runs/dora")
LONG = 20_000  # the quadratic expression took 2 to 13 s on this many characters here, the linear reader milliseconds


@pytest.mark.parametrize(
    "line",
    [
        "a" * LONG,  # one run of key characters with no ':' (the expression retried it at each character)
        "ab " * (LONG // 3),
        "a-/+ " * (LONG // 5),
        'k: "' + "x" * LONG,  # an unclosed quote
        'k: "x, ' * (LONG // 7),
        "k:" * (LONG // 2),
        "Steps: 2, CFG scale: 5, " + "b" * LONG + ", Seed: 1",
    ],
    ids=["key-run", "words", "key-punctuation", "open-quote", "open-quotes", "empty-values", "inside-fields"],
)
def test_parse_infotext_takes_linear_time(line):
    start = time.perf_counter()
    parse_infotext(f"a prompt\n{line}")
    assert time.perf_counter() - start < 0.25


def test_parse_infotext_reads_what_the_a1111_expression_reads():
    """Differential: on 3000 random short lines of the characters that matter, the linear reader finds the same
    keys and values as the regular expression it replaces (A1111's, with '+' in keys)."""
    import random
    import re

    expression = re.compile(r'\s*([\w][\w \-/+]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
    rng = random.Random(0)
    alphabet = 'ab :,"\\-/+\t1é'
    for _ in range(3000):
        line = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        expected = [(k, v) for k, v in expression.findall(line)]
        assert [(k, v) for k, v, _ in _fields(line)] == expected, line


def test_a_1kb_png_of_900kb_text_is_refused_before_any_parse(tmp_path):
    """Issue 27 (high): a zTXt chunk of under 1 KB inflating to 900 KB. The reader stops inflating at the limit."""
    path = tmp_path / "bomb.png"
    assert crafted_png(path, [text_chunk("a" * 900_000)]) < 1100
    start = time.perf_counter()
    growth, _ = peak_rss_growth_mb(lambda: pytest.raises(CompareError, read_parameters, path))
    with pytest.raises(CompareError, match=r"'parameters' text of bomb.png is longer than 65536 bytes"):
        read_parameters(path)
    assert time.perf_counter() - start < 0.5 and growth < 8
    with pytest.raises(CompareError, match="are 900000 characters long, more than 65536"):
        restore_form("a" * 900_000)  # the text itself (an API caller's) is refused before it is parsed


def test_reading_png_text_decodes_no_pixels(tmp_path):
    """Issue 27 (low): a 4096 x 4096 PNG of about 50 KB decodes to 48 MiB; its text is read in under 8 MiB. A
    200-megapixel PNG (over PIL's 179 MP limit) is read too: its pixels are never looked at."""
    path = tmp_path / "big.png"
    size = crafted_png(path, [text_chunk(CELL_TEXT)], 4096, 4096)
    assert size < 100_000
    growth, text = peak_rss_growth_mb(lambda: read_parameters(path))
    assert text == CELL_TEXT and growth < 8
    huge = tmp_path / "huge.png"
    crafted_png(huge, [text_chunk(CELL_TEXT, "tEXt")], 8, 8)
    data = bytearray(huge.read_bytes())
    data[8:33] = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 20_000, 10_000, 8, 2, 0, 0, 0))  # 200 MP
    huge.write_bytes(bytes(data))
    assert restore_form(read_parameters(huge)).seeds == (42,)


def _png(tmp_path, chunks, name="x.png", after=()):
    path = tmp_path / name
    crafted_png(path, list(chunks))
    if after:  # chunks after the image data (PNG allows text there)
        data = path.read_bytes()
        path.write_bytes(data[:-12] + b"".join(after) + data[-12:])
    return path


def test_png_text_chunks_of_every_kind_and_damaged_ones(tmp_path):
    """The adversarial pass on the PNG reader: each case gives the text, or one CompareError naming the damage."""
    prompt = "a photo of TOK toy 🧸 über"
    text = infotext(GenerationSettings(prompt, width=64, height=64), Cell(0, 0, 3, Column(None)), "tiny")
    assert read_parameters(_png(tmp_path, [text_chunk(text, "iTXt")])) == text  # UTF-8 (PIL writes iTXt for it)
    latin = CELL_TEXT.replace("a photo", "à photo")
    for kind in ("tEXt", "zTXt"):
        assert read_parameters(_png(tmp_path, [text_chunk(latin, kind)])) == latin
    assert read_parameters(_png(tmp_path, [], after=[text_chunk(CELL_TEXT)])) == CELL_TEXT  # after IDAT
    others = [text_chunk("x" * 50, "tEXt", f"k{i}") for i in range(5000)]
    start = time.perf_counter()
    assert read_parameters(_png(tmp_path, [*others, text_chunk(CELL_TEXT)])) == CELL_TEXT  # 5000 other chunks
    assert time.perf_counter() - start < 1.0

    cases = {
        "two": ([text_chunk(CELL_TEXT), text_chunk(CELL_TEXT, "tEXt")], "carries two 'parameters' texts"),
        "crc": ([text_chunk(CELL_TEXT)[:-1] + b"\x00"], r"checksum \(CRC\) does not match"),
        "zlib": ([png_chunk(b"zTXt", b"parameters\x00\x00not zlib data")], "its compressed text does not inflate"),
        "cut-zlib": ([png_chunk(b"zTXt", b"parameters\x00\x00" + zlib.compress(bytes(range(256)) * 4)[:40])], "ends early"),
        "method": ([png_chunk(b"zTXt", b"parameters\x00\x07" + zlib.compress(b"x"))], "unknown compression method"),
        "utf8": ([png_chunk(b"iTXt", b"parameters\x00\x00\x00\x00\x00\xff\xfe")], "is not valid UTF-8"),
        "itxt-head": ([png_chunk(b"iTXt", b"parameters\x00\x00")], "ends inside its header"),
        "huge-tEXt": ([text_chunk("a" * 70_000, "tEXt")], "is 70011 bytes, longer than 65536"),
        "length": ([b"\xff\xff\xff\xffzTXtparameters\x00"], r"claims 4294967295 bytes"),
    }
    for name, (chunks, message) in cases.items():
        with pytest.raises(CompareError, match=message):
            read_parameters(_png(tmp_path, chunks, f"{name}.png"))
    cut = _png(tmp_path, [text_chunk(CELL_TEXT)], "cut.png")
    cut.write_bytes(cut.read_bytes()[:60])  # the file ends inside the parameters chunk
    with pytest.raises(CompareError, match="the file ends inside it"):
        read_parameters(cut)
    for name, data in {"empty.png": b"", "jpeg.png": b"\xff\xd8\xff\xe0" + b"\x00" * 100}.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CompareError, match=f"{name} is not a PNG image"):
            read_parameters(tmp_path / name)
    many = tmp_path / "many.png"
    many.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"abCd", b"") * 100_001)
    start = time.perf_counter()
    with pytest.raises(CompareError, match="has more than 100000 chunks"):
        read_parameters(many)
    assert time.perf_counter() - start < 2.0
    with pytest.raises(CompareError, match="x.png is not a PNG image|cannot be read"):
        read_parameters(tmp_path)  # a folder


@pytest.mark.parametrize(
    "change, message",
    [
        ({"Seeds": "0-2000000"}, "2000001 seeds are more than the limit of 1024"),
        ({"Seed": "1" * 5000}, "is larger than 18446744073709551615"),
        ({"Seed": "-5"}, "'-5' is not a seed"),
        ({"Adapter strength": "nan"}, "strength of 'dora' must be a number from 0 to 2, got nan"),
        ({"Adapter strength": "1e308"}, "must be a number from 0 to 2"),
        ({"Adapter": "![x](http://127.0.0.1:1/x.png)"}, "adapter name .* must be 1 to 64 letters"),
        ({"Columns": "base, dora 1, ![y](http://e) 1"}, "adapter name .* must be 1 to 64 letters"),
        ({"Columns": "dora inf"}, "must be a number from 0 to 2, got inf"),
        ({"Size": "99999x64"}, "width must be a multiple of 8 from 64 to 2048"),
        ({"Steps": "100000"}, "steps must be from 1 to 150"),
        ({"CFG scale": "nan"}, "guidance scale must be a number"),
        ({"Model": '"\\q"'}, r"the value of 'Model' is not a readable quoted string"),
    ],
)
def test_restored_numbers_and_names_are_checked_as_the_form_checks_them(change, message):
    p = parse_infotext(CELL_TEXT)
    if "Seeds" in change or "Columns" in change:
        p = {**p, "Seeds": "0", "Columns": "dora 1"}
    p = {**p, **change}
    quote = lambda v: json.dumps(v) if any(c in v for c in ",:") else v  # noqa: E731  (as infotext writes)
    fields = ", ".join(f"{k}: {quote(v)}" for k, v in p.items() if k not in ("Prompt", "Negative prompt"))
    start = time.perf_counter()
    with pytest.raises(CompareError, match=message):
        restore_form(f"{p['Prompt']}\n{fields}")
    assert time.perf_counter() - start < 0.5


def test_prompt_length_and_grid_size_are_capped(monkeypatch):
    """Issue 27: a 1 MB prompt held the render slot for 192 s and built a 124-megapixel grid PNG."""
    GenerationSettings("p" * MAX_PROMPT_LENGTH)
    with pytest.raises(CompareError, match="the prompt is 2001 characters long, more than the limit of 2000"):
        GenerationSettings("p" * (MAX_PROMPT_LENGTH + 1))
    with pytest.raises(CompareError, match="the negative prompt is 1000000 characters long"):
        GenerationSettings("p", "n" * 1_000_000)
    cells = [[_solid(0, (64, 64))]]
    short = compose_grid(cells, ["seed 0"], [["base"]], "word " * 40, zoom=4)
    longest = compose_grid(cells, ["seed 0"], [["base"]], "word " * 400, zoom=4)
    assert longest.size == short.size == (short.size[0], short.size[1])  # four title lines at most
    assert short.size[0] * short.size[1] < 500_000
    assert shrink_factor(8, 8, 2048, 2048) == 2 and shrink_factor(8, 8, 1024, 1024) == 1
    monkeypatch.setattr(grid_image, "MAX_GRID_PIXELS", 4 * 32 * 32)
    grid = compose_grid([[_solid(0, (64, 64))] * 2] * 2, ["0", "1"], [["a"], ["b"]])
    assert grid.size[1] < 2 * 64  # the cells were shrunk to 32 x 32


# ------------------------------------------------------------------------------------------------ rendering


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A Comparer on the tiny pipeline read from disk, with a DoRA and a LoRA loaded (one torch thread: on a
    shared 2-core machine two OpenMP threads can be many times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("compare")
    model = save_tiny_sdxl_pipeline(root / "model")
    dora = make_adapter_file(root / "dora", seed=1)
    lora = make_adapter_file(root / "lora", seed=2, use_dora=False)
    comparer = Comparer(load_base_pipeline(str(model), device="cpu"), str(model))
    comparer.load_adapter(str(dora), "dora")
    comparer.load_adapter(str(lora))
    yield comparer
    torch.set_num_threads(threads)


def test_comparer_describes_adapters(bench):
    assert [(a.name, a.kind, a.ranks) for a in bench.adapters] == [("dora", "DoRA", (2, 4)), ("lora", "LoRA", (2, 4))]
    assert bench.default_size == TINY_RESOLUTION


def test_comparer_refuses_bad_adapters_and_keeps_serving(bench, tmp_path):
    with pytest.raises(AdapterFileError, match="is not an existing file or directory"):
        bench.load_adapter(str(tmp_path / "missing.safetensors"))
    with pytest.raises(CompareError, match="already loaded"):
        bench.load_adapter(str(tmp_path), "dora")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(AdapterFileError):
        bench.load_adapter(str(junk))
    assert [a.name for a in bench.adapters] == ["dora", "lora"]


def test_snippet_reproduces_the_cell(bench, tmp_path, monkeypatch):
    settings = GenerationSettings("a photo of TOK toy", "blurry", 2, 4.0, 64, 64, "Euler a")
    plan = bench.plan_grid(settings, "5", {"dora": 0.7}, include_base=False)
    (result,) = bench.render(plan)
    monkeypatch.chdir(tmp_path)
    exec(bench.snippet(plan, plan.cells[0]), {})
    again = Image.open(tmp_path / "dora_seed5.png")
    assert np.array_equal(np.asarray(again), np.asarray(result.image))


def test_render_stops_between_steps_and_leaves_no_state(bench):
    plan = bench.plan_grid(TINY, "0-2", {"dora": 1.0}, include_base=True)
    steps: list[tuple[int, int]] = []
    results = list(bench.render(plan, on_step=lambda k, s: steps.append((k, s)), should_stop=lambda: len(steps) >= 3))
    assert [r.caption for r in results] == ["base · — · seed 0"]  # the interrupted second cell is not yielded
    assert steps == [(0, 1), (0, 2), (1, 1)]
    full = list(bench.render(plan))
    assert [r.caption for r in full][:2] == ["base · — · seed 0", "dora · 1.00 · seed 0"]
    assert np.array_equal(np.asarray(full[0].image), np.asarray(results[0].image))
    grid = bench.grid(plan, full)
    assert grid.size[0] > 2 * 256 and grid.size[1] > 3 * 256  # 64 px cells zoomed x4
    with pytest.raises(ValueError, match="needs all 6 cells, got 1"):
        bench.grid(plan, results)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_renders_the_same_pixels_twice(bench, name):
    cls_name, overrides = SCHEDULERS[name]
    scheduler = bench._scheduler(name)
    assert type(scheduler).__name__ == (cls_name or "EulerDiscreteScheduler")  # the tiny model ships Euler
    assert all(scheduler.config[k] == v for k, v in overrides.items())
    settings = GenerationSettings("a photo of TOK toy", num_inference_steps=2, width=64, height=64, scheduler=name)
    plan = bench.plan_grid(settings, "1", {"dora": 1.0}, include_base=False)
    first, again = list(bench.render(plan)), list(bench.render(plan))
    assert np.array_equal(np.asarray(first[0].image), np.asarray(again[0].image))


# ------------------------------------------------------------------------------------------------ sweeps, samplers


def test_plan_grid_sweeps_give_one_column_per_strength_in_load_order():
    plan = plan_grid(TINY, [0, 1], {"lora": 1.0, "dora": "0, 0.5, 1.5"}, True, ["dora", "lora"])
    assert [(c.label, c.strength) for c in plan.columns] == [
        ("base", 0.0), ("dora", 0.0), ("dora", 0.5), ("dora", 1.5), ("lora", 1.0),
    ]  # fmt: skip
    assert len(plan) == 10
    assert parse_infotext(grid_infotext(plan, "tiny"))["Columns"] == "base, dora 0, dora 0.5, dora 1.5, lora 1"
    with pytest.raises(CompareError, match="2 seeds x 33 columns = 66 images"):
        plan_grid(TINY, [0, 1], {"dora": [k / 20 for k in range(33)]}, False, ["dora"])


@pytest.mark.parametrize(
    "scheduler, sampler, schedule_type",
    [("DPM++ 2M Karras", "DPM++ 2M", "Karras"), ("DPM++ 2M SDE Karras", "DPM++ 2M SDE", "Karras"),
     ("Euler a", "Euler a", None), ("UniPC", "UniPC", None)],
)  # fmt: skip
def test_samplers_are_named_as_a1111_names_them_and_read_back(scheduler, sampler, schedule_type):
    s = GenerationSettings("p", num_inference_steps=2, width=64, height=64, scheduler=scheduler)
    p = parse_infotext(infotext(s, Cell(0, 0, 1, Column(None)), "m"))
    assert (p["Sampler"], p.get("Schedule type")) == (sampler, schedule_type)
    assert restore_form(infotext(s, Cell(0, 0, 1, Column(None)), "m")).settings.scheduler == scheduler
    assert scheduler_from_a1111(scheduler) == scheduler  # A1111's older single name
    assert scheduler_from_a1111("LMS", "Karras") == "Default"


def test_restore_form_of_a_grid_reads_every_seed_and_column():
    plan = plan_grid(TINY, [4, 2], {"dora": [0, 1], "lora": 0.5}, False, ["dora", "lora"])
    r = restore_form(grid_infotext(plan, "tiny", "Euler"))
    assert (r.seeds, r.include_base, r.strengths, r.whole_grid) == ((4, 2), False, {"dora": [0.0, 1.0], "lora": [0.5]}, True)
    assert r.settings.scheduler == "Euler" and parse_infotext(grid_infotext(plan, "tiny", "Euler"))["Sampler"] == "Euler"


def test_check_adapter_args_fails_before_the_base_model_loads(tmp_path):
    dora = make_adapter_file(tmp_path / "dora", seed=1, targets="attn", text=False)
    assert check_adapter_args([f"a={dora}", str(dora.parent), "b=user/repo"]) == [
        ("a", str(dora), dora), ("dora", str(dora.parent), dora), ("b", "user/repo", None)
    ]  # fmt: skip
    (tmp_path / "model.ckpt").write_bytes(b"pickle")
    for args, message in (
        ([f"a={dora}", f"a={dora}"], "--adapter a=.*already loaded"),
        (["base=x/y"], "--adapter base=x/y: adapter name 'base' is reserved"),
        ([f"x={tmp_path / 'nope.safetensors'}"], "--adapter x=.*is not an existing file"),
        ([f"x={tmp_path / 'model.ckpt'}"], "pickle"),
    ):
        with pytest.raises((CompareError, AdapterFileError), match=message):
            check_adapter_args(args)


# ------------------------------------------------------------------------------------------------ differences


def test_abs_difference_and_shared_gain_numbers():
    a = Image.new("RGB", (4, 2), (10, 20, 30))
    b = Image.new("RGB", (4, 2), (13, 20, 24))
    d = abs_difference(a, b)
    assert d.shape == (2, 4) and np.allclose(d, 3.0)  # (3 + 0 + 6) / 3
    assert shared_gain([d]) == 64 and shared_gain([np.full((2, 2), 100.0)]) == 2 and shared_gain([]) == 64
    with pytest.raises(ValueError, match="cannot be compared"):
        abs_difference(a, Image.new("RGB", (2, 2)))


def test_difference_pairs_and_maps():
    cols = [Column(None), Column("d", 0.5), Column("d", 1.0), Column("l", 1.0), Column("x", 1.0)]
    pairs = difference_pairs(cols, {"d": "DoRA", "l": "LoRA", "x": "DoRA"})
    assert [(a.label, a.strength, b.label) for a, b in pairs] == [
        ("d", 0.5, "base"), ("d", 1.0, "base"), ("l", 1.0, "base"), ("x", 1.0, "base"), ("d", 1.0, "l"), ("x", 1.0, "l"),
    ]  # fmt: skip
    plan = plan_grid(TINY, [7], {"d": 1.0, "l": 1.0}, True, ["d", "l"])
    images = {(7, Column(None)): _solid((0, 0, 0)), (7, Column("d", 1.0)): _solid((4, 4, 4)),
              (7, Column("l", 1.0)): _solid((0, 0, 0))}  # fmt: skip
    maps = difference_maps(plan, images, {"d": "DoRA", "l": "LoRA"})
    assert [m.caption for m in maps] == [
        "|d 1.00 − base| · seed 7 · mean 4.00/255 · ×32",
        "|l 1.00 − base| · seed 7 · mean 0.00/255 · ×32",
        "|d 1.00 − l 1.00| · seed 7 · mean 4.00/255 · ×32",
    ]
    assert {m.gain for m in maps} == {32} and np.asarray(maps[0].image).max() == 128 and np.asarray(maps[1].image).max() == 0
    assert mean_differences(maps) == {"|d 1.00 − base|": 4.0, "|l 1.00 − base|": 0.0, "|d 1.00 − l 1.00|": 4.0}
    table = column_table(plan, images, [ColumnScore(Column("d", 1.0), 1, {"CLIP-T": 0.31234})], maps)
    assert table == {
        "headers": ["column", "images", "CLIP-T", "mean |Δ| vs base", "mean |DoRA − LoRA|"],
        "data": [["base", 1, None, None, None], ["d 1.00", 1, 0.312, 4.0, 4.0], ["l 1.00", 1, None, 0.0, None]],
    }
    assert difference_grid(plan, maps).size[0] > 3 * 16 * 4  # three pairs of 16 px images, zoomed x4



# ------------------------------------------------------------------------------------------------ comparer


def test_stop_ends_a_cell_inside_a_denoising_step(bench):
    """Stop is checked before every UNet block: the cell ends after its first block, with no step finished."""
    plan = bench.plan_grid(TINY, "0", {"dora": 1.0}, include_base=False)
    blocks: list[str] = []
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: blocks.append(i)) for i, b in enumerate(bench.pipe.unet.down_blocks)]
    try:
        steps: list[int] = []
        image = bench.render_cell(plan.settings, plan.cells[0], steps.append, should_stop=lambda: len(blocks) >= 1)
    finally:
        for h in hooks:
            h.remove()
    assert image is None and steps == [] and blocks == [0]
    (again,) = bench.render(plan)  # the hooks are gone and the next cell renders whole
    assert again.image.size == (64, 64)
    grid = bench.grid(bench.plan_grid(TINY, "0-1", {"dora": 1.0}, False), [again], partial=True)
    assert grid.getpixel((grid.width - 20, grid.height - 20)) == (232, 232, 232)  # the missing cell is grey


def test_a_file_loads_once_and_adapters_can_be_removed(bench, tmp_path):
    assert bench.default_sampler == "Euler"  # the tiny model ships SDXL's Euler scheduler
    extra = make_adapter_file(tmp_path / "extra", seed=4, targets="attn", text=False)
    info = bench.load_adapter(str(extra), "extra")
    assert info.file == extra and bench.kinds()["extra"] == "DoRA"
    with pytest.raises(CompareError, match=r"already loaded as 'extra'; a strength sweep"):
        bench.load_adapter(str(extra.parent), "extra_again")
    bench.remove_adapter("extra")
    assert [a.name for a in bench.adapters] == ["dora", "lora"] and bench.pipe.get_dora_adapters() == ["dora", "lora"]
    with pytest.raises(CompareError, match="no adapter named 'extra' is loaded"):
        bench.remove_adapter("extra")
    assert bench.load_adapter(str(extra), "extra").name == "extra"  # removed, it loads again
    bench.remove_adapter("extra")


# ------------------------------------------------------------------------------------------------ issue 29


def test_a_chosen_difference_pair_replaces_every_dora_against_every_lora():
    """Issue 29 (8): the DoRA − LoRA maps compare the chosen pair only, whatever its kinds, and the table names it."""
    cols = [Column(None), Column("d", 1.0), Column("l", 1.0), Column("x", 1.0), Column("x", 0.5)]
    kinds = {"d": "DoRA", "l": "LoRA", "x": "DoRA"}
    pairs = difference_pairs(cols, kinds, ("x", "d"))
    assert [(a.label, a.strength, b.label) for a, b in pairs[4:]] == [("x", 1.0, "d")]  # same strength only
    assert default_pair(["x", "l", "d"], kinds) == ("x", "l")
    assert default_pair(["x", "d"], kinds) == ("x", "d") and default_pair(["x"], kinds) is None
    assert pair_header(("d", "l"), kinds) == "mean |DoRA − LoRA|"
    assert pair_header(("x", "d"), kinds) == "mean |x − d|"
    plan = plan_grid(TINY, [7], {"d": 1.0, "l": 1.0, "x": 1.0}, True, ["d", "l", "x"])
    images = {(7, Column(None)): _solid((0, 0, 0)), (7, Column("d", 1.0)): _solid((4, 4, 4)),
              (7, Column("l", 1.0)): _solid((0, 0, 0)), (7, Column("x", 1.0)): _solid((10, 10, 10))}  # fmt: skip
    maps = difference_maps(plan, images, kinds, ("x", "d"))
    assert [m.label for m in maps][3:] == ["|x 1.00 − d 1.00|"] and maps[3].mean == 6.0
    table = column_table(plan, images, [], maps, pair_header(("x", "d"), kinds))
    assert table["headers"][-1] == "mean |x − d|"
    assert [row[-1] for row in table["data"]] == [None, None, None, 6.0]


def test_trigger_words_from_each_dialect_and_the_comparers_prompt(bench, tmp_path):
    """Issue 29 (5): trigger words come from our header, kohya's trigger phrase or ss_tag_frequency; the comparer
    joins those of its loaded adapters into a prompt."""
    from dora_diffusion.formats import read_metadata, read_safetensors, trigger_words, write_safetensors

    assert trigger_words({"dora_diffusion": json.dumps({"trigger_words": ["a zwx pink heart", " "]})}) == ["a zwx pink heart"]
    assert trigger_words({"modelspec.trigger_phrase": "TOK, sks dog"}) == ["TOK", "sks dog"]
    tags = {"10_sks dog": {"sks": 12, "dog": 12, "grass": 3}, "5_more": {"sks": 2, "dog": 2, "snow": 9}}
    assert trigger_words({"ss_tag_frequency": json.dumps(tags)}) == ["sks", "dog"]
    assert trigger_words({"ss_tag_frequency": "not json"}) == [] and trigger_words({}) == []
    assert bench.trigger_prompt() == ""  # the bench's files name none
    state, meta = read_safetensors(bench.adapters[0].file)
    path = tmp_path / "trig.safetensors"
    write_safetensors(state, path, {**meta, "modelspec.trigger_phrase": "TOK, sks"})
    assert trigger_words(read_metadata(path)) == ["TOK", "sks"]
    bench.load_adapter(str(path), "trig")
    try:
        assert bench.trigger_words()["trig"] == ["TOK", "sks"] and bench.trigger_words()["dora"] == []
        assert bench.trigger_prompt() == "TOK, sks"
    finally:
        bench.remove_adapter("trig")


def test_the_demo_figure_shows_training_images_grid_differences_and_the_explanation():
    """Issue 29 (1): training images on top, the grid and its difference maps side by side, then the sentence;
    the explanation carries the scores it was given and names language drift and prior preservation."""
    from dora_diffusion.compare.scores import ColumnScore as Score
    from dora_diffusion.demo import demo_figure, explain_scores

    plan = plan_grid(TINY, [0], {"dora": 1.0, "lora": 1.0}, True, ["dora", "lora"])
    images = {(0, Column(None)): _solid((0, 0, 0)), (0, Column("dora", 1.0)): _solid((4, 4, 4)),
              (0, Column("lora", 1.0)): _solid((0, 0, 0))}  # fmt: skip
    maps = difference_maps(plan, images, {"dora": "DoRA", "lora": "LoRA"})
    scores = [Score(Column(None), 1, {"subject fidelity": 0.51, "prompt fidelity": 0.75}),
              Score(Column("dora", 1.0), 1, {"subject fidelity": 0.81, "prompt fidelity": 0.25}),
              Score(Column("lora", 1.0), 1, {"subject fidelity": 0.76, "prompt fidelity": 0.5})]  # fmt: skip
    text = explain_scores(scores)
    for part in ("base 0.51, DoRA 0.81, LoRA 0.76", "base 0.75, DoRA 0.25, LoRA 0.50", "language drift",
                 "--with_prior_preservation"):  # fmt: skip
        assert part in text, part
    grid = Image.new("RGB", (300, 200), (0, 255, 0))
    training = [Image.new("RGB", (16, 16), (255, 0, 0))] * 3
    figure = demo_figure(plan, grid, maps, training, text)
    pixels = np.asarray(figure)
    red = np.argwhere((pixels == (255, 0, 0)).all(axis=2))
    green = np.argwhere((pixels == (0, 255, 0)).all(axis=2))
    assert len(red) == 3 * 64 * 64  # the training images, zoomed x4 like the grid's cells
    assert red[:, 0].max() < green[:, 0].min()  # above the grid
    assert len(green) == 300 * 200 and green[:, 1].min() == 0
    assert figure.width > 300 + difference_grid(plan, maps).width  # the difference maps on the grid's right
    text_top = figure.height - grid_image.text_image(text, figure.width, max(14, min(24, figure.width // 60))).height
    assert green[:, 0].max() < text_top  # the sentence below
    assert grid_image.drawable("|a − b| ×2 — Δ") == "|a - b| x2 - d"
