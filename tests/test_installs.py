"""Installs: the lock CI and the README use, the version floors, and the optional extras.

The core (``pip install dora-diffusion``) must load, fuse, save and convert adapters with every extra absent;
a command that needs a missing extra must name it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXTRA_MODULES = ("gradio", "matplotlib", "datasets", "accelerate")
CORE = {"torch", "diffusers", "transformers", "safetensors", "huggingface_hub", "pillow", "numpy"}



def core_closure() -> set[str]:
    """Canonical names of the distributions ``pip install dora-diffusion`` installs: the core and what it requires."""
    from importlib.metadata import distribution

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    todo, seen = [canonicalize_name(n) for n in CORE], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for text in distribution(name).requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return seen


@pytest.fixture(scope="module")
def core_only(tmp_path_factory) -> Path:
    """A site-packages view holding only what ``pip install dora-diffusion`` installs (no extra, no test reference).

    Each file of those distributions (and its ``.dist-info``) is linked into a fresh folder: to ``import`` and to
    ``importlib.metadata`` (which diffusers asks) gradio, matplotlib, datasets, accelerate, peft... are not installed.
    """
    from importlib.metadata import distribution

    view = tmp_path_factory.mktemp("core-only-site")
    for name in core_closure():
        dist = distribution(name)
        for f in dist.files or []:
            top = f.parts[0]
            if top == ".." or top.endswith(".pth") or (view / top).exists():
                continue
            (view / top).symlink_to(Path(dist.locate_file(top)))
    assert not {m for m in EXTRA_MODULES if (view / m).exists()}, "an extra is a dependency of the core"
    return view


def run_without_extras(view: Path, code: str, *argv: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a child interpreter that sees only ``view`` (not site-packages) and this checkout."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{view}"}
    return subprocess.run(
        [sys.executable, "-S", "-c", textwrap.dedent(code), *argv],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )


def readme_command(heading_text: str) -> str:
    """The first shell line of the code block that follows ``heading_text`` in the README."""
    readme = (ROOT / "README.md").read_text()
    after = readme[readme.index(heading_text) :]
    return re.search(r"```bash\n(.+?)\n", after).group(1)


def test_ci_runs_the_readme_test_command_through_the_lock():
    command = readme_command("Run the tests")
    assert command == 'pip install -c requirements/lock.txt -e ".[test]" && python -m pytest -q'
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in ci, "the last step of .ci/run must be the README's test command, verbatim"
    assert "-c requirements/lock.txt" in readme_command("Quick start")


def test_lock_pins_every_package_exactly():
    lines = [
        line.strip()
        for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    pins = dict(line.split("==", 1) for line in lines)
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][A-Za-z0-9.]*", line) for line in lines), "only name==version"
    assert pins["torch"] == "2.13.0"  # no local label: resolves to the CPU build here and to PyPI's 2.13.0 elsewhere
    # every dependency of the project and of its extras is in the lock
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + [d for group in project["optional-dependencies"].values() for d in group]
    names = {re.split(r"[<>=!~\[ ;]", d)[0].lower().replace("_", "-") for d in wanted} - {"dora-diffusion"}
    locked = {n.lower().replace("_", "-") for n in pins}
    assert names <= locked, f"not in requirements/lock.txt: {sorted(names - locked)}"
    # the hold for the PEFT break is in the lock: transformers >= 5.24 refuses peft 0.21
    major, minor = (int(x) for x in pins["transformers"].split(".")[:2])
    assert (major, minor) < (5, 24)


def test_pyproject_states_the_version_of_the_package():
    """pyproject.toml writes the version out; dora_diffusion/_version.py is what the code reports."""
    import dora_diffusion
    from dora_diffusion._version import __version__

    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"] == __version__
    assert dora_diffusion.__version__ == __version__


def test_runtime_ranges_have_justified_floors_and_no_test_references():
    text = (ROOT / "pyproject.toml").read_text()
    project = tomllib.loads(text)["project"]
    core = {re.split(r"[<>=!~\[ ;]", d)[0].lower().replace("-", "_") for d in project["dependencies"]}
    assert core == CORE
    for dep in project["dependencies"] + [d for g in project["optional-dependencies"].values() for d in g]:
        if dep.startswith("dora-diffusion["):
            continue
        assert ">=" in dep, f"{dep}: no lower bound"
        assert "<" not in dep.replace(">=", ""), f"{dep}: upper bound without a known break"
        line = next(line for line in text.splitlines() if f'"{dep}"' in line)
        assert "#" in line, f"{dep}: say why this is the floor, in a comment on its line"
    assert not any(d.startswith("peft") for d in project["dependencies"])
    torch_floor = next(d for d in project["dependencies"] if d.startswith("torch"))
    assert torch_floor == "torch>=2.4"  # torch.get_autocast_dtype, is_autocast_enabled(device_type)


def test_core_loads_fuses_saves_and_converts_without_any_extra(core_only, tmp_path):
    code = """
    import sys, torch
    import dora_diffusion
    from dora_diffusion import AdapterConfig, add_adapter
    from dora_diffusion.core.inject import adapted_layers
    from dora_diffusion.adapter_io import save_adapter
    from dora_diffusion.testing import build_tiny_sdxl_pipeline
    from dora_diffusion import cli

    out = sys.argv[1]
    src = build_tiny_sdxl_pipeline(seed=0)
    add_adapter(src.unet, AdapterConfig(rank=4, use_dora=True), "subject")
    with torch.no_grad():
        for layer in adapted_layers(src.unet).values():
            layer.adapters["subject"].B.normal_(0, 0.05)
    save_adapter({"unet": src.unet}, out, "subject")

    pipe = build_tiny_sdxl_pipeline(seed=0)
    w0 = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight.detach().clone()
    name = pipe.load_dora_weights(out)
    pipe.fuse_dora()
    fused = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.base_layer.weight
    changed = float((fused - w0).abs().max())
    pipe.unfuse_dora()
    pipe.save_dora_weights(out + "/again", adapter_name=name)
    assert cli.main(["convert", out + "/pytorch_lora_weights.safetensors", out + "/kohya.safetensors",
                     "--to", "kohya"]) == 0
    import importlib.util
    for m in ("gradio", "matplotlib", "datasets", "accelerate"):
        assert importlib.util.find_spec(m) is None, m  # really absent in this interpreter
    print(f"fused-change={changed:.6f}")
    """
    result = run_without_extras(core_only, code, str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    change = float(re.search(r"fused-change=([0-9.]+)", result.stdout).group(1))
    assert change > 1e-4  # fusing really wrote the trained adapter into the base weight
    assert (tmp_path / "again" / "pytorch_lora_weights.safetensors").stat().st_size > 0
    assert (tmp_path / "kohya.safetensors").stat().st_size > 0


@pytest.mark.parametrize(
    ("argv", "extra"),
    [
        (["app.py", "--demo"], "app"),
        (["train_dreambooth_dora.py", "--pretrained_model_name_or_path", "x", "--dataset", "y"], "train"),
        (["-m", "dora_diffusion.demo"], "train"),
    ],
)
def test_a_command_that_needs_a_missing_extra_names_it(core_only, argv, extra):
    code = """
    import runpy, sys
    args = sys.argv[1:]
    if args[0] == "-m":
        sys.argv = [args[1], *args[2:]]
        runpy.run_module(args[1], run_name="__main__")
    else:
        sys.argv = args
        runpy.run_path(args[0], run_name="__main__")
    """
    result = run_without_extras(core_only, code, *argv)
    assert result.returncode != 0
    assert f"pip install 'dora-diffusion[{extra}]'" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
