"""Stop training cleanly on SIGTERM (preemptible GPUs, schedulers) and SIGINT (Ctrl-C).

The handler only records the signal; the loop finishes the optimizer step it is in, saves a checkpoint and stops
(``TrainingInterrupted``). A second signal of the same kind acts as it would without us (SIGTERM ends the process,
SIGINT raises ``KeyboardInterrupt``), so a stuck save can still be interrupted.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """The first of ``SIGNALS`` received (``signum``), or None."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, object] = {}

    def __call__(self, signum: int, frame) -> None:
        self.signum = signum
        signal.signal(signum, self.previous[signum])  # the next one acts as usual


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Record SIGTERM / SIGINT for the duration of the block, then restore the handlers that were there.

    Off the main thread (where Python cannot install handlers) nothing is installed and ``signum`` stays None.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    for signum in SIGNALS:
        request.previous[signum] = signal.signal(signum, request)
    try:
        yield request
    finally:
        for signum, handler in request.previous.items():
            signal.signal(signum, handler)
