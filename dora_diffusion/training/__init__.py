"""DreamBooth training of DoRA / LoRA adapters for SDXL (``train_dreambooth_dora.py``).

``main(argv)`` runs the whole script and returns the output folder; ``parse_args(argv)`` only parses.
Modules: ``args`` (flags), ``data`` (reading images and captions), ``dataset`` (crops, micro-conditioning,
batch order), ``prior`` (class images), ``models`` (SDXL components, adapters), ``loss``, ``optim``,
``checkpoint``, ``rundir`` (output folder rules), ``validation``, ``summary``, ``model_card``, ``hub``,
``loop`` (the run).
"""

from dora_diffusion.training.args import parse_args
from dora_diffusion.training.output.checkpoint import CheckpointError, list_checkpoints
from dora_diffusion.training.data.records import DatasetError
from dora_diffusion.training.errors import TrainingError, TrainingInterrupted
from dora_diffusion.training.run import main, train
from dora_diffusion.training.output.rundir import OutputDirError

__all__ = ["CheckpointError", "DatasetError", "OutputDirError", "TrainingError", "TrainingInterrupted", "list_checkpoints", "main", "parse_args", "train"]
