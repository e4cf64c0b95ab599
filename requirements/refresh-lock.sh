#!/usr/bin/env bash
# Re-resolve requirements/lock.txt from pyproject.toml (extras test + all) with pip's resolver (pip-tools), honouring
# requirements/holds.txt. pip-tools rather than uv: uv does not read pip's configuration, so on the project's
# machines it skips the local CPU wheel of torch and downloads a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${LOCK_VENV:-/tmp/dora-lock-venv}"
[ -x "$venv/bin/pip-compile" ] || { python3 -m venv "$venv" && "$venv/bin/pip" install -q --upgrade pip "pip-tools==7.6.2"; }
CUSTOM_COMPILE_COMMAND="make lock" "$venv/bin/pip-compile" -q --upgrade --extra test --allow-unsafe --strip-extras --no-emit-index-url \
  --no-emit-find-links -c requirements/holds.txt -o requirements/lock.txt pyproject.toml
# A local build label (2.13.0+cpu) would not resolve where only PyPI's 2.13.0 exists; == 2.13.0 matches both.
sed -i -E 's/^(torch==[0-9.]+)\+[a-z0-9]+$/\1/' requirements/lock.txt
# The project itself enters through its self-referencing extras ([test] includes [all]); it is not a pin.
sed -i -E '/^dora-diffusion @ /d' requirements/lock.txt
echo "requirements/lock.txt refreshed; run 'make test' before committing it"
