"""Why a training run stopped: every error the script reports as one line, without a traceback."""


class TrainingError(RuntimeError):
    """Training had to stop (e.g. the loss became NaN); the message says what is left on disk."""


class TrainingInterrupted(TrainingError):
    """SIGTERM or SIGINT stopped training after a checkpoint was saved; ``signum`` is the signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class OutputDirError(ValueError):
    """The output directory holds something this run must not overwrite."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names it and says why."""


class DatasetError(ValueError):
    """The dataset cannot be used for training; the message says why and what to do."""


class ShardingNotSupported(TrainingError):
    """An accelerate config asks for DeepSpeed or FSDP, which this script does not support."""


class NonFiniteImages(TrainingError):
    """The pipeline rendered NaN or infinite pixels (usually an fp16 overflow)."""
