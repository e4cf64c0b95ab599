"""The composite grid PNG: cells in rows and columns, column legends above, seed legends on the left."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from dora_diffusion.compare.infotext import format_strength
from dora_diffusion.compare.plan import Column

GRID_MIN_SIDE = 256
"""Smaller images are zoomed (nearest neighbour, a whole factor) to at least this size in the grid PNG."""
TITLE_MAX_LINES = 4
"""Most lines of the prompt drawn above a grid; a longer prompt ends in '…' (the PNG's text holds it whole)."""
MAX_GRID_PIXELS = 89_478_485
"""Largest grid PNG (PIL's decompression-bomb warning threshold); larger grids get their cells shrunk."""
MISSING_FILL = (232, 232, 232)
"""Colour of a cell that was not rendered (a grid stopped early)."""


def column_legend(column: Column) -> list[str]:
    """The lines above a grid column: ``["dora", "strength 1.00"]``, or ``["base model"]``."""
    if column.adapter is None:
        return ["base model"]
    return [column.adapter, f"strength {format_strength(column.strength)}"]


def row_legend(seed: int) -> str:
    return f"seed {seed}"


def grid_zoom(width: int, height: int) -> int:
    """Whole factor that brings the larger side of a cell to at least ``GRID_MIN_SIDE`` pixels (1 if it is)."""
    return max(1, GRID_MIN_SIDE // max(width, height))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


_NO_GLYPH = str.maketrans({"−": "-", "×": "x", "—": "-", "–": "-", "Δ": "d"})
"""Characters PIL's built-in font draws as an empty box, and the ones drawn instead."""


def drawable(text: str) -> str:
    """``text`` with the characters PIL's built-in font lacks (``−``, ``×``, ``—``, ``Δ``) replaced by ASCII ones."""
    return text.translate(_NO_GLYPH)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """Greedy word wrap of ``text`` into lines at most ``width`` pixels wide (a long word stays whole)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            trial = f"{line} {word}" if line else word
            if line and draw.textlength(trial, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return lines


def _cut(draw: ImageDraw.ImageDraw, line: str, font, width: int) -> str:
    """``line`` with '…' at its end, cut to fit ``width`` pixels."""
    line = line[: max(1, width // max(1, font.size // 3))]  # never measure more characters than can fit
    while line and draw.textlength(line + " …", font=font) > width:
        line = line[: len(line) * 9 // 10]
    return f"{line} …"


def shrink_factor(n_rows: int, n_cols: int, width: int, height: int) -> int:
    """Whole factor that brings ``n_rows x n_cols`` cells of ``width x height`` under ``MAX_GRID_PIXELS`` (1 if
    they are)."""
    k = 1
    while n_rows * n_cols * (width // k) * (height // k) > MAX_GRID_PIXELS:
        k += 1
    return k


def compose_grid(
    images: Sequence[Sequence[Image.Image | None]],
    row_labels: Sequence[str],
    column_labels: Sequence[Sequence[str]],
    title: str | None = None,
    zoom: int = 1,
) -> Image.Image:
    """One RGB image: ``images[row][col]`` in a grid, column legends above, row legends on the left.

    All images have one size; a ``None`` (a cell not rendered) is drawn as a light grey box. A column is as wide
    as the wider of its image and its legend, with the image centred; a ``title`` (the prompt) is wrapped above
    the legends (at most ``TITLE_MAX_LINES`` lines). Pixels are copied as they are, each repeated ``zoom`` x
    ``zoom`` times (nearest neighbour) to make small images legible; cells that would make the grid larger than
    ``MAX_GRID_PIXELS`` are shrunk by a whole factor (box filter).
    """
    row_labels = [drawable(t) for t in row_labels]
    column_labels = [[drawable(t) for t in lines] for lines in column_labels]
    title = drawable(title) if title else title
    present = [im for row in images for im in row if im is not None]
    if not images or not images[0] or not present:
        raise ValueError("compose_grid needs at least one image")
    n_rows, n_cols = len(images), len(images[0])
    if len(row_labels) != n_rows or len(column_labels) != n_cols or any(len(r) != n_cols for r in images):
        raise ValueError(f"{n_rows}x{n_cols} images need {n_rows} row labels and {n_cols} column labels")
    size = present[0].size
    w, h = size[0] * zoom, size[1] * zoom
    shrink = shrink_factor(n_rows, n_cols, w, h)
    w, h = w // shrink, h // shrink
    font = _font(max(12, min(32, min(w, h) // 16)))
    pad, gap = font.size // 2, max(2, min(w, h) // 64)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = font.size + pad // 2

    col_w = [max(w, *(int(probe.textlength(t, font=font)) + 2 * pad for t in lines)) for lines in column_labels]
    legend_w = max(int(probe.textlength(t, font=font)) for t in row_labels) + 2 * pad
    header_h = max(len(lines) for lines in column_labels) * line_h + 2 * pad
    grid_w = legend_w + sum(col_w) + gap * (n_cols - 1)
    title_lines = _wrap(probe, title, font, grid_w - 2 * pad) if title else []
    if len(title_lines) > TITLE_MAX_LINES:
        title_lines = title_lines[: TITLE_MAX_LINES - 1] + [_cut(probe, title_lines[TITLE_MAX_LINES - 1], font, grid_w - 2 * pad)]
    title_h = len(title_lines) * line_h + (pad if title_lines else 0)
    grid_h = title_h + header_h + n_rows * h + gap * (n_rows - 1)

    canvas = Image.new("RGB", (grid_w, grid_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(title_lines):
        draw.text((pad, pad + i * line_h), line, fill="black", font=font)
    x = legend_w
    for c, lines in enumerate(column_labels):
        for i, line in enumerate(lines):
            tw = draw.textlength(line, font=font)
            draw.text((x + (col_w[c] - tw) / 2, title_h + pad + i * line_h), line, fill="black", font=font)
        x += col_w[c] + gap
    for r, row in enumerate(images):
        y = title_h + header_h + r * (h + gap)
        draw.text((pad, y + (h - font.size) / 2), row_labels[r], fill="black", font=font)
        x = legend_w
        for c, image in enumerate(row):
            left = x + (col_w[c] - w) // 2
            if image is None:
                draw.rectangle((left, y, left + w - 1, y + h - 1), fill=MISSING_FILL)
            else:
                if image.size != size:
                    raise ValueError(
                        f"image [{r}][{c}] is {image.size[0]}x{image.size[1]}, the first is {size[0]}x{size[1]}"
                    )
                if image.size != (w, h):  # zoomed (nearest neighbour), or shrunk to fit MAX_GRID_PIXELS
                    image = image.resize((w, h), Image.Resampling.NEAREST if shrink == 1 else Image.Resampling.BOX)
                canvas.paste(image.convert("RGB"), (left, y))
            x += col_w[c] + gap
    return canvas


def text_image(text: str, width: int, font_size: int = 16) -> Image.Image:
    """``text`` (paragraphs split by ``"\\n"``) word-wrapped in black on white, ``width`` pixels wide."""
    font = _font(font_size)
    pad = font_size // 2
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = _wrap(probe, drawable(text), font, width - 2 * pad)
    line_h = font_size + font_size // 3
    canvas = Image.new("RGB", (width, len(lines) * line_h + 2 * pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((pad, pad + i * line_h), line, fill="black", font=font)
    return canvas


def stack_images(images: Sequence[Image.Image], gap: int = 8, across: bool = False) -> Image.Image:
    """``images`` one below the other (``across``: side by side) on white, each at its own size, aligned at the
    top left, ``gap`` pixels apart."""
    if not images:
        raise ValueError("stack_images needs at least one image")
    along = sum(im.width if across else im.height for im in images) + gap * (len(images) - 1)
    other = max(im.height if across else im.width for im in images)
    canvas = Image.new("RGB", (along, other) if across else (other, along), "white")
    offset = 0
    for im in images:
        canvas.paste(im.convert("RGB"), (offset, 0) if across else (0, offset))
        offset += (im.width if across else im.height) + gap
    return canvas
