#!/usr/bin/env python3
"""The suite on the newest upstream releases, without the lock; names the package that broke each failing test.

    make test-latest            # or: python3 requirements/test_latest.py [--venv DIR] [-- PYTEST ARGS]

1. A fresh venv gets ``-e .[test]`` at the newest releases the ranges in pyproject.toml allow, torch excepted (held
   at 2.13.0, the CPU build: newer torch from PyPI is a multi-GB CUDA build), then runs the suite.
2. Every package whose version differs from requirements/lock.txt is a suspect. For each suspect, the script
   installs the locked version of that package alone, reruns the failing tests, and restores the newest: a test
   that passes with the locked version was broken by that release.
This never gates CI: it tells whoever refreshes the lock what to hold back (requirements/holds.txt) or fix.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The packages named in pyproject.toml are tried first: they are the likeliest culprits.
DIRECT = ["transformers", "diffusers", "peft", "accelerate", "huggingface-hub", "safetensors", "datasets", "gradio",
          "matplotlib", "pillow", "numpy", "lycoris-lora", "tensorboard", "playwright", "pytest", "prodigyopt"]


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line.strip())
        if m:
            pins[canon(m[1])] = m[2].split("+")[0]
    return pins


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, text=True, **kw)


def failing_tests(py: str, junit: Path, tests: list[str] | None, pytest_args: list[str]) -> list[str]:
    junit.unlink(missing_ok=True)
    run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *(tests or []), *pytest_args])
    if not junit.exists():
        raise SystemExit("pytest wrote no report (collection crashed?); see its output above")
    failed = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            path = case.get("classname", "").replace(".", "/") + ".py"
            failed.append(f"{path}::{case.get('name')}")
    return failed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--venv", default="/tmp/dora-latest-venv")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = p.parse_args()
    venv = Path(args.venv)
    run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    py, pip = str(venv / "bin" / "python"), [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    run([*pip, "--upgrade", "pip"], check=True)
    # torch stays at the CPU build: newer releases from PyPI are multi-GB CUDA builds (eager upgrades would take one)
    hold_torch = venv / "torch-constraint.txt"
    hold_torch.write_text("torch==2.13.0\n")
    run([*pip, "--upgrade", "--upgrade-strategy", "eager", "-c", str(hold_torch), "-e", ".[test]"], check=True)
    newest = read_pins(run([py, "-m", "pip", "freeze"], capture_output=True, check=True).stdout)
    locked = read_pins((ROOT / "requirements" / "lock.txt").read_text())
    changed = {n: (locked[n], v) for n, v in newest.items() if n in locked and locked[n] != v}
    print("\nNewer than the lock:", ", ".join(f"{n} {a} -> {b}" for n, (a, b) in sorted(changed.items())) or "nothing")
    junit = venv / "junit.xml"
    failed = failing_tests(py, junit, None, args.pytest_args)
    if not failed:
        print("\nThe suite passes on the newest releases: the lock can be refreshed (make lock).")
        return 0
    print(f"\n{len(failed)} tests fail on the newest releases. Trying each newer package at its locked version:")
    blame: dict[str, list[str]] = {}
    remaining = list(failed)
    suspects = sorted(changed, key=lambda n: (DIRECT.index(n) if n in DIRECT else len(DIRECT), n))
    for name in suspects:
        if not remaining:
            break
        old, new = changed[name]
        if run([*pip, "-c", str(hold_torch), f"{name}=={old}"]).returncode != 0:
            print(f"  {name}: the locked {old} does not install beside the newest rest; skipped")
            continue
        still = failing_tests(py, junit, remaining, args.pytest_args)
        fixed = [t for t in remaining if t not in still]
        if fixed:
            blame[f"{name} {new} (locked {old})"] = fixed
            remaining = still
        run([*pip, "-c", str(hold_torch), f"{name}=={new}"], check=True)
    print("\n=== which upstream release broke which tests ===")
    for culprit, tests in blame.items():
        print(f"{culprit}:")
        for t in tests:
            print(f"    {t}")
    if remaining:
        print("not explained by any single package (a combination, or flaky):")
        for t in remaining:
            print(f"    {t}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
