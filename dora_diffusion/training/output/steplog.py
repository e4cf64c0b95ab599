"""``output_dir/training_log.jsonl``: one ``{"step", "loss", "lr", "time"}`` line per optimizer step (main process;
``time`` is the Unix time the step ended).

Plain text so a UI can plot the loss curve without a tracker; a resumed run keeps the lines up to its
checkpoint and appends from there.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

LOG_FILE = "training_log.jsonl"


class StepLog:
    """Append-only step log; ``start_step`` drops lines of steps after it (left by an interrupted run)."""

    def __init__(self, output_dir: str | Path, start_step: int = 0) -> None:
        self.path = Path(output_dir) / LOG_FILE
        kept = [row for row in read_step_log(output_dir) if row["step"] <= start_step] if start_step else []
        self.path.write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")

    def write(self, step: int, loss: float, lr: float) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "loss": loss, "lr": lr, "time": round(time.time(), 3)}) + "\n")


def read_step_log(output_dir: str | Path) -> list[dict]:
    """The rows of ``training_log.jsonl`` (empty if there is none). NaN losses are read back as NaN.

    Lines that are not a JSON object with an integer ``step`` (a last line half-written when the run was
    killed, a damaged line) are skipped.
    """
    path = Path(output_dir) / LOG_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and not isinstance(row["step"], bool):
            rows.append(row)
    return rows
