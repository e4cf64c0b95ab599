"""Rendering: a pipeline with adapters loaded once, switching columns per cell with ``set_dora_adapters``.

A cell switches to its column with ``set_dora_adapters(name, k)`` (strength ``k`` gives ``W0 + k (W' - W0)``)
or runs the base model with ``disable_dora``; it gets a fresh scheduler and draws its noise from
``torch.Generator(device).manual_seed(seed)``, so the same request gives the same pixels.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from dora_diffusion.core.delta_kinds import KINDS
from dora_diffusion.formats import AdapterFileError, read_metadata, trigger_words
from dora_diffusion.hub import resolve_file
from dora_diffusion.pipeline import (
    AdapterRegistry,
    delete_dora_adapters,
    disable_dora,
    enable_dora,
    load_dora_weights,
    set_dora_adapters,
)
from dora_diffusion.compare.grid_image import column_legend, compose_grid, grid_zoom, row_legend
from dora_diffusion.compare.infotext import caption, infotext
from dora_diffusion.compare.plan import (
    DEFAULT_MAX_CELLS,
    SCHEDULERS,
    Cell,
    Column,
    CompareError,
    GenerationSettings,
    GridPlan,
    check_adapter_name,
    default_adapter_name,
    parse_seeds,
    plan_grid,
)
from dora_diffusion.compare.snippet import reproduce_snippet


@dataclass(frozen=True)
class AdapterInfo:
    """A loaded adapter: its column name, where it came from, and what it is."""

    name: str
    source: str
    kind: str  # "DoRA", "LoRA", or "DoRA + LoRA" when some modules have a magnitude and some not
    ranks: tuple[int, ...]
    modules: int
    file: Path | None = None
    """The resolved adapter file (None for a state dict)."""

    @property
    def summary(self) -> str:
        ranks = "/".join("full" if r == 0 else str(r) for r in self.ranks)  # 0: a side with no rank (LoKr, full diff)
        return f"{self.kind} · rank {ranks} · {self.modules} modules"


@dataclass(frozen=True)
class CellResult:
    cell: Cell
    image: Image.Image
    infotext: str
    caption: str


class _Stopped(Exception):
    """Raised inside the UNet's forward pass to end a cell in the middle of a denoising step."""


def _stop_hooks(unet: torch.nn.Module, should_stop: Callable[[], bool]) -> list:
    """Forward pre-hooks on the UNet's blocks that raise ``_Stopped`` once ``should_stop()`` is true."""

    def hook(module, args) -> None:
        if should_stop():
            raise _Stopped

    blocks = [*getattr(unet, "down_blocks", []), getattr(unet, "mid_block", None), *getattr(unet, "up_blocks", [])]
    return [b.register_forward_pre_hook(hook) for b in blocks if b is not None]


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


class Comparer:
    """A pipeline with adapters loaded once, rendering grids cell by cell.

    One lock guards the pipeline: a cell, or the loading or removal of an adapter, runs alone.
    """

    def __init__(self, pipe, model: str, max_cells: int = DEFAULT_MAX_CELLS, variant: str | None = None) -> None:
        self.pipe = pipe
        self.model = model
        self.max_cells = max_cells
        self.variant = variant
        self.device = pipe.device
        self.dtype = pipe.unet.dtype
        self._scheduler_cls = type(pipe.scheduler)
        self._scheduler_config = pipe.scheduler.config
        self._labels: dict[str, str] = {}  # adapter name -> the source as the visitor gave it
        self._lock = threading.Lock()
        pipe.set_progress_bar_config(disable=True)

    @property
    def lock(self) -> threading.Lock:
        """Held while the pipeline renders or adapters are added; hold it to read the weights safely."""
        return self._lock

    @property
    def default_size(self) -> int:
        """The base model's native image side: UNet sample size times the VAE factor (1024 for SDXL)."""
        return int(self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor)

    @property
    def default_sampler(self) -> str:
        """The model's own scheduler under its A1111 name (``"Euler"`` for SDXL), else its diffusers class name."""
        config = self._scheduler_config
        for name, (cls_name, overrides) in SCHEDULERS.items():
            if cls_name == self._scheduler_cls.__name__ and all(config.get(k) == v for k, v in overrides.items()):
                return name
        return self._scheduler_cls.__name__

    @property
    def adapters(self) -> list[AdapterInfo]:
        """Loaded adapters in load order (the pipeline's ``AdapterRegistry`` is their one record)."""
        return [self._describe(name) for name in self._names()]

    def _names(self) -> list[str]:
        return AdapterRegistry.of(self.pipe).names()

    def trigger_words(self) -> dict[str, list[str]]:
        """``{name: trigger words}`` of the loaded adapters, from their files' headers (``formats.trigger_words``:
        our ``trigger_words``, kohya's ``modelspec.trigger_phrase`` or ``ss_tag_frequency``); ``[]`` for an
        adapter whose file names none or that has no file."""
        registry = AdapterRegistry.of(self.pipe)
        out = {}
        for name in registry.names():
            file = registry.loaded[name].file
            try:
                out[name] = trigger_words(read_metadata(file)) if file is not None else []
            except (OSError, AdapterFileError):  # the file moved or changed since it was loaded
                out[name] = []
        return out

    def trigger_prompt(self) -> str:
        """A prompt made of the loaded adapters' trigger words (each once, in load order); ``""`` if none names
        any."""
        words = dict.fromkeys(w for ws in self.trigger_words().values() for w in ws)
        return ", ".join(words)

    def kinds(self) -> dict[str, str]:
        """``{name: "DoRA" | "LoRA" | "DoRA + LoRA"}`` of the loaded adapters."""
        return {a.name: a.kind for a in self.adapters}

    def resolve(self, source: str) -> Path:
        """The adapter file of ``source`` (a file, a directory holding one, or a Hub repo id, downloaded once).

        Takes no lock: a slow Hub lookup never holds up rendering. Raises ``CompareError`` for an empty source
        and ``AdapterFileError`` for one that names no adapter file.
        """
        source = str(source).strip()
        if not source:
            raise CompareError("enter a path, a Hub repo id, or upload a .safetensors file")
        return resolve_file(source)

    def load_adapter(self, source: str, name: str | None = None, file: Path | None = None) -> AdapterInfo:
        """Load an adapter (a file, a directory holding one, or a Hub repo id) under a column name.

        ``file`` is ``source``'s resolved file if the caller already has it (``resolve``). Raises ``CompareError``
        for a bad name or a file already loaded under another name, ``AdapterFileError`` if the file is missing,
        unreadable or does not fit the base model (the pipeline is then left as it was).
        """
        source = str(source).strip()
        taken = self._names()
        name = check_adapter_name(name.strip(), taken) if name and name.strip() else default_adapter_name(source, taken)
        file = file if file is not None else self.resolve(source)
        with self._lock:
            for other in self.adapters:
                if other.file is not None and _same_file(other.file, file):
                    raise CompareError(
                        f"{source} is already loaded as {other.name!r}; a strength sweep ('0, 0.5, 1') shows one "
                        "adapter at several strengths"
                    )
            if name in self._names():  # taken while this call waited for the lock
                raise CompareError(f"an adapter named {name!r} is already loaded; pick another name")
            folder = Path(source) if Path(source).is_dir() else None  # a training run's folder: also its embeddings
            if folder is not None and Path(file).parent.resolve() == folder.resolve():
                load_dora_weights(self.pipe, str(folder), weight_name=Path(file).name, adapter_name=name)
            else:
                load_dora_weights(self.pipe, str(file), adapter_name=name)
            self._labels[name] = source
        return self._describe(name)

    def remove_adapter(self, name: str) -> None:
        """Unload adapter ``name``: its modules get their original weights back and its column goes."""
        with self._lock:
            if name not in self._names():
                raise CompareError(f"no adapter named {name!r} is loaded; loaded adapters: {self._names()}")
            delete_dora_adapters(self.pipe, name)
            self._labels.pop(name, None)

    def _describe(self, name: str) -> AdapterInfo:
        registry = AdapterRegistry.of(self.pipe)
        specs = [layer.adapters[name].spec for layer in registry.all_layers() if name in layer.adapters]
        source = self._labels.get(name, "(loaded before the app started)")
        file = registry.loaded[name].file
        dora = {s.use_dora for s in specs}
        kind = "DoRA + LoRA" if len(dora) == 2 else ("DoRA" if True in dora else "LoRA")
        deltas = sorted({KINDS[s.kind].label for s in specs if s.kind != "lowrank"})
        if deltas:  # LyCORIS kinds: "LoKr DoRA", "LoHa + LoRA/LoCon LoRA"
            kind = " + ".join(deltas + (["LoRA/LoCon"] if any(s.kind == "lowrank" for s in specs) else [])) + " " + kind
        return AdapterInfo(name, source, kind, tuple(sorted({s.rank for s in specs})), len(specs), file)

    def plan_grid(
        self,
        settings: GenerationSettings,
        seeds: str | Sequence[int],
        adapters: Mapping[str, float | Sequence[float] | str],
        include_base: bool,
    ) -> GridPlan:
        """Check the request and plan its grid over the loaded adapters (``plan.plan_grid`` with ``max_cells``);
        seeds may be text like ``"0-3"``."""
        if isinstance(seeds, str):
            seeds = parse_seeds(seeds, self.max_cells)
        return plan_grid(settings, seeds, adapters, include_base, self._names(), self.max_cells)

    def source(self, column: Column) -> str | None:
        return None if column.adapter is None else self._labels.get(column.adapter, "(loaded before the app started)")

    def infotext(self, plan: GridPlan, cell: Cell) -> str:
        return infotext(plan.settings, cell, self.model, self.source(cell.column), self.default_sampler)

    def snippet(self, plan: GridPlan, cell: Cell) -> str:
        return reproduce_snippet(
            plan.settings, cell, self.model, self.source(cell.column), self.device.type, self.dtype, self.variant
        )

    def _scheduler(self, name: str):
        cls_name, overrides = SCHEDULERS[name]
        if cls_name is None:
            return self._scheduler_cls.from_config(self._scheduler_config)
        import diffusers

        return getattr(diffusers, cls_name).from_config(self._scheduler_config, **overrides)

    def render_cell(
        self,
        settings: GenerationSettings,
        cell: Cell,
        on_step: Callable[[int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Image.Image | None:
        """One image: the cell's column switched on, a fresh scheduler, noise from the cell's seed.

        Returns None if ``should_stop`` turned true: checked before each UNet block, so a stop ends the cell
        within a fraction of a denoising step.
        """
        pipe = self.pipe

        def step_end(pipe, step: int, timestep, kwargs: dict) -> dict:
            if on_step is not None:
                on_step(step + 1)
            return {}

        with self._lock:
            hooks = _stop_hooks(pipe.unet, should_stop) if should_stop is not None else []
            try:
                pipe.scheduler = self._scheduler(settings.scheduler)
                if cell.column.adapter is None:
                    disable_dora(pipe)
                else:
                    enable_dora(pipe)
                    set_dora_adapters(pipe, cell.column.adapter, cell.column.strength)
                image = pipe(
                    prompt=settings.prompt,
                    negative_prompt=settings.negative_prompt or None,
                    num_inference_steps=settings.num_inference_steps,
                    guidance_scale=settings.guidance_scale,
                    width=settings.width,
                    height=settings.height,
                    generator=torch.Generator(self.device).manual_seed(cell.seed),
                    callback_on_step_end=step_end,
                ).images[0]
            except _Stopped:
                return None
            finally:
                for h in hooks:
                    h.remove()
        return image

    def render(
        self,
        plan: GridPlan,
        on_step: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[CellResult]:
        """Render ``plan`` cell by cell in gallery order; ``on_step(cell_index, step)`` reports progress.

        Stops early, without yielding the interrupted cell, once ``should_stop()`` is true.
        """
        for k, cell in enumerate(plan.cells):
            if should_stop is not None and should_stop():
                return
            step_cb = None if on_step is None else (lambda step, k=k: on_step(k, step))
            image = self.render_cell(plan.settings, cell, step_cb, should_stop)
            if image is None:
                return
            yield CellResult(cell, image, self.infotext(plan, cell), caption(cell))

    def grid(
        self,
        plan: GridPlan,
        results: Sequence[CellResult],
        partial: bool = False,
        notes: Mapping[Column, Sequence[str]] | None = None,
    ) -> Image.Image:
        """The composite grid image of a plan, with legends and the prompt as title.

        ``partial=True`` accepts a grid stopped early (its missing cells drawn grey); ``notes`` adds lines under
        a column's legend (e.g. its scores). Images under 256 px are zoomed by a whole factor (nearest neighbour).
        """
        if len(results) != len(plan) and not (partial and results):
            raise ValueError(f"the grid needs all {len(plan)} cells, got {len(results)}")
        n = len(plan.columns)
        rows: list[list[Image.Image | None]] = [[None] * n for _ in plan.seeds]
        for r in results:
            rows[r.cell.row][r.cell.col] = r.image
        notes = notes or {}
        return compose_grid(
            rows,
            [row_legend(s) for s in plan.seeds],
            [column_legend(c) + list(notes.get(c, ())) for c in plan.columns],
            plan.settings.prompt,
            zoom=grid_zoom(plan.settings.width, plan.settings.height),
        )
