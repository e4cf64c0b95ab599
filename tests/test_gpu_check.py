"""``benchmarks/gpu_check.py --tiny``: the GPU check's code, run on the CPU so it cannot rot before a GPU runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_tiny_prints_its_table():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--tiny", "--repeats", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.rindex("| check |") :]
    rows = [line.split("|")[1:-1] for line in table.splitlines()[2:]]
    checks = [(r[0].strip(), r[1].strip()) for r in rows]
    methods = ("ours DoRA", "ours LoRA", "PEFT DoRA", "PEFT LoRA")
    assert checks == [(f"train step {m}", t) for t in ("attn", "attn_ff") for m in methods] + [("script bf16", "attn")]
    assert all(float(r[2]) > 0 for r in rows)  # seconds per step
    assert re.search(r"losses finite True; validation image rendered", rows[-1][5])
