"""The adapter toolbox measured: extraction quality on the toy world, bake/resize image differences, and the time
and peak memory of extract/merge on the full-size SDXL UNet.

    python benchmarks/bench_tools.py toy --out bench-tools --markdown tools_table.md   # docs/tools.md's tables
    python benchmarks/bench_tools.py sdxl --out /big/disk/bench-tools-sdxl              # time / peak RSS, CPU

``toy``: per subject and seed, one full fine-tuning run of the ``attn`` targets (``bench_quality.py``'s FT
reference: ``toyworld.finetune.train_subject``), then DoRA and LoRA extracted from it at each rank
(``tools.extract.fit_module``, the extraction ``dora-diffusion extract`` runs per module), written into a copy of
the base UNet and scored on the trigger prompts ``bench_quality.py`` uses (8 images, seeds 100..107): weight error
``sqrt(sum ||W' - W_ft||^2 / sum ||W_ft - W0||^2)`` over the changed modules, subject and prompt fidelity, and the
mean / max pixel difference (0..255) from the FT model's own images. Then one DoRA run per subject and seed, baked
(``tools.bake``) and resized (``tools.resize``) through files at each rank, against the DoRA's own weights (the
same error, relative to the DoRA's change ``W' - W0``) and images.
Each (subject, seed) is written to ``<out>/parts/`` when done; a rerun with the same ``--out`` skips those.

``sdxl``: SDXL base's UNet from its config with random weights (fp16 files), and a "fine-tune" with a random
rank-16 plus dense perturbation of every Linear and Conv2d weight, both written as diffusers folders; then
``dora-diffusion extract`` and ``dora-diffusion merge`` (two DoRAs: exactly, and through the merged weights) each in a child
process, whose wall time and peak resident memory (``ru_maxrss``) are printed. About 10 GB of disk.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOY_FIELDS = ("part", "subject", "seed", "kind", "rank", "weight_error", "subject_fidelity", "prompt_fidelity",
              "diff_mean", "diff_max")  # fmt: skip


# ---------------------------------------------------------------------------------------------- toy world


def _evaluate(pipe, unet, subject: str) -> tuple[dict[str, float], np.ndarray]:
    from bench_quality import eval_prompts

    from dora_diffusion import toyworld
    from dora_diffusion.toyworld.finetune import sample

    trigger, seeds, _, _ = eval_prompts(toyworld.SUBJECTS[subject])
    images = sample(pipe, unet, trigger, seeds)
    scores = toyworld.score(images, trigger, subject)
    pixels = np.stack([np.asarray(im, dtype=np.float64) for im in images])
    return {"subject_fidelity": scores["subject_fidelity"], "prompt_fidelity": scores["prompt_fidelity"]}, pixels


def _with_weights(base_unet, weights: dict[str, torch.Tensor]):
    unet = copy.deepcopy(base_unet).float()
    with torch.no_grad():
        for name, w in weights.items():
            unet.get_submodule(name).weight.copy_(w)
    return unet


def _row(part, subject, seed, kind, rank, error, scores, pixels, reference) -> dict:
    diff = np.abs(pixels - reference)
    return {"part": part, "subject": subject, "seed": seed, "kind": kind, "rank": rank, "weight_error": error,
            **scores, "diff_mean": float(diff.mean()), "diff_max": float(diff.max())}  # fmt: skip


def extraction_rows(pipe, ft_unet, subject: str, seed: int, ranks: list[int], iterations: int) -> list[dict]:
    """FT's own scores, then DoRA and LoRA extracted from it at each rank."""
    from dora_diffusion.tools.extract import fit_module
    from dora_diffusion.tools.weights import adapter_delta

    base = dict(pipe.unet.named_modules())
    changed = {}
    for name, module in ft_unet.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and not torch.equal(w, base[name].weight.float()):
            changed[name] = (base[name].weight.detach().float(), w.detach().float())
    scores, ft_pixels = _evaluate(pipe, ft_unet, subject)
    rows = [_row("extract", subject, seed, "FT", 0, 0.0, scores, ft_pixels, ft_pixels)]
    change = sum(float((wt - w0).square().sum()) for w0, wt in changed.values())
    for rank in ranks:
        for kind in ("dora", "lora"):
            weights, err = {}, 0.0
            for name, (w0, wt) in changed.items():
                ma = fit_module(wt, w0, kind, rank, None, iterations)
                weights[name] = w0 + adapter_delta(name, ma, w0)
                err += float((weights[name] - wt).square().sum())
            scores, pixels = _evaluate(pipe, _with_weights(pipe.unet, weights), subject)
            rows.append(_row("extract", subject, seed, kind, rank, math.sqrt(err / change), scores, pixels, ft_pixels))
    return rows


def bake_resize_rows(pipe, data, subject: str, seed: int, args: argparse.Namespace, tmp: Path) -> list[dict]:
    """One DoRA run at ``--adapter_rank``; baked to a LoRA and resized at each rank, through files."""
    from dora_diffusion.toyworld import PIPELINE_DIR
    from dora_diffusion.toyworld.finetune import save_run, train_subject
    from dora_diffusion.adapter_io import read_adapter
    from dora_diffusion.tools import ModelFolder, adapted_weights, bake, resize
    from dora_diffusion.tools.weights import model_modules

    base_dir = Path(args.pipeline) if args.pipeline else PIPELINE_DIR
    folder = ModelFolder(base_dir)
    dora = train_subject(pipe, data, "dora", args.adapter_rank, args.dora_lr, args.steps, seed)
    source = save_run(pipe.unet, dora, "dora", tmp / f"dora_{subject}_{seed}")
    scores, reference = _evaluate(pipe, dora, subject)
    rows = [_row("bake/resize", subject, seed, f"DoRA r{args.adapter_rank}", args.adapter_rank, 0.0, scores, reference, reference)]
    original = adapted_weights(model_modules(read_adapter(source)[0], str(source), folder), folder)["unet"]
    norm = math.sqrt(sum(float((w - folder.weight("unet", n).float()).square().sum()) for n, w in original.items()))
    for part, ranks in (("bake", args.bake_ranks), ("resize", args.resize_ranks)):
        for rank in ranks:
            out = tmp / f"{part}_{subject}_{seed}_{rank}.safetensors"
            if part == "bake":
                bake(source, out, rank, base=base_dir, overwrite=True)
            else:
                resize(source, out, rank, overwrite=True)
            weights = adapted_weights(model_modules(read_adapter(out)[0], str(out), folder), folder)["unet"]
            err = math.sqrt(sum(float((weights[n] - original[n]).square().sum()) for n in original)) / norm
            scores, pixels = _evaluate(pipe, _with_weights(pipe.unet, weights), subject)
            rows.append(_row(part, subject, seed, "LoRA" if part == "bake" else "DoRA", rank, err, scores, pixels, reference))
    return rows


def _mean_sd(values: list[float], digits: int = 3) -> str:
    if len(values) < 2:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def toy_table(rows: list[dict]) -> str:
    """Markdown: per part, kind and rank, mean ± sd over the runs; then DoRA - LoRA paired per rank."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["part"], r["kind"], int(r["rank"])), []).append(r)
    out = ["| part | kind | rank | runs | weight error | subject fidelity | prompt fidelity | pixel diff mean | pixel diff max |",
           "|---|---|---:|---:|---|---|---|---|---|"]  # fmt: skip
    for (part, kind, rank), rs in groups.items():
        cols = [_mean_sd([float(r[k]) for r in rs], 4 if k == "weight_error" else 3)
                for k in ("weight_error", "subject_fidelity", "prompt_fidelity")]  # fmt: skip
        diffs = [_mean_sd([float(r[k]) for r in rs], 1) for k in ("diff_mean", "diff_max")]
        out.append(f"| {part} | {kind} | {rank} | {len(rs)} | " + " | ".join(cols + diffs) + " |")
    paired = ["", "DoRA - LoRA, extracted at the same rank from the same FT run (mean ± sd over the runs):", "",
              "| rank | weight error | subject fidelity | prompt fidelity | pixel diff mean |", "|---:|---|---|---|---|"]  # fmt: skip
    ranks = sorted({int(r["rank"]) for r in rows if r["part"] == "extract" and r["kind"] == "dora"})
    for rank in ranks:
        key = lambda r: (r["subject"], r["seed"])  # noqa: E731
        d = {key(r): r for r in rows if r["part"] == "extract" and r["kind"] == "dora" and int(r["rank"]) == rank}
        l = {key(r): r for r in rows if r["part"] == "extract" and r["kind"] == "lora" and int(r["rank"]) == rank}  # noqa: E741
        cols = [_mean_sd([float(d[k][m]) - float(l[k][m]) for k in d if k in l], 4 if m == "weight_error" else 3)
                for m in ("weight_error", "subject_fidelity", "prompt_fidelity", "diff_mean")]  # fmt: skip
        paired.append(f"| {rank} | " + " | ".join(cols) + " |")
    return "\n".join(out + paired) + "\n"


def _write_rows(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TOY_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def run_toy(args: argparse.Namespace) -> None:
    from dora_diffusion import toyworld
    from dora_diffusion.toyworld.finetune import encode_subject, train_subject

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = toyworld.load_pipeline(args.pipeline)
    start = time.perf_counter()
    parts = out / "parts"  # one CSV per (subject, seed): a rerun with the same --out skips the finished ones
    parts.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench_tools_") as tmp:
        for subject in args.subjects:
            data = None
            for seed in args.seeds:
                part = parts / f"{subject}-{seed}.csv"
                if part.exists():
                    print(f"{subject} seed {seed}: done in an earlier run ({part})", flush=True)
                    continue
                data = data if data is not None else encode_subject(pipe, subject)
                ft = train_subject(pipe, data, "ft", 1, args.ft_lr, args.steps, seed)
                rows = extraction_rows(pipe, ft, subject, seed, args.ranks, args.iterations)
                rows += bake_resize_rows(pipe, data, subject, seed, args, Path(tmp))
                _write_rows(part.with_suffix(".tmp"), rows)
                part.with_suffix(".tmp").replace(part)
                print(f"{subject} seed {seed}: {len(rows)} rows, {time.perf_counter() - start:.0f} s", flush=True)
    rows = [row for subject in args.subjects for seed in args.seeds
            for row in csv.DictReader(open(parts / f"{subject}-{seed}.csv", newline=""))]  # fmt: skip
    _write_rows(out / "runs.csv", rows)
    text = toy_table(rows)
    print(text)
    settings = (f"\n`python benchmarks/bench_tools.py toy` with subjects {args.subjects}, seeds {args.seeds}, "
                f"{args.steps} steps, FT lr {args.ft_lr:g}, DoRA rank {args.adapter_rank} lr {args.dora_lr:g}; "
                f"{time.perf_counter() - start:.0f} s wall.\n")  # fmt: skip
    if args.markdown:
        Path(args.markdown).write_text(text + settings)


# ---------------------------------------------------------------------------------------------- full-size SDXL


def _write_folder(root: Path, config: dict, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    (root / "unet").mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline",
                                                        "unet": ["diffusers", "UNet2DConditionModel"]}))  # fmt: skip
    (root / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **config}))
    save_file(state, root / "unet" / "diffusion_pytorch_model.safetensors")


def make_folders(root: Path, config: dict, dtype: torch.dtype, seed: int = 0) -> tuple[Path, Path]:
    """A base and a perturbed "fine-tuned" UNet folder (random weights), one state dict in memory at a time."""
    from diffusers import UNet2DConditionModel

    base, tuned = root / "base", root / "finetuned"
    if (tuned / "unet" / "diffusion_pytorch_model.safetensors").is_file():
        return base, tuned
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its own dtype: one copy of the weights in memory, not an fp32 one too
    try:
        unet = UNet2DConditionModel(**config)
    finally:
        torch.set_default_dtype(default)
    conv_linear = {f"{n}.weight" for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    state = {k: v.to(dtype).contiguous() for k, v in unet.state_dict().items()}
    del unet
    _write_folder(base, config, state)
    g = torch.Generator().manual_seed(seed + 1)
    for key in list(state):
        w = state[key]
        if key in conv_linear:
            w2 = w.float().reshape(w.shape[0], -1)
            r = min(16, *w2.shape)
            low = torch.randn(w2.shape[0], r, generator=g) @ torch.randn(r, w2.shape[1], generator=g) / math.sqrt(r)
            dense = torch.randn(w2.shape, generator=g)
            std = float(w2.std())
            state[key] = (w2 + 0.02 * std * (low + 0.1 * dense)).reshape(w.shape).to(dtype)
    _write_folder(tuned, config, state)
    return base, tuned


def timed(argv: list[str], threads: int | None = None) -> tuple[float, float, str]:
    """Run ``python -m dora_diffusion.cli ARGV`` in a child process: (wall seconds, its peak RSS in GiB, last lines)."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "dora_diffusion.cli", *argv], stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        output = log.read()
    if proc.returncode:
        raise RuntimeError(f"dora-diffusion {' '.join(argv)} failed:\n{output[-3000:]}")
    return wall, usage.ru_maxrss / 2**20, "\n".join(output.splitlines()[-12:])  # ru_maxrss: KiB on Linux


def run_sdxl(args: argparse.Namespace) -> None:
    from bench_unet import SDXL_UNET

    config = dict(SDXL_UNET)
    if args.tiny:  # a smoke test of the script itself
        config.update(block_out_channels=(32, 64, 64), transformer_layers_per_block=(1, 1, 1), attention_head_dim=(2, 4, 4),
                      cross_attention_dim=80, projection_class_embeddings_input_dim=80, addition_time_embed_dim=8,
                      norm_num_groups=8, sample_size=8)  # fmt: skip
    root = Path(args.out)
    base, tuned = make_folders(root, config, torch.float16)
    lines = ["| job | wall s | peak RSS GiB |", "|---|---:|---:|"]
    dora = root / "extracted_dora.safetensors"
    jobs = [
        (f"extract DoRA, rank {args.rank}", ["extract", tuned, base, dora, "--rank", args.rank, "--iterations", args.iterations]),
        (f"extract LoRA, rank {args.rank}", ["extract", tuned, base, root / "extracted_lora.safetensors", "--rank", args.rank, "--kind", "lora"]),
        (f"merge 2 DoRAs exactly, rank {2 * args.rank}", ["merge", dora, dora, "-o", root / "merged_exact.safetensors",
                                                 "--strengths", "1", "-0.5", "--base", base]),  # fmt: skip
        (f"merge 2 DoRAs through the weights, rank {args.rank}", ["merge", dora, dora, "-o", root / "merged.safetensors", "--strengths", "1", "-0.5",
                           "--base", base, "--rank", args.rank, "--iterations", args.iterations]),  # fmt: skip
    ]
    for label, argv in jobs:
        wall, peak, tail = timed([str(a) for a in argv] + ["--summary-only", "--overwrite"], args.threads)
        print(tail, flush=True)
        lines.append(f"| {label} | {wall:.0f} | {peak:.2f} |")
    weights = sum((p.stat().st_size for p in (base / "unet").iterdir() if p.suffix == ".safetensors")) / 2**30
    text = "\n".join(lines) + f"\n\nUNet weights file: {weights:.2f} GiB (fp16); {os.cpu_count()} CPUs, threads {args.threads or 'default'}.\n"
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    toy = sub.add_parser("toy", help="extraction, bake and resize on the toy world")
    toy.add_argument("--out", required=True)
    toy.add_argument("--pipeline", default=None, help="pretrained toy-world pipeline (default: the shipped one)")
    toy.add_argument("--subjects", nargs="+", default=["ring_star", "dotted_heart"])
    toy.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    toy.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    toy.add_argument("--steps", type=int, default=200)
    toy.add_argument("--ft_lr", type=float, default=5e-4)
    toy.add_argument("--adapter_rank", type=int, default=16, help="rank of the DoRA run that is baked and resized")
    toy.add_argument("--dora_lr", type=float, default=2e-3)
    toy.add_argument("--bake_ranks", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    toy.add_argument("--resize_ranks", nargs="+", type=int, default=[1, 2, 4, 8])
    toy.add_argument("--iterations", type=int, default=20, help="most rounds of the DoRA direction fit")
    toy.add_argument("--threads", type=int, default=2)
    toy.add_argument("--markdown", default=None)
    toy.set_defaults(func=run_toy)
    sdxl = sub.add_parser("sdxl", help="time and peak RSS of extract / merge on the full-size SDXL UNet (CPU)")
    sdxl.add_argument("--out", required=True, help="folder for the two UNet folders (about 10 GB) and the outputs")
    sdxl.add_argument("--rank", type=int, default=32)
    sdxl.add_argument("--iterations", type=int, default=20)
    sdxl.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the child processes (default: all)")
    sdxl.add_argument("--tiny", action="store_true", help="a tiny UNet instead (smoke test of this script)")
    sdxl.add_argument("--markdown", default=None)
    sdxl.set_defaults(func=run_sdxl)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
