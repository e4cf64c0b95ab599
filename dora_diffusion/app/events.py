"""What the Compare tab's buttons do: check, generate (with Stop), add / remove adapters, restore, show a cell.

Each handler is a method of ``CompareEvents``; ``ui`` connects them to the components of ``form.Form``
and ``Results``. Errors raise ``page_error`` (a toast, and an error for API clients); the events of Load adapter,
Remove and Restore confine their error status to the message area (``show_progress_on``), so the form keeps its
values and shows no error badge.
"""

from __future__ import annotations

import hashlib
import html
import queue
import re
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from dora_diffusion.app.form import MAX_SLOTS, Form, FormValues, read_slots, restored_updates, slot_updates, synced_slots
from dora_diffusion.compare import (
    CellResult,
    CompareError,
    Comparer,
    GridPlan,
    Scorer,
    ScoringUnavailable,
    column_table,
    default_adapter_name,
    default_pair,
    difference_grid,
    difference_maps,
    difference_pairs,
    format_strength,
    grid_infotext,
    pair_header,
    read_parameters,
    restore_form,
    save_png,
    score_columns,
    write_table_csv,
)
from dora_diffusion.compare.sources import AdapterSources
from dora_diffusion.formats import AdapterFileError

KEEP_RUNS = 8
"""Output folders of the most recent grids kept on disk; older ones are deleted."""
MAX_MESSAGE_LENGTH = 1000
"""Longest error message shown or kept (characters); longer ones are cut in the middle."""
MAX_KEPT_ERRORS = 64
"""Most error messages kept for ``show_error`` (one per browser session; the oldest go first)."""
_MARKDOWN_SPECIAL = re.compile(r"([!-/:-@\[-`{-~])")  # every ASCII punctuation character


def short_text(text: str, limit: int = MAX_MESSAGE_LENGTH) -> str:
    """``text`` cut in the middle to at most ``limit`` characters (both ends kept: a path's start, a reason's
    end)."""
    text = str(text)
    if len(text) <= limit:
        return text
    half = (limit - 3) // 2
    return f"{text[:half]} … {text[-half:]}"


def markdown_text(text: str) -> str:
    """``text`` shown as it is in a ``gr.Markdown``: every ASCII punctuation character escaped, so text from a PNG,
    an adapter file or a visitor makes no link, image, emphasis or HTML; newlines become spaces."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def code_span(text: str) -> str:
    """``text`` as a Markdown code span, shown as it is (no link, image or HTML): fenced by more backticks than
    any run inside it, newlines as spaces."""
    text = " ".join(str(text).split())
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}" if "`" in text else f"{fence}{text}{fence}"


def toast_text(message: str) -> str:
    """``message`` as a toast shows it whole and as plain text: cut to ``MAX_MESSAGE_LENGTH`` characters, ``&``,
    ``<`` and ``>`` escaped (Gradio renders a toast's message as HTML), and, since Gradio's page strips the
    quotes of a message that starts and ends with ``'``, such a message gets a closing full stop."""
    message = html.escape(short_text(message), quote=False)
    return message + "." if message.endswith(("'", '"')) else message


def page_error(err: Exception | str) -> gr.Error:
    """An error shown on the page for 15 s (or until closed); the message names what to change."""
    return gr.Error(toast_text(str(err)), duration=15, print_exception=False)


def keep_upload(path: str | Path, directory: Path) -> tuple[Path, bool]:
    """Copy an uploaded adapter into ``directory/<sha256 prefix>/<name>`` (once); return the copy and whether
    this call made it (``forget_upload`` deletes only such a copy, after a failed load).

    Gradio deletes its upload cache; the copy keeps the ``Adapter source`` of every infotext valid, and one file
    uploaded twice lands on one path.
    """
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    target = directory / digest.hexdigest()[:16] / path.name
    if target.is_file():
        return target, False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(path, tmp)
    tmp.replace(target)
    return target, True


def forget_upload(kept: Path, directory: Path) -> None:
    """Delete an upload ``keep_upload`` copied into ``directory`` whose load failed, and its folder if empty."""
    if kept.parent.parent != directory or kept.is_symlink() or not kept.is_file():
        return
    kept.unlink()
    try:
        kept.parent.rmdir()
    except OSError:  # another file of the same digest folder
        pass


class Runs:
    """Output folders of grids (one per run) and the Stop flags of browser sessions."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="dora-diffusion-app-"))
        self._count = 0
        self._stop: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def new_dir(self) -> Path:
        with self._lock:
            self._count += 1
            path = self.root / f"run{self._count:05d}"
            path.mkdir()
            for old in sorted(self.root.iterdir())[:-KEEP_RUNS]:
                shutil.rmtree(old, ignore_errors=True)
        return path

    def start_job(self, session: str) -> threading.Event:
        """A fresh Stop flag for the grid this browser session starts."""
        with self._lock:
            self._stop[session] = flag = threading.Event()
        return flag

    def stop(self, session: str) -> bool:
        """Set the session's Stop flag; True if a grid of this session was running."""
        with self._lock:
            flag = self._stop.get(session)
        if flag is None or flag.is_set():
            return False
        flag.set()
        return True


def render_in_background(
    comparer: Comparer, plan: GridPlan, stop: threading.Event, heartbeat: float = 0.5
) -> Iterator[tuple]:
    """Render ``plan`` in a worker thread; yield ``("step", k, step)``, ``("cell", result)`` and ``("tick",)``.

    Something is yielded after every denoising step and at least every ``heartbeat`` seconds, so Gradio can
    cancel the caller between two yields. Closing this generator (which cancelling does) sets ``stop``; the
    worker then ends the grid within the current denoising step.
    """
    events: queue.Queue = queue.Queue()

    def work() -> None:
        try:
            for result in comparer.render(plan, lambda k, step: events.put(("step", k, step)), stop.is_set):
                events.put(("cell", result))
        except BaseException as err:  # handed to the caller, which raises it on the page
            events.put(("error", err))
        events.put(("end",))

    threading.Thread(target=work, name="dora-diffusion-grid", daemon=True).start()
    try:
        while True:
            try:
                event = events.get(timeout=heartbeat)
            except queue.Empty:
                event = ("tick",)
            if event[0] == "end":
                return
            if event[0] == "error":
                raise page_error(event[1])
            yield event
    finally:
        stop.set()


@dataclass
class Results:
    """The components that show a grid."""

    gallery: gr.Gallery
    differences: gr.Gallery
    grid_image: gr.Image
    downloads: gr.File
    scores: gr.Dataframe
    cell_info: gr.Textbox
    snippet: gr.Code
    state: gr.State

    @property
    def outputs(self) -> list:
        return [self.gallery, self.differences, self.grid_image, self.downloads, self.scores, self.cell_info,
                self.snippet]  # fmt: skip


def column_widths(table) -> list[str]:
    """Widths of the per-column table's columns in % of the page, each in proportion to the longest word of its
    header or cells (at least 4 characters) plus one, so the table fits a phone's width instead of scrolling
    sideways. ``table``: ``{"headers": [...], "data": [...]}`` or the pandas DataFrame the page's table holds."""
    if not isinstance(table, dict):
        table = {"headers": [str(c) for c in table.columns], "data": table.values.tolist()}
    if not table["headers"]:
        return []

    def longest(cell) -> int:
        return max((len(w) for w in str("" if cell is None else cell).split()), default=0)

    need = [1 + max(4, longest(h), *(longest(row[k]) for row in table["data"])) for k, h in enumerate(table["headers"])]
    total = sum(need)
    return [f"{100 * n / total:.1f}%" for n in need]


def default_cell(plan: GridPlan, n_done: int) -> int:
    """Gallery index whose parameters and snippet show first: the first adapter cell, else the first cell."""
    first_adapter = 1 if plan.columns[0].adapter is None and len(plan.columns) > 1 else 0
    return min(first_adapter, n_done - 1)


class CompareEvents:
    """The handlers of the Compare tab, sharing the comparer, the run folders and the scorer."""

    def __init__(
        self,
        comparer: Comparer,
        runs: Runs,
        scorer: Scorer | None,
        upload_dir: Path,
        sources: AdapterSources | None = None,
    ) -> None:
        self.comparer = comparer
        self.runs = runs
        self.scorer = scorer
        self.upload_dir = upload_dir
        self.sources = sources or AdapterSources([upload_dir])
        """The folders the path box may read (default: ``upload_dir`` alone)."""
        self.form: Form | None = None
        self._errors: OrderedDict[str, str] = OrderedDict()
        self._errors_lock = threading.Lock()

    def names(self) -> list[str]:
        return [a.name for a in self.comparer.adapters]

    # ------------------------------------------------------------------------------------------- generate

    def plan_from_form(self, values: FormValues, adapters: object) -> GridPlan:
        """The checked grid plan of a request; bad input raises a ``gr.Error`` that names it."""
        try:
            if adapters is not None and not isinstance(adapters, dict):
                raise CompareError(f"adapters must be a {{name: strength}} mapping, got {type(adapters).__name__}")
            if not (values.prompt or "").strip():
                raise CompareError(self.empty_prompt_message())
            settings, seeds, include_base = values.settings(), values.seeds or "", bool(values.include_base)
            return self.comparer.plan_grid(settings, seeds, adapters or {}, include_base)
        except CompareError as err:
            raise page_error(err) from None

    def empty_prompt_message(self) -> str:
        """Why an empty prompt is refused, with the loaded adapters' trigger words to start from."""
        triggers = {name: words for name, words in self.comparer.trigger_words().items() if words}
        if not triggers:
            return (
                "the prompt is empty; describe the image to generate (none of the loaded adapters' files names "
                "trigger words)"
            )
        named = "; ".join(f"{name}: {', '.join(words)}" for name, words in triggers.items())
        return f"the prompt is empty; describe the image to generate, with the adapters' trigger words ({named})"

    def check(self, data: dict) -> dict:
        """Check the form and turn the ticked slots into ``{adapter: strength or [strengths]}`` for /generate."""
        values = FormValues.read(self.form, data)
        try:
            chosen = values.adapters(data[self.form.slot_names])
        except CompareError as err:
            raise page_error(err) from None
        self.plan_from_form(values, chosen)
        return chosen

    def generate(
        self,
        prompt: str,
        negative_prompt: str,
        seeds: str,
        num_inference_steps: float,
        guidance_scale: float,
        width: float,
        height: float,
        scheduler: str,
        include_base: bool,
        adapters: dict,
        difference_pair: str | None = None,
        request: gr.Request = None,
        progress=gr.Progress(),
    ):
        """Render the grid: one column per adapter and strength in ``adapters`` ({name: strength, or a list of
        strengths for a sweep}) and the base model if ``include_base``, one row per seed. Yields the gallery after
        each cell, then the difference maps, the grid PNG, the scores and a message. ``difference_pair``
        (``"a vs b"``; empty: the first DoRA and the first LoRA) is the pair whose difference maps and mean
        difference the results show besides each adapter against the base."""
        values = FormValues(prompt, negative_prompt, seeds, num_inference_steps, guidance_scale, width, height,
                            scheduler, include_base)  # fmt: skip
        p = self.plan_from_form(values, adapters)
        pair = self.chosen_pair(difference_pair, p)
        stop = self.runs.start_job(request.session_hash or "")
        out = self.runs.new_dir()
        n, n_steps, n_cols = len(p), p.settings.num_inference_steps, len(p.columns)
        n_pairs = max(1, len(difference_pairs(p.columns, self.comparer.kinds(), pair)))
        progress((0, n * n_steps), desc=f"cell 1 of {n}")
        start = time.perf_counter()
        done: list[CellResult] = []
        items, infos = [], []
        skip = (gr.skip(),) * 7
        for event in render_in_background(self.comparer, p, stop):
            if event[0] == "step":
                k, step = event[1:]
                progress((k * n_steps + step, n * n_steps), desc=f"cell {k + 1} of {n} · step {step} of {n_steps}")
            if event[0] != "cell":
                yield *skip, gr.skip(), gr.skip()  # lets a cancellation (a client's cancel) in between two steps
                continue
            result = event[1]
            c = result.cell
            name = f"r{c.row:02d}c{c.col:02d}_{c.column.label}_{format_strength(c.column.strength)}_seed{c.seed}.png"
            path = save_png(result.image, out / name, result.infotext)
            done.append(result)
            items.append((str(path), result.caption))
            snippet = self.comparer.snippet(p, c)
            infos.append({"infotext": result.infotext, "snippet": snippet, "caption": result.caption})
            # the first yield also sets the gallery's column count; later ones send plain values
            first = len(items) == 1
            gallery_value = gr.Gallery(items, columns=n_cols) if first else list(items)
            diff_value = gr.Gallery([], columns=n_pairs) if first else gr.skip()  # clears the last grid's maps
            shown = infos[default_cell(p, len(infos))]
            message = f"Rendering: {len(done)} of {n} cells done."
            yield (gallery_value, diff_value, gr.skip(), gr.skip(), gr.skip(), shown["infotext"], shown["snippet"],
                   message, infos)  # fmt: skip
        if not done:
            yield *skip, f"Stopped before the first of {n} cells finished; nothing to show.", infos
            return
        stopped = len(done) < n
        yield self.finish(p, done, out, items, infos, stopped, time.perf_counter() - start, pair)

    def chosen_pair(self, text: str | None, p: GridPlan) -> tuple[str, str] | None:
        """The difference pair ``"a vs b"`` of a request, checked; empty: ``default_pair`` of the grid's adapters."""
        kinds = self.comparer.kinds()
        if not (text or "").strip():
            return default_pair(list(dict.fromkeys(c.adapter for c in p.columns if c.adapter)), kinds)
        names = [n.strip() for n in str(text).split(" vs ")]
        if len(names) != 2 or names[0] == names[1] or any(n not in kinds for n in names):
            raise page_error(
                f"difference pair {text!r} is not two different loaded adapters written 'a vs b'; loaded: "
                f"{', '.join(kinds) or 'none'}"
            )
        return names[0], names[1]

    def pair_options(self) -> tuple[list[str], str | None]:
        """The difference pair's choices (every ordered pair of loaded adapters, ``"a vs b"``) and its default."""
        names = self.names()
        pair = default_pair(names, self.comparer.kinds())
        return [f"{a} vs {b}" for a in names for b in names if a != b], (f"{pair[0]} vs {pair[1]}" if pair else None)

    def pair_choices(self) -> gr.Dropdown:
        """``pair_options`` as an update of the Difference pair dropdown."""
        choices, value = self.pair_options()
        return gr.Dropdown(choices=choices, value=value)

    def finish(
        self, p: GridPlan, done: list[CellResult], out: Path, items, infos, stopped: bool, seconds: float,
        pair: tuple[str, str] | None = None,
    ):  # fmt: skip
        """The last yield of a grid (whole, or stopped early): difference maps, grid PNGs, scores, message."""
        images = {(r.cell.seed, r.cell.column): r.image for r in done}
        kinds = self.comparer.kinds()
        maps = difference_maps(p, images, kinds, pair)
        diff_items = []
        for k, m in enumerate(maps):
            path = save_png(m.image, out / f"diff{k:03d}_seed{m.seed}.png", m.caption)
            diff_items.append((str(path), m.caption))
        scores, score_note = self.score(p, images)
        notes = {}
        for row in scores:
            notes[row.column] = [f"{k} {v:.2f}" for k, v in row.values.items() if v is not None]
        grid = save_png(
            self.comparer.grid(p, done, partial=stopped, notes=notes),
            out / "grid.png",
            grid_infotext(p, self.comparer.model, self.comparer.default_sampler),
        )
        downloads = [str(grid)]
        if maps:
            parameters = grid_infotext(p, self.comparer.model, self.comparer.default_sampler)
            downloads.append(str(save_png(difference_grid(p, maps), out / "differences.png", parameters)))
        header = pair_header(pair, kinds) if pair else "mean |DoRA − LoRA|"
        table = column_table(p, images, scores, maps, header)
        downloads.append(str(write_table_csv(table, out / "scores.csv")))

        shown = infos[default_cell(p, len(infos))]
        n = len(p)
        message = (
            f"**Stopped after {len(done)} of {n} cells.** The partial grid is below (grey: not rendered)."
            if stopped
            else f"Done: {n} cells in {seconds:.1f} s."
        )
        if pair:
            a, b = (markdown_text(n) for n in pair)
            message += f" {markdown_text(header)} compares **{a}** with **{b}** at the same strength (Difference pair)."
        if score_note:
            message += f"\n\n{score_note}"
        return (list(items), diff_items, str(grid), downloads, table, shown["infotext"], shown["snippet"], message,
                infos)  # fmt: skip

    def score(self, p: GridPlan, images: dict) -> tuple[list, str]:
        """Scores per column and a note (why there are none, or what scored them)."""
        if self.scorer is None:
            return [], "No scores: scoring is off (start the app with --score_model to turn it on)."
        try:
            return score_columns(self.scorer, p, images), f"Scores by {self.scorer.name}."
        except ScoringUnavailable as err:
            return [], str(err)
        except Exception as err:  # noqa: BLE001 - a scorer's failure must not cost the grid
            return [], f"No scores: {self.scorer.name} failed ({type(err).__name__}: {err})."

    def request_stop(self, request: gr.Request) -> str:
        if self.runs.stop(request.session_hash or ""):
            return "Stopping: the grid ends within the current denoising step."
        return gr.skip()

    @staticmethod
    def show_cell(infos: list[dict], evt: gr.SelectData):
        if not infos or evt.index is None or evt.index >= len(infos):
            return gr.skip(), gr.skip()
        return infos[evt.index]["infotext"], infos[evt.index]["snippet"]

    # ------------------------------------------------------------------------------------------- messages

    def fail(self, request: gr.Request | None, err: Exception | str) -> gr.Error:
        """The error to raise, remembered for this browser session so ``show_error`` can write it on the page."""
        error = page_error(err)
        session = getattr(request, "session_hash", None) or ""
        with self._errors_lock:  # API clients never ask for theirs: keep the newest MAX_KEPT_ERRORS
            self._errors.pop(session, None)
            self._errors[session] = short_text(err)
            while len(self._errors) > MAX_KEPT_ERRORS:
                self._errors.popitem(last=False)
        return error

    def show_error(self, request: gr.Request) -> str:
        """The message area after a failed Load adapter, Remove or Restore: what went wrong (chained on failure)."""
        with self._errors_lock:
            message = self._errors.pop(request.session_hash or "", None)
        return f"**Not done:** {markdown_text(message)}" if message else gr.skip()

    # ------------------------------------------------------------------------------------------- adapters

    def remove_choices(self) -> gr.Dropdown:
        names = self.names()
        return gr.Dropdown(choices=names, value=None)

    def load_adapter(
        self,
        source: str,
        upload: str | None,
        name: str,
        page_names: list[str] | None = None,
        request: gr.Request = None,
    ):
        """Load adapter (``/add_adapter``): from a local path, a Hub repo id, or an uploaded .safetensors file (kept
        on disk)."""
        source, kept = str(source or "").strip(), None
        try:
            if source and upload:
                raise CompareError("give a path or Hub repo id, or upload a file, not both")
            if len(self.comparer.adapters) >= MAX_SLOTS:
                raise CompareError(f"the page shows at most {MAX_SLOTS} adapters; remove one first")
            if upload:
                if not (name or "").strip():
                    name = default_adapter_name(Path(upload).name, self.names())  # not the cache folder's name
                path, made = keep_upload(upload, self.upload_dir)
                kept, source = (path if made else None), str(path)
            file = self.sources.resolve(source)  # no lock held: a slow Hub lookup holds up no grid
            info = self.comparer.load_adapter(source, name, file)
        except Exception as err:
            if kept is not None:  # a refused upload is not kept
                forget_upload(kept, self.upload_dir)
            if isinstance(err, (CompareError, AdapterFileError, OSError, ValueError, RuntimeError)):
                raise self.fail(request, err) from None
            # e.g. a Hub error: show it and keep serving
            raise self.fail(request, f"could not load {upload or source!r}: {type(err).__name__}: {err}") from None
        adapters = self.comparer.adapters
        values = synced_slots(page_names or [], adapters)
        status = f"Loaded **{info.name}**: {info.summary}, from {code_span(info.source)}."
        return status, self.remove_choices(), self.pair_choices(), self.names(), *slot_updates(adapters, values)

    @staticmethod
    def table_layout(table) -> gr.Dataframe:
        """After a grid: the per-column table's column widths for its columns (``column_widths``). A separate step of
        the page's chain, so ``/generate`` still returns the table itself."""
        return gr.Dataframe(column_widths=column_widths(table))

    def prompt_after_load(self, prompt: str | None) -> str:
        """The prompt after an adapter was added: the person's text as it is, or, if the box is empty, the loaded
        adapters' trigger words (their files' headers; still empty when none names any)."""
        return prompt if (prompt or "").strip() else self.comparer.trigger_prompt()

    def remove_adapter(self, data: dict, request: gr.Request = None):
        """Unload the chosen adapter; the other slots keep their ticks, strengths and sweeps."""
        name = data[self.remove_choice]
        if not name:
            raise self.fail(request, "choose an adapter to remove")
        page_names = data[self.form.slot_names]
        kept = dict(zip(page_names, read_slots(self.form, data)))
        try:
            self.comparer.remove_adapter(name)
        except CompareError as err:
            raise self.fail(request, err) from None
        adapters = self.comparer.adapters
        updates = slot_updates(adapters, synced_slots(page_names, adapters, kept))
        return f"Removed **{name}**.", self.remove_choices(), self.pair_choices(), self.names(), *updates

    def remove_adapter_api(self, name: str) -> str:
        """Unload adapter ``name`` (``/remove_adapter``); returns a message. Open pages show it gone when reloaded."""
        try:
            self.comparer.remove_adapter(name)
        except CompareError as err:
            raise page_error(err) from None
        return f"Removed {name}."

    def restore(self, path: str | None, page_names: list[str] | None = None, request: gr.Request = None):
        """Fill the form from a PNG made here: a cell's settings, seed and column, or a grid's seeds and columns."""
        if not path:
            return [gr.skip()] * (len(self.form.everything) + 1)
        try:
            restored = restore_form(read_parameters(path))
        except CompareError as err:
            raise self.fail(request, err) from None
        names = page_names if page_names is not None else self.names()
        updates, missing = restored_updates(self.form, restored, names)
        what = f"grid ({len(restored.seeds)} seeds)" if restored.whole_grid else f"cell (seed {restored.seeds[0]})"
        message = f"Restored the settings of a {what}."
        if missing:
            message += f" Not loaded here: {', '.join(missing)}; add them under 'Add or remove adapters'."
        if restored.model and restored.model != self.comparer.model:  # the PNG's text, shown as text
            model, ours = code_span(short_text(restored.model, 200)), code_span(self.comparer.model)
            message += f" It was made with base model {model}; this page runs {ours}."
        return *updates, message

    def on_load(self, page_names: list[str]):
        """When a page opens, show the adapters loaded now (added or removed from other tabs since start-up).

        Slots that already show their adapter keep their values (a person may already be typing); slots shown
        anew are ticked at strength 1.
        """
        adapters = self.comparer.adapters
        updates = slot_updates(adapters, synced_slots(page_names, adapters))
        return self.remove_choices(), self.pair_choices(), self.names(), *updates
