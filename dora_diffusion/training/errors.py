"""Why a training run stopped: errors the script reports as one line, without a traceback."""


class TrainingError(RuntimeError):
    """Training had to stop (e.g. the loss became NaN); the message says what is left on disk."""


class TrainingInterrupted(TrainingError):
    """SIGTERM or SIGINT stopped training after a checkpoint was saved; ``signum`` is the signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
