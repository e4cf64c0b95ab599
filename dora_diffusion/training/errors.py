"""Why a training run stopped: errors the script reports as one line, without a traceback."""


class TrainingError(RuntimeError):
    """Training had to stop (e.g. the loss became NaN); the message says what is left on disk."""
