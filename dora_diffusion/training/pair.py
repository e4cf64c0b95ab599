"""``--adapter dora,lora``: a DoRA and a LoRA trained as a pair, then shown side by side.

The pair is two ``TrainingRun``s in one process, one after the other (in the order given), each into its own folder,
``<output_dir>/dora`` and ``<output_dir>/lora``. Each half is exactly the run ``--adapter dora`` (or ``lora``) with
the same other flags would be: the same code, started from the same random state (``torch.manual_seed`` of
``ADAPTER_INIT`` before it reads its data, and the random state the first half had just before its adapter was added,
restored before the second half's), and every micro-batch reseeds from ``(seed, micro-batch, process)``, so the data
order, crops, flips, noise, timesteps and dropout masks are the same and the method is the only difference. What the
second half takes from the first instead of making it again: the loaded models (its adapter taken off again), the
class images (on disk), the cached latents and the prompt embeddings (and with them the dataset's cropped pixels).
With pivotal tuning the text encoders and tokenizers change, so the second half loads its own models.

A lockstep design (both adapters on one model, a step of each per batch) would load the model once as well, but it
needs two adapters' activations and optimiser states at once, its own checkpoints, and would train the two through
other code than a single run's. One after the other needs nothing new to be exact, resumes with the single run's
checkpoints, and peaks at one adapter's memory.

``<output_dir>`` itself holds ``pair.json`` (which halves finished, with their settings: a resumed pair does not
train a finished half again) and ``pair_grid.png`` (base | DoRA | LoRA at the validation seeds, scored by the
toy-world scorer on the toy world, by CLIP elsewhere when a CLIP model is at hand), recorded in its own
``run_files.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dora_diffusion.core.inject import remove_adapter
from dora_diffusion.formats import DEFAULT_WEIGHT_NAME
from dora_diffusion.extras import require
from dora_diffusion.training.args import PAIR, default_output_dir, parse_args
from dora_diffusion.training.config import TrainConfig
from dora_diffusion.training.data.sampling import ADAPTER_INIT, derive_seed
from dora_diffusion.training.distributed import make_accelerator, refuse_sharding
from dora_diffusion.training.errors import CheckpointError, OutputDirError, TrainingError
from dora_diffusion.training.models import ADAPTER_NAME, Components, load_components
from dora_diffusion.training.output.checkpoint import list_checkpoints
from dora_diffusion.training.output.rundir import (
    LOCK_FILE,
    PAIR_FILE,
    SETTINGS_FILE,
    RunFiles,
    all_differences,
    holds_run,
    run_lock,
    with_resolved_paths,
    write_json_atomic,
)
from dora_diffusion.training.run import DTYPES, TrainingRun
from dora_diffusion.training.run import train as train_one

logger = logging.getLogger(__name__)

GRID_FILE = "pair_grid.png"
"""In the pair's folder: base | DoRA | LoRA at the validation seeds, with each column's scores."""


@dataclass
class PairShared:
    """What the second half of a pair takes from the first instead of making it again."""

    components: Components | None = None
    data: tuple | None = None
    """``(dataset, latents, prompts)``: the samples and the latent and prompt sources with their caches."""
    rng: tuple | None = None
    """The random state just before the first adapter was added (CPU, and the CUDA device's)."""


def rng_state(device: torch.device) -> tuple:
    """torch's random state on the CPU and on ``device`` (when it is a CUDA device)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_rng_state(state: tuple, device: torch.device) -> None:
    """Restore a ``rng_state``."""
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def half_config(config: TrainConfig, kind: str, started: bool = False) -> TrainConfig:
    """The config of the pair's ``kind`` half: the single run ``--adapter kind --output_dir <output_dir>/kind``. With
    ``--push_to_hub`` each half goes to its own repo: ``<hub_model_id>-<kind>``, or ``<dataset>-sdxl-<kind>``.

    ``--resume_from_checkpoint latest`` continues the pair: once the pair has ``started`` (a half finished or holds a
    checkpoint), a half with no run yet starts (its ``auto``); before that, ``latest`` stops as a single run's does."""
    hub_id = config.hub_model_id
    if config.push_to_hub:
        hub_id = f"{hub_id}-{kind}" if hub_id else default_output_dir(config.dataset, kind)
    resume = "auto" if config.resume_from_checkpoint == "latest" and started else config.resume_from_checkpoint
    return config.resolved(
        adapter=kind, output_dir=str(Path(config.output_dir) / kind), hub_model_id=hub_id,
        use_dora=config.use_dora and kind == "dora", resume_from_checkpoint=resume,
    )  # fmt: skip


def half_export_stem(output_dir: Path, kind: str) -> str:
    """What the exports of the pair in ``output_dir``'s ``kind`` half are named after: the pair folder's name with its
    ``-dora-lora`` (or ``-lora-dora``) replaced by ``-<kind>``, else with ``-<kind>`` added (``3d_icon-sdxl-dora-lora``
    -> ``3d_icon-sdxl-dora_kohya.safetensors``, the name of the single run and of the half's Hub repo; ``mine`` ->
    ``mine-lora_comfyui.safetensors``). Not the half's folder name: two pairs' ``dora_kohya.safetensors`` would
    overwrite each other in ComfyUI's or kohya's one folder of LoRA files."""
    name = output_dir.resolve().name
    for both in ("-dora-lora", "-lora-dora"):
        if name.endswith(both) and len(name) > len(both):
            return f"{name[: -len(both)]}-{kind}"
    return f"{name}-{kind}"


def pair_started(output_dir: Path, record: dict) -> bool:
    """True if a half of the pair in ``output_dir`` finished (``pair.json``) or holds a checkpoint."""
    return bool(record["finished"]) or any(list_checkpoints(output_dir / kind) for kind in PAIR)


class PairHalf(TrainingRun):
    """One half of a pair: a ``TrainingRun`` that takes the models and the data caches from ``shared`` when the other
    half made them, and gives them there when it makes them (``share``)."""

    def __init__(self, config: TrainConfig, accelerator, held: contextlib.ExitStack, shared: PairShared, share: bool) -> None:
        super().__init__(config, accelerator, held)
        self.shared, self.share = shared, share
        self.kind = config.adapter
        self.next_steps = False
        self.finished = False
        self.start_state: tuple | None = None

    @property
    def export_stem(self) -> str:
        return half_export_stem(self.output_dir.parent, self.kind)

    def _components(self, weight_dtype: torch.dtype) -> Components:
        if self.shared.components is not None:
            return self.shared.components
        components = super()._components(weight_dtype)
        if self.share:
            self.shared.components = components
        return components

    def _add_adapters(self) -> None:
        if self.shared.rng is None:
            self.shared.rng = rng_state(self.device)
        else:  # what a run that loaded the models itself would draw from (loading may draw, or not)
            set_rng_state(self.shared.rng, self.device)
        super()._add_adapters()

    def _data_pipeline(self) -> None:
        if self.shared.data is None:
            super()._data_pipeline()
            if self.share:
                self.shared.data = (self.dataset, self.latents, self.prompts)
            return
        self.dataset, self.latents, self.prompts = self.shared.data
        self.ti_frozen = True  # shared only without pivotal tuning
        if self.offload:  # where the first half left them: the caches are full
            if not self.prompts.trained:
                self.components.text_encoder.to("cpu"), self.components.text_encoder_2.to("cpu")
            if self.config.cache_latents:
                self.components.vae.to("cpu")

    def release(self) -> None:
        """Take this half's adapter off the models, which are then as loaded (for the other half, or the grid)."""
        for model in self.models.values():
            remove_adapter(model, ADAPTER_NAME)

    def let_go(self) -> None:
        """Drop what this half holds (models, caches, optimiser) once it finished: what is shared stays in ``shared``."""
        for name in ("components", "models", "named", "params", "optimizer", "lr_scheduler", "ema", "dataset", "latents", "prompts", "batches"):
            setattr(self, name, None)
        self.accelerator.free_memory()  # its references to the prepared optimizer; empties the CUDA cache


# -------------------------------------------------------------------------------------------------- the pair folder


def check_pair_folder(output_dir: Path) -> RunFiles:
    """Raise ``OutputDirError`` if ``output_dir`` is a single run's folder, or holds a ``pair.json`` or
    ``pair_grid.png`` of the user's; returns its manifest. Writes nothing."""
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputDirError(f"--output_dir {output_dir} is a file")
    if holds_run(output_dir) or (output_dir / SETTINGS_FILE).is_file():
        raise OutputDirError(
            f"--output_dir {output_dir} holds a single run (its {SETTINGS_FILE}, weights or checkpoints); a pair writes "
            f"{output_dir}/dora and {output_dir}/lora beside each other and would mix with it. Choose another --output_dir "
            "for the pair"
        )
    files = RunFiles(output_dir)
    taken = files.conflicts([PAIR_FILE, GRID_FILE])
    if taken:
        raise OutputDirError(
            f"--output_dir {output_dir} holds {', '.join(taken)}, which the pair would write but no run of ours wrote; "
            "they are left alone. Move them or choose another --output_dir"
        )
    return files


def read_record(output_dir: Path) -> dict:
    """``pair.json``: ``{"finished": {kind: settings}}`` (empty when there is none)."""
    path = output_dir / PAIR_FILE
    if not path.is_file():
        return {"finished": {}}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record.get("finished"), dict):
            raise ValueError("no 'finished' table")
    except (OSError, ValueError, AttributeError) as err:
        raise OutputDirError(
            f"{path} is damaged ({err}), so which half of the pair finished is unknown; delete it (both halves then "
            "resume from their checkpoints) or choose another --output_dir"
        ) from None
    return record


def is_finished(half: PairHalf, record: dict) -> bool:
    """True if ``pair.json`` says ``half`` finished with exactly these settings and its weights are there: resuming the
    pair does not train it again (another ``--max_train_steps`` or learning rate trains it on from its checkpoint)."""
    recorded = record["finished"].get(half.kind)
    if not isinstance(recorded, dict) or not (half.output_dir / DEFAULT_WEIGHT_NAME).is_file():
        return False
    return not all_differences(recorded, with_resolved_paths(half.settings))


# -------------------------------------------------------------------------------------------------- train


def main(argv: list[str] | None = None) -> Path:
    """Run ``train_dreambooth_dora.py`` with ``argv`` (default: ``sys.argv[1:]``): one run, or the pair of
    ``--adapter dora,lora``; returns the output folder (the pair's, holding ``dora/`` and ``lora/``)."""
    return train(parse_args(argv))


def train(args: argparse.Namespace | TrainConfig) -> Path:
    """Train with parsed flags or a ``TrainConfig``: ``train_pair`` for ``--adapter dora,lora``, else ``run.train``."""
    config = args if isinstance(args, TrainConfig) else TrainConfig.from_args(args)
    if "," in config.adapter:
        require("train", "training", ("accelerate",))
        refuse_sharding()
        return train_pair(config)
    return train_one(config)


def train_pair(config: TrainConfig) -> Path:
    """Train ``--adapter dora,lora`` (or ``lora,dora``: that order): both halves' data, checkpoints and output folders
    are checked before any model loads; then each half trains, sharing what it can; then the grid. Returns
    ``output_dir``. The caller's torch random state is restored afterwards."""
    kinds = config.adapter.split(",")
    if sorted(kinds) != sorted(PAIR):
        raise TrainingError(f"--adapter {config.adapter}: a pair is dora,lora or lora,dora")
    out = Path(config.output_dir)
    pair_files = check_pair_folder(out)
    record = read_record(out) if not config.overwrite_output_dir else {"finished": {}}
    halves: list[PairHalf] = []
    shared = PairShared()
    share = not config.train_text_encoder_ti  # pivotal tuning changes the tokenizers and text encoders
    started = pair_started(out, record)
    accelerators = {k: make_accelerator(half_config(config, k), out / k) for k in kinds}  # (accelerator, precision)
    first_acc = accelerators[kinds[0]][0]
    device = first_acc.device
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        with contextlib.ExitStack() as held:
            for kind in kinds:
                acc, precision = accelerators[kind]
                c = half_config(config, kind, started).resolved(mixed_precision=precision)
                half = PairHalf(c, acc, held, shared, share)
                torch.manual_seed(derive_seed(config.seed, ADAPTER_INIT))  # as train() seeds a single run
                half.read()
                half.finished = config.resume_from_checkpoint is not None and is_finished(half, record)
                if not half.finished:
                    try:
                        half.check()
                    except (OutputDirError, CheckpointError, TrainingError) as err:  # name the half in the message
                        if type(err) not in (OutputDirError, CheckpointError, TrainingError):
                            raise
                        raise type(err)(f"the {kind} half of --adapter {config.adapter}: {err}") from None
                half.start_state = rng_state(device)
                halves.append(half)
            main_process = first_acc.is_main_process
            if main_process:
                held.enter_context(run_lock(out))  # a second pair into this folder stops here
                if config.overwrite_output_dir:
                    pair_files.clear()
                pair_files.adopt([LOCK_FILE])
                pair_files.save()
            for half in halves:
                if half.finished:
                    first_acc.print(f"{half.kind}: finished in an earlier run of this pair ({out / PAIR_FILE}); not trained again", flush=True)
                    continue
                first_acc.print(f"--- {half.kind} ({kinds.index(half.kind) + 1} of 2): {half.output_dir}", flush=True)
                set_rng_state(half.start_state, device)
                half.build()
                half.train()
                half.finish()
                half.release()
                if main_process:
                    record["finished"][half.kind] = with_resolved_paths(half.settings)
                    write_json_atomic(pair_files.claim(PAIR_FILE), record)
                half.accelerator.wait_for_everyone()
                half.let_go()
            if main_process:
                print(pair_report(config, out, halves, shared, pair_files, device, first_acc), flush=True)
            first_acc.wait_for_everyone()
    return out


# -------------------------------------------------------------------------------------------------- the grid


def pair_report(
    config: TrainConfig, out: Path, halves: list[PairHalf], shared: PairShared, files: RunFiles, device: torch.device,
    accelerator,
) -> str:
    """Render the grid (``pair_grid_image``) and say where everything is, with the page's command."""
    from dora_diffusion.compare import CompareError, grid_infotext, save_png
    from dora_diffusion.formats import AdapterFileError

    half = halves[0]
    folders = {h.kind: h.output_dir for h in halves}
    lines = [f"pair: {', '.join(f'{k} {folders[k]}' for k in PAIR)} (the same data order, noise, timesteps and seeds)"]
    prompt = half.config.validation_prompt
    pivotal = config.train_text_encoder_ti
    if not prompt:
        lines.append("grid: none (--validation_prompt none)")
    elif pivotal:
        lines.append(
            "grid: none: both halves add the same new tokens (pivotal tuning), which one pipeline cannot hold twice; "
            f"compare their validation images in {folders['dora'] / 'validation'} and {folders['lora'] / 'validation'}"
        )
    else:
        components = shared.components
        if components is None:  # both halves finished earlier
            components = load_components(half.config, DTYPES[half.config.mixed_precision])
        try:
            grid, table = pair_grid_image(half.config, components, folders, device, accelerator)
        except (CompareError, AdapterFileError) as err:
            lines.append(f"grid: not made ({err}); the adapters are saved")
        else:
            infotext = grid_infotext(grid["plan"], grid["model"], grid["sampler"])
            path = save_png(grid["image"], files.claim(GRID_FILE), infotext)
            seeds = grid["plan"].seeds
            rows = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}-{seeds[-1]}"
            lines.append(f"grid: {path} (base | DoRA | LoRA, {rows}, {prompt!r})")
            lines += table
    q = shlex.quote
    page = f"python app.py --base {q(str(config.pretrained_model_name_or_path))}"
    if pivotal:
        lines.append(f"open each in the page (one at a time: the same new tokens): {page} --adapter dora={q(str(folders['dora']))}")
        lines.append(f"  and {page} --adapter lora={q(str(folders['lora']))}")
    else:
        lines.append(f"open both in the page: {page} --adapter dora={q(str(folders['dora']))} --adapter lora={q(str(folders['lora']))}")
    return "\n".join(lines)


def pair_grid_image(config: TrainConfig, components: Components, folders: dict[str, Path], device: torch.device, accelerator) -> tuple[dict, list[str]]:
    """Base | DoRA | LoRA at the validation seeds (``seed + i``, ``i < --num_validation_images``), prompt, steps,
    guidance and size, rendered by the comparison page's ``Comparer`` on the loaded models, with each column's scores
    under its legend. Returns ``({"image", "plan", "model", "sampler"}, lines of the score table)``."""
    from dora_diffusion.compare import Comparer, GenerationSettings, ScoringUnavailable, score_columns
    from dora_diffusion.training.images import validation_pipeline

    for model in (components.unet, components.text_encoder, components.text_encoder_2, components.vae):
        nn.Module.to(model, device)
        model.eval()
    pipe = validation_pipeline(components, components.unet, device)  # DPM-Solver++, as the validation images
    base = str(config.pretrained_model_name_or_path)
    n = config.num_validation_images
    comparer = Comparer(pipe, base, max_cells=3 * n)
    for kind in PAIR:
        comparer.load_adapter(str(folders[kind]), kind)
    settings = GenerationSettings(
        config.validation_prompt, num_inference_steps=config.validation_inference_steps,
        guidance_scale=config.validation_guidance_scale, width=config.resolution, height=config.resolution,
    )  # fmt: skip
    plan = comparer.plan_grid(settings, [config.seed + i for i in range(n)], {k: 1.0 for k in PAIR}, include_base=True)
    try:
        with accelerator.autocast():
            results = list(comparer.render(plan))
    finally:
        for kind in PAIR:
            comparer.remove_adapter(kind)
    images = {(r.cell.seed, r.cell.column): r.image for r in results}
    table, notes = [], {}
    try:
        scorer = grid_scorer(config, device)
        if scorer is None:
            raise ScoringUnavailable("no scorer for this base")
        scores = score_columns(scorer, plan, images)
    except ScoringUnavailable as err:
        table.append(str(err) if str(err).startswith("no scores") else f"no scores: {err}")
    else:
        table.append(f"scores ({scorer.name}, mean over {n} images):")
        for row in scores:
            notes[row.column] = [f"{k} {v:.2f}" for k, v in row.values.items()]
            table.append(f"  {row.column.label:>5}: " + ", ".join(notes[row.column]))
    grid = comparer.grid(plan, results, notes=notes)
    return {"image": grid, "plan": plan, "model": base, "sampler": comparer.default_sampler}, table


def grid_scorer(config: TrainConfig, device: torch.device):
    """The toy-world scorer on the toy world's model; else CLIP (``compare.scores.DEFAULT_CLIP``, with the dataset's
    images as instances when it is a local folder of images), which raises ``ScoringUnavailable`` when no CLIP model
    can be loaded."""
    from dora_diffusion.compare.scores import DEFAULT_CLIP, INSTANCE_SUFFIXES, ClipScorer, ToyWorldScorer, is_toyworld_model

    if is_toyworld_model(str(config.pretrained_model_name_or_path)):
        return ToyWorldScorer()
    data = Path(config.dataset)
    local = data.is_dir() and any(p.suffix.lower() in INSTANCE_SUFFIXES for p in data.iterdir())
    return ClipScorer(DEFAULT_CLIP, str(data) if local else None, device.type)


__all__ = [
    "GRID_FILE", "PAIR_FILE", "PairHalf", "PairShared", "check_pair_folder", "half_config", "half_export_stem", "main",
    "pair_grid_image", "train", "train_pair",
]  # fmt: skip
