"""Reading DreamBooth data: sources, captions, image modes, unreadable files, crops and micro-conditioning, order."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dora_diffusion.testing import make_toy_imagefolder, make_toy_images
from dora_diffusion.training.data.records import (
    DatasetError,
    default_validation_prompt,
    load_records,
    looks_like_hub_id,
    to_rgb,
    trigger_words,
)
from dora_diffusion.training.data.dataset import (
    DreamBoothDataset,
    apply_crop,
    collate,
    plan_crop,
)
from dora_diffusion.training.data.sampling import MicroBatchSampler


def _write_folder(path, n, captions=None, size=32):
    path.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(make_toy_images(n, size=size)):
        im.save(path / f"{i:02d}.png")
        if captions is not None and captions[i] is not None:
            (path / f"{i:02d}.txt").write_text(captions[i] + "\n")
    return path


# ---------------------------------------------------------------- sources and captions
def test_imagefolder_with_metadata(tmp_path):
    folder = make_toy_imagefolder(tmp_path / "d", n=3, size=32)
    data = load_records(str(folder), cache_dir=str(tmp_path / "cache"))
    assert (data.source, data.caption_column, len(data.records)) == ("imagefolder", "prompt", 3)
    assert [r.caption for r in data.records] == ["a photo of TOK toy", "a photo of TOK toy, close-up", "a photo of TOK toy, plain background"]
    assert data.records[0].image.mode == "RGB" and data.records[0].image.size == (32, 32)


def test_imagefolder_with_metadata_csv(tmp_path):
    folder = make_toy_imagefolder(tmp_path / "d", n=2, size=16, caption_column="text")
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    (folder / "metadata.jsonl").unlink()
    (folder / "metadata.csv").write_text("file_name,text\n" + "".join(f'{r["file_name"]},"{r["text"]}"\n' for r in rows))
    data = load_records(str(folder), cache_dir=str(tmp_path / "c"))
    assert (data.caption_column, [r.caption for r in data.records]) == ("text", [r["text"] for r in rows])


@pytest.mark.parametrize("column", ["prompt", "text", "caption"])
def test_caption_column_is_detected(tmp_path, column):
    folder = make_toy_imagefolder(tmp_path / "d", n=2, size=16, caption_column=column)
    assert load_records(str(folder), cache_dir=str(tmp_path / "c")).caption_column == column


def test_missing_caption_column_lists_the_columns(tmp_path):
    folder = make_toy_imagefolder(tmp_path / "d", n=2, size=16, caption_column="description")
    with pytest.raises(DatasetError, match=r"no caption column .*columns found: \['image', 'description'\]"):
        load_records(str(folder), cache_dir=str(tmp_path / "c"))
    with pytest.raises(DatasetError, match=r"--caption_column 'nope' is not a column .*\['image', 'description'\]"):
        load_records(str(folder), caption_column="nope", cache_dir=str(tmp_path / "c"))
    # an explicit column, or one prompt for all, works
    assert load_records(str(folder), caption_column="description", cache_dir=str(tmp_path / "c")).records[0].caption.startswith("a photo")
    assert {r.caption for r in load_records(str(folder), instance_prompt="TOK toy", cache_dir=str(tmp_path / "c")).records} == {"TOK toy"}


def test_missing_image_column(tmp_path):
    folder = make_toy_imagefolder(tmp_path / "d", n=2, size=16)
    with pytest.raises(DatasetError, match=r"--image_column 'img' is not a column .*\['image', 'prompt'\]"):
        load_records(str(folder), image_column="img", cache_dir=str(tmp_path / "c"))


def test_txt_captions_and_images_only(tmp_path):
    data = load_records(str(_write_folder(tmp_path / "t", 2, ["TOK dog on grass", "TOK dog asleep"])))
    assert (data.source, [r.caption for r in data.records]) == ("txt-captions", ["TOK dog on grass", "TOK dog asleep"])
    # a missing .txt falls back to the instance prompt
    data = load_records(str(_write_folder(tmp_path / "m", 2, ["TOK cat", None])), instance_prompt="a TOK cat")
    assert [r.caption for r in data.records] == ["TOK cat", "a TOK cat"]
    data = load_records(str(_write_folder(tmp_path / "i", 3)), instance_prompt="a photo of TOK")
    assert (data.source, len(data.records), data.records[2].caption) == ("images-only", 3, "a photo of TOK")
    with pytest.raises(DatasetError, match="no captions .*pass --instance_prompt"):
        load_records(str(tmp_path / "i"))


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    folder = _write_folder(tmp_path / "d", 3)
    (folder / "01.png").write_bytes(b"not an image")
    (folder / "zz.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    data = load_records(str(folder), instance_prompt="TOK")
    assert [r.name for r in data.records] == ["00.png", "02.png"]
    assert sorted(data.skipped) == ["01.png", "zz.jpg"]
    # through datasets (imagefolder with metadata) too
    meta = make_toy_imagefolder(tmp_path / "m", n=3, size=16)
    (meta / "0001.png").write_bytes(b"garbage")
    data = load_records(str(meta), cache_dir=str(tmp_path / "c"))
    assert (len(data.records), data.skipped) == (2, ["0001.png"])


def test_no_readable_image_is_an_error(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"nope")
    with pytest.raises(DatasetError, match="none of the 1 images .* could be read"):
        load_records(str(folder), instance_prompt="TOK")


@pytest.mark.parametrize("kind", ["empty", "missing", "file", "no-images"])
def test_empty_or_missing_dataset(tmp_path, kind):
    path = tmp_path / "x"
    if kind == "empty":
        path.mkdir()
    elif kind == "file":
        path.write_text("hello")
    elif kind == "no-images":
        path.mkdir()
        (path / "notes.md").write_text("hi")
    expected = {"empty": "holds no images", "missing": "no such folder", "file": "got a file", "no-images": "holds no images"}
    with pytest.raises(DatasetError, match=expected[kind]):
        load_records(str(path) if kind != "missing" else "./x/does-not-exist", instance_prompt="TOK")


def test_empty_imagefolder(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "metadata.jsonl").write_text("")
    with pytest.raises(DatasetError, match="holds no images"):
        load_records(str(folder), cache_dir=str(tmp_path / "c"))


def test_hub_dataset_path(tmp_path, monkeypatch):
    """A Hub id is fetched with snapshot_download (here from a filled cache, offline) and read as an imagefolder:
    today's captions give the trigger phrase 'a 3dicon', the old revision's give TOK."""
    from hub_fixtures import ICON_OLD_REVISION, fill_hub_cache, make_3d_icon_like

    cache = tmp_path / "hub"
    fill_hub_cache(cache, "linoyts/3d_icon", make_3d_icon_like(tmp_path / "new"), "dataset")
    fill_hub_cache(cache, "linoyts/3d_icon", make_3d_icon_like(tmp_path / "old", old_captions=True), "dataset",
                   commit=ICON_OLD_REVISION, branch=None)  # fmt: skip
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    data = load_records("linoyts/3d_icon", cache_dir=str(cache), resolution=32)
    assert (data.source, data.caption_column, len(data.records)) == ("hub", "prompt", 23)
    assert data.records[0].caption == "a 3dicon, spotify app icon with music notes"
    assert trigger_words([r.caption for r in data.records]) == ["a 3dicon"]
    assert data.records[0].size == (96, 72) and data.records[0].image.size == (43, 32)  # shrunk once, on decoding
    assert data.records[22].size == (40, 72) and data.records[22].image.size == (32, 58)
    old = load_records("linoyts/3d_icon", cache_dir=str(cache), revision=ICON_OLD_REVISION)
    assert trigger_words([r.caption for r in old.records]) == ["TOK"]
    with pytest.raises(DatasetError, match="is not in the Hugging Face cache"):
        load_records("linoyts/3d_icon", cache_dir=str(cache), revision="0" * 40)
    with pytest.raises(DatasetError, match="is not in the Hugging Face cache"):
        load_records("someone/else", cache_dir=str(cache))
    with pytest.raises(DatasetError, match="a local folder, which has no revisions"):
        load_records(str(tmp_path / "new"), revision="main")
    assert looks_like_hub_id("linoyts/3d_icon") and not looks_like_hub_id("./3d_icon") and not looks_like_hub_id("a/b/c")


def test_big_jpeg_is_decoded_small(tmp_path):
    """A 4000 x 3000 JPEG at resolution 64: decoded at 1/8 scale (draft), then resized to exactly 85 x 64."""
    from dora_diffusion.training.data.records import open_image

    Image.new("RGB", (4000, 3000), (200, 30, 30)).save(tmp_path / "big.jpg")
    image, size = open_image(tmp_path / "big.jpg", 64)
    assert size == (4000, 3000) and image.size == (85, 64)
    assert abs(np.asarray(image, dtype=np.float32).mean(axis=(0, 1)) - [200, 30, 30]).max() < 3


# ---------------------------------------------------------------- image modes
def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display = rotate 90 degrees clockwise
    path = tmp_path / "rot.png"
    image.save(path, exif=exif)
    with Image.open(path) as raw:
        upright = to_rgb(raw)
    assert upright.size == (20, 40)
    assert upright.getpixel((19, 0))[0] > 200  # the red top-left corner went to the top-right


def test_modes_become_rgb():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)  # composited on white, not black
    assert to_rgb(Image.new("LA", (4, 4), (10, 255))).getpixel((0, 0)) == (10, 10, 10)
    assert to_rgb(Image.new("L", (4, 4), 77)).getpixel((0, 0)) == (77, 77, 77)
    palette = Image.new("P", (4, 4), 3)
    palette.putpalette([0, 0, 0] * 3 + [10, 20, 30] + [0, 0, 0] * 252)
    assert to_rgb(palette).getpixel((0, 0)) == (10, 20, 30)
    assert to_rgb(Image.new("CMYK", (4, 4), (0, 0, 0, 0))).mode == "RGB"
    deep = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert to_rgb(deep).getpixel((0, 0)) == (255, 255, 255)


# ---------------------------------------------------------------- crops and micro-conditioning
@pytest.mark.parametrize("flip", [False, True])
def test_micro_conditioning_describes_the_real_crop(flip):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (60, 100, 3), dtype=np.uint8))  # w=100, h=60
    for seed in range(20):
        plan = plan_crop(image.size, 32, center_crop=False, random_flip=True, seed=seed)
        if plan.flip == flip:
            break
    assert plan.flip == flip
    resized = image.resize(plan.resized, Image.Resampling.LANCZOS)
    assert plan.resized == (53, 32)
    seen = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else resized
    top, left = plan.crop_top_left
    expected = np.asarray(seen.crop((left, top, left + 32, top + 32)), dtype=np.float32) / 127.5 - 1
    pixels = apply_crop(image, plan)
    assert pixels.shape == (3, 32, 32)
    torch.testing.assert_close(pixels.permute(1, 2, 0), torch.from_numpy(expected))
    assert plan.time_ids().tolist() == [60.0, 100.0, float(top), float(left), 32.0, 32.0]


def test_center_crop_and_determinism():
    plan = plan_crop((100, 60), 32, center_crop=True, random_flip=False, seed=5)
    assert (plan.top, plan.left, plan.flip) == (0, 10, False)  # (53 - 32) / 2 = 10.5 -> 10
    assert plan_crop((100, 60), 32, False, True, seed=7) == plan_crop((100, 60), 32, False, True, seed=7)


def test_dataset_repeats_and_prior_pairs():
    records = [r for r in load_records_stub(3)]
    classes = [r for r in load_records_stub(2, "a toy")]
    ds = DreamBoothDataset(records, 16, repeats=2, seed=1, random_flip=True, class_records=classes, class_prompt="a toy")
    assert len(ds) == 6
    batch = collate([ds[4], ds[5]])
    assert batch["captions"] == ["c1", "c2", "a toy", "a toy"]
    assert batch["pixels"].shape == (4, 3, 16, 16) and batch["time_ids"].shape == (4, 6)
    assert batch["class_index"].tolist() == [0, 1]
    ds.with_pixels = False
    assert "pixels" not in collate([ds[0]])


def load_records_stub(n, caption=None):
    from dora_diffusion.training.data.records import Record

    return [Record(im, caption or f"c{i}", f"{i}") for i, im in enumerate(make_toy_images(n, size=24))]


def test_micro_batch_order():
    a = MicroBatchSampler(num_items=5, batch_size=2, num_processes=2, rank=0, seed=3)
    b = MicroBatchSampler(num_items=5, batch_size=2, num_processes=2, rank=1, seed=3)
    assert a.per_epoch == 2  # ceil(5 / 4)
    first_epoch = [i for j in range(2) for i in a.batch(j) + b.batch(j)]
    assert len(first_epoch) == 8 and set(first_epoch) == {0, 1, 2, 3, 4}
    assert a.batch(2) != a.batch(0) or a.batch(3) != a.batch(1)  # a new permutation per epoch
    it = iter(a)
    stream = [next(it) for _ in range(7)]
    assert stream == [a.batch(j) for j in range(7)]
    resumed = iter(MicroBatchSampler(5, 2, 2, 0, 3, start=3))
    assert [next(resumed) for _ in range(4)] == stream[3:7]


def test_trigger_words():
    assert trigger_words(["a TOK icon of a cat", "TOK, 3d icon of A dog"]) == ["TOK"]
    assert trigger_words(["<s0><s1> dog", "a <s0><s1> dog"]) == ["<s0><s1>"]
    assert trigger_words(["a dog", "a cat"]) == []
    # no rare token: the phrase every caption starts with, up to its first comma, unless it is only filler
    assert trigger_words(["a 3dicon, a pizza", "a 3dicon, spotify app icon"]) == ["a 3dicon"]
    assert trigger_words(["a 3dicon of a cat", "a 3dicon, a dog"]) == ["a 3dicon"]
    assert trigger_words(["a photo of sks dog in snow", "a photo of sks dog, asleep"]) == ["a photo of sks dog"]
    assert trigger_words(["a photo of a dog", "a photo of a cat"]) == []
    assert trigger_words(["a zwx pink heart on a red background", "a zwx pink heart on a blue background"]) == ["a zwx pink heart"]
    assert trigger_words(["a 3dicon, a pizza"]) == []  # one caption: its whole first clause would be a guess
    assert default_validation_prompt(["a 3dicon"], ["a 3dicon, a pizza"]) == "a 3dicon, an astronaut riding a horse"
    assert default_validation_prompt([], ["a red dog", "a cat"]) == "a red dog"



def test_non_utf8_caption_is_a_dataset_error_naming_the_file(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (16, 16), (i * 80, 0, 0)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_bytes("a photo of TOK".encode() if i == 0 else "caf\xe9 TOK".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"caption .*1\.txt is not UTF-8 text .* save it as UTF-8"):
        load_records(str(folder), "image", None, None, None, None)


# ---------------------------------------------------------------- hostile datasets (issue 27)
def test_caption_or_image_linked_outside_the_dataset_is_refused(tmp_path):
    """A caption .txt linked to a file elsewhere (a token in the user's home) would become the validation prompt,
    the model card's text and a Hub field: it is refused naming the link, and its text is never read. An image
    linked outside is refused the same way; links that stay inside the folder are followed."""
    secret = tmp_path / "home" / ".token"
    secret.parent.mkdir()
    secret.write_text("hf_SECRET_TOKEN")
    folder = _write_folder(tmp_path / "data", 2, ["a photo of TOK", None])
    (folder / "01.txt").symlink_to(secret)
    with pytest.raises(DatasetError, match=r"01\.txt is a link to .*\.token, outside the dataset folder") as err:
        load_records(str(folder))
    assert "hf_SECRET" not in str(err.value)
    (folder / "01.txt").unlink()
    (folder / "01.txt").symlink_to(folder / "00.txt")  # inside: fine
    assert [r.caption for r in load_records(str(folder)).records] == ["a photo of TOK", "a photo of TOK"]
    make_toy_images(1, 16)[0].save(tmp_path / "home" / "me.png")
    (folder / "02.png").symlink_to(tmp_path / "home" / "me.png")
    with pytest.raises(DatasetError, match=r"02\.png is a link to .*me\.png, outside the dataset folder"):
        load_records(str(folder), instance_prompt="TOK")
    # the same in an imagefolder: a metadata row naming a link to a file outside, and a folder linked in
    meta = make_toy_imagefolder(tmp_path / "meta", n=2, size=16)
    (meta / "0001.png").unlink()
    (meta / "0001.png").symlink_to(tmp_path / "home" / "me.png")
    with pytest.raises(DatasetError, match=r"0001\.png is a link to .*me\.png, outside the dataset folder"):
        load_records(str(meta), cache_dir=str(tmp_path / "c"))
    (meta / "0001.png").unlink()
    (meta / "train").symlink_to(tmp_path / "home")
    with pytest.raises(DatasetError, match=r"train is a link to a folder"):
        load_records(str(meta), cache_dir=str(tmp_path / "c"))


def _unblock_fifos_after(paths, seconds: float):
    """A daemon that, after ``seconds``, opens each FIFO for writing (without blocking) and closes it: a reader
    stuck on it (the old code) gets EOF, so a failing test ends instead of hanging the suite."""
    import os
    import threading
    import time

    def unblock():
        time.sleep(seconds)
        for p in paths:
            try:
                os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass  # no reader: nothing blocked

    threading.Thread(target=unblock, daemon=True).start()


def test_fifo_in_a_dataset_is_skipped_without_blocking(tmp_path):
    """A FIFO listed in metadata.jsonl (or named like an image beside .txt captions) is skipped and counted, never
    opened for a blocking read; a FIFO as a caption is an error naming it. Each load under 5 s."""
    import os
    import time

    meta = make_toy_imagefolder(tmp_path / "meta", n=2, size=16)
    os.mkfifo(meta / "fifo.png")
    with open(meta / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "fifo.png", "prompt": "a photo of TOK toy"}) + "\n")
    folder = _write_folder(tmp_path / "txt", 2, ["a TOK", "a TOK"])
    os.mkfifo(folder / "fifo.png")
    (folder / "fifo.txt").write_text("a TOK")
    fifo_caption = _write_folder(tmp_path / "fifocap", 1, [None])
    os.mkfifo(fifo_caption / "00.txt")
    _unblock_fifos_after([meta / "fifo.png", folder / "fifo.png", fifo_caption / "00.txt"], 5.0)
    start = time.perf_counter()
    data = load_records(str(meta), cache_dir=str(tmp_path / "c"))
    assert (len(data.records), data.skipped) == (2, ["fifo.png"])
    data = load_records(str(folder))
    assert (len(data.records), data.skipped) == (2, ["fifo.png"])
    with pytest.raises(DatasetError, match=r"caption .*00\.txt is a FIFO, not a regular file"):
        load_records(str(fifo_caption))
    assert time.perf_counter() - start < 5.0


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'{"file_name": "0000.png", "prompt": "caf\xe9"}\n', r"metadata\.jsonl, line 3: not UTF-8 text \(invalid continuation byte at byte 40 of the line"),
        (b'{"file_name": "/etc/hostname", "prompt": "a"}\n', r"line 3: file_name '/etc/hostname' is not a path inside the dataset folder"),
        (b'{"file_name": "../outside.png", "prompt": "a"}\n', r"line 3: file_name '../outside.png' is not a path inside"),
        (b'{"file_name": "https://example.com/a.png", "prompt": "a"}\n', r"line 3: file_name 'https://example.com/a.png' is not a path inside"),
        (b'{"file_name": 7, "prompt": "a"}\n', r"line 3: file_name 7 is not a file name"),
        (b'["0000.png", "a"]\n', r"line 3: not a JSON object \(a list\)"),
        (b'{"file_name": \n', r"line 3: not a JSON object \(Expecting value"),
    ],
)
def test_bad_metadata_line_is_an_error_naming_the_line(tmp_path, line, message):
    folder = make_toy_imagefolder(tmp_path / "d", n=2, size=16)
    with open(folder / "metadata.jsonl", "ab") as f:
        f.write(line)
    with pytest.raises(DatasetError, match=message):
        load_records(str(folder), cache_dir=str(tmp_path / "c"))


def test_metadata_csv_and_huge_lines_are_checked_before_datasets_reads_them(tmp_path):
    """A 1 GiB line (a sparse file) is refused after reading 1 MiB of it (datasets held ~5x a line's size), in
    under 2 s and under 64 MiB of memory; metadata.csv is checked like metadata.jsonl."""
    import os
    import resource
    import time

    folder = make_toy_imagefolder(tmp_path / "d", n=2, size=16)
    with open(folder / "metadata.jsonl", "ab") as f:
        f.write(b'{"file_name": "0000.png", "prompt": "')
    os.truncate(folder / "metadata.jsonl", 1 << 30)
    before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    with pytest.raises(DatasetError, match=r"metadata\.jsonl, line 3: longer than 1048576 bytes"):
        load_records(str(folder), cache_dir=str(tmp_path / "c"))
    assert time.perf_counter() - start < 2.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024  # KiB
    (folder / "metadata.jsonl").unlink()
    (folder / "metadata.csv").write_text("file_name,prompt\n0000.png,a TOK\n../x.png,a TOK\n")
    with pytest.raises(DatasetError, match=r"metadata\.csv, line 3: file_name '../x.png' is not a path inside"):
        load_records(str(folder), cache_dir=str(tmp_path / "c"))


def test_captions_with_control_characters_or_over_64_kib_are_refused(tmp_path):
    """Escape codes in a caption would reach the terminal (the summary prints the trigger words), the model card
    and the Hub; a caption of megabytes would be tokenized every step and become the validation prompt."""
    folder = _write_folder(tmp_path / "a", 1, ["a TOK \x1b]8;;https://evil.example\x07link\x1b]8;;\x07"])
    with pytest.raises(DatasetError, match=r"caption .*00\.txt: the caption holds the control character '\\x1b'"):
        load_records(str(folder))
    folder = _write_folder(tmp_path / "b", 1, ["a TOK " + "x" * (1 << 20)])
    with pytest.raises(DatasetError, match=r"caption .*00\.txt is over 65536 bytes"):
        load_records(str(folder))
    meta = make_toy_imagefolder(tmp_path / "m", n=2, size=16, caption="a photo of TOK toy\x1b[2J")
    with pytest.raises(DatasetError, match=r"row 1: the caption holds the control character '\\x1b'"):
        load_records(str(meta), cache_dir=str(tmp_path / "c"))
    # tabs and line breaks are whitespace, not refused
    ok = _write_folder(tmp_path / "ok", 1, ["a TOK\tdog\non grass"])
    assert load_records(str(ok)).records[0].caption == "a TOK\tdog\non grass"


def _png_bomb(path, side: int) -> int:
    """A greyscale PNG of side x side zero pixels (a few KB per megapixel); returns its size in bytes."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = b"\x00" * (side + 1)
    body = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path.stat().st_size


def test_decompression_bomb_under_pillows_limit_is_skipped_undecoded(tmp_path):
    """A 9000 x 9000 PNG of ~80 KB (81 MP, under Pillow's warning limit) would decode to 324 MB counted at 4 bytes a
    pixel: it is skipped and counted without decoding, in under 1 s and 32 MiB; the other images load."""
    import resource
    import time

    folder = _write_folder(tmp_path / "d", 2, ["a TOK", "a TOK"])
    assert _png_bomb(folder / "02.png", 9000) < 100_000
    (folder / "02.txt").write_text("a TOK")
    before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    data = load_records(str(folder), resolution=16)
    assert (len(data.records), data.skipped) == (2, ["02.png"])
    assert time.perf_counter() - start < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 32 * 1024  # KiB


def test_subfolders_beside_captioned_images_keep_the_txt_reader(tmp_path):
    """Images with .txt captions beside a subfolder (masks/, a folder named like an image, a caption that is a
    folder) stay a .txt-captions dataset: the folder named 02.png is skipped and counted, a folder caption is an
    error naming it (datasets read the .txt files as a text dataset: "no column 'image'")."""
    folder = _write_folder(tmp_path / "d", 2, ["a TOK", "a TOK"])
    (folder / "masks").mkdir()
    (folder / "02.png").mkdir()
    (folder / "02.txt").write_text("a TOK")
    data = load_records(str(folder))
    assert (data.source, len(data.records), data.skipped) == ("txt-captions", 2, ["02.png"])
    (folder / "01.txt").unlink()
    (folder / "01.txt").mkdir()
    with pytest.raises(DatasetError, match=r"caption .*01\.txt is a folder, not a regular file"):
        load_records(str(folder))
