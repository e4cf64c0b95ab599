"""DreamBooth training of DoRA / LoRA adapters for SDXL (``train_dreambooth_dora.py``).

``main(argv)`` runs the whole script and returns the output folder; ``parse_args(argv)`` only parses. The run:
``args`` (flags) -> ``config`` (``TrainConfig``, frozen) -> ``plan`` (schedule, triggers, planned outputs) ->
``run`` (``TrainingRun``: setup / train / finish), with ``models`` (SDXL components, adapters), ``distributed``,
``signals``, ``summary`` and ``errors`` beside it; ``pair`` (``--adapter dora,lora``: two runs sharing their setup,
then a base | DoRA | LoRA grid) above it. Rooms: ``data/`` (what a run reads), ``step/`` (one training step:
objective, loss, optimiser, pivotal tuning), ``output/`` (what a run writes). docs/architecture.md walks it.
"""

from dora_diffusion.training.args import parse_args
from dora_diffusion.training.config import TrainConfig
from dora_diffusion.training.errors import CheckpointError, DatasetError, OutputDirError, TrainingError, TrainingInterrupted
from dora_diffusion.training.output.checkpoint import list_checkpoints
from dora_diffusion.training.pair import main, train
from dora_diffusion.training.run import TrainingRun

__all__ = [
    "CheckpointError",
    "DatasetError",
    "OutputDirError",
    "TrainConfig",
    "TrainingError",
    "TrainingInterrupted",
    "TrainingRun",
    "list_checkpoints",
    "main",
    "parse_args",
    "train",
]
