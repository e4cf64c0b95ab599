"""DoRA vs LoRA vs full fine-tuning of the same modules (FT), on the toy world's DreamBooth subjects.

    python benchmarks/bench_quality.py --out bench-quality      # 2 workers, about 17 minutes on 2 cores
    python benchmarks/bench_quality.py --out bench-quality --markdown quality_table.md \\
        --grid docs/img/quality_grid.png --analysis                # docs/quality.md's tables and grid, docs/analysis.md's runs

Every subject x method x rank (FT has none) x learning rate x seed is one run of
``toyworld.finetune.train_subject`` (the training script's objective and optimiser, 4 images per step, the
``attn`` targets) from the shipped base model, scored by ``toyworld.score`` after ``--eval_steps`` steps:

- subject fidelity and prompt fidelity on trigger prompts over backgrounds none of the subject's instance
  images has ("a sks star on a green background"; 8 images, seeds 100..107);
- prior preservation on class prompts over the same backgrounds ("a star on a green background"; 4 images,
  seeds 200..203).

Figures are means over seeds with their standard deviation; ``DoRA - LoRA`` is also given paired (same subject,
rank, learning rate, seed and evaluation seeds) as a mean with a 95% interval (t over the pairs). Results are
appended to ``OUT/runs.csv`` as runs finish and a rerun skips the runs already there, so an interrupted sweep
resumes. ``--analysis`` then trains one DoRA, LoRA and FT run (first subject, rank 8, each method's best learning
rate, seed 0) with 8 checkpoints (every 25 steps of 200), for ``dora-diffusion analyze`` (paper section 3).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from common import mean_interval

FIELDS = ("subject", "method", "rank", "lr", "seed", "steps", "subject_fidelity", "prompt_fidelity",
          "prior_preservation", "train_s")  # fmt: skip
METRICS = ("subject_fidelity", "prompt_fidelity", "prior_preservation")
ADAPTER_LRS = (1e-3, 2e-3, 5e-3)
FT_LRS = (2e-4, 5e-4, 1e-3)
_STATE: dict = {}


def eval_prompts(subject) -> tuple[list[str], list[int], list[str], list[int]]:
    """Trigger prompts and seeds, class prompts and seeds, over the backgrounds the instances never show."""
    from dora_diffusion.toyworld import BACKGROUNDS

    unseen = [b for b in BACKGROUNDS if b not in subject.backgrounds]
    trigger = [f"{subject.instance_prompt} on a {unseen[k % len(unseen)]} background" for k in range(8)]
    klass = [f"{subject.class_prompt} on a {unseen[k % len(unseen)]} background" for k in range(4)]
    return trigger, list(range(100, 108)), klass, list(range(200, 204))


def _init(pipeline: str | None) -> None:
    torch.set_num_threads(1)
    from dora_diffusion import toyworld

    _STATE["pipe"] = toyworld.load_pipeline(pipeline)
    _STATE["data"] = {}


def evaluate(unet, subject_name: str) -> tuple[dict[str, float], list]:
    from dora_diffusion import toyworld
    from dora_diffusion.toyworld.finetune import sample

    subject = toyworld.SUBJECTS[subject_name]
    trigger, t_seeds, klass, c_seeds = eval_prompts(subject)
    images = sample(_STATE["pipe"], unet, trigger + klass, t_seeds + c_seeds)
    on_trigger = toyworld.score(images[:8], trigger, subject)
    on_class = toyworld.score(images[8:], klass, subject)
    figures = {
        "subject_fidelity": on_trigger["subject_fidelity"],
        "prompt_fidelity": on_trigger["prompt_fidelity"],
        "prior_preservation": on_class["prior_preservation"],
    }
    return figures, images


def run_one(job: tuple, out: str, eval_steps: tuple[int, ...]) -> list[dict]:
    """Train one run, score it at each of ``eval_steps``; save its images at the last one."""
    from dora_diffusion.toyworld.finetune import encode_subject, train_subject

    subject, method, rank, lr, seed = job
    pipe = _STATE["pipe"]
    if subject not in _STATE["data"]:
        _STATE["data"][subject] = encode_subject(pipe, subject)
    rows = []
    start = time.perf_counter()
    spent = [0.0]

    def on_step(step: int, unet) -> None:
        if step in eval_steps and step != eval_steps[-1]:
            spent[0] -= time.perf_counter()
            unet.eval()
            figures, _ = evaluate(unet, subject)
            unet.train()
            spent[0] += time.perf_counter()
            rows.append({**_key(job), "steps": step, **figures, "train_s": time.perf_counter() - start - spent[0]})

    if method == "base":
        unet = pipe.unet
    else:
        unet = train_subject(pipe, _STATE["data"][subject], method, rank, lr, max(eval_steps), seed, callback=on_step)
    train_s = time.perf_counter() - start - spent[0]
    figures, images = evaluate(unet, subject)
    rows.append({**_key(job), "steps": 0 if method == "base" else eval_steps[-1], **figures, "train_s": train_s})
    folder = Path(out) / "images" / run_name(job)
    folder.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images):
        image.save(folder / f"{k:02d}.png")
    return rows


def _key(job: tuple) -> dict:
    subject, method, rank, lr, seed = job
    return {"subject": subject, "method": method, "rank": rank, "lr": lr, "seed": seed}


def run_name(job: tuple) -> str:
    subject, method, rank, lr, seed = job
    return f"{subject}_{method}_r{rank}_lr{lr:g}_s{seed}"


def jobs(subjects, ranks, adapter_lrs, ft_lrs, seeds) -> list[tuple]:
    out = [(s, "base", 0, 0.0, 0) for s in subjects]
    for s in subjects:
        for seed in seeds:
            out += [(s, "ft", 0, lr, seed) for lr in ft_lrs]
            out += [(s, m, r, lr, seed) for r in ranks for lr in adapter_lrs for m in ("dora", "lora")]
    return out


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["rank"], r["seed"], r["steps"] = int(r["rank"]), int(r["seed"]), int(r["steps"])
        for k in ("lr", "train_s", *METRICS):
            r[k] = float(r[k])
    return rows


def sweep(args: argparse.Namespace) -> list[dict]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "runs.csv"
    done = {(r["subject"], r["method"], r["rank"], r["lr"], r["seed"]) for r in read_rows(path)}
    todo = [j for j in jobs(args.subjects, args.ranks, args.adapter_lrs, args.ft_lrs, args.seeds) if j not in done]
    print(f"{len(done)} runs already in {path}; {len(todo)} to go on {args.workers} workers", flush=True)
    new_file = not path.is_file()
    start = time.perf_counter()
    with open(path, "a", newline="") as f, ProcessPoolExecutor(args.workers, initializer=_init, initargs=(args.pipeline,)) as pool:
        writer = csv.DictWriter(f, FIELDS)
        if new_file:
            writer.writeheader()
        futures = [pool.submit(run_one, j, str(out), tuple(args.eval_steps)) for j in todo]
        for k, fut in enumerate(futures):
            for row in fut.result():
                writer.writerow(row)
            f.flush()
            print(f"[{k + 1}/{len(todo)} {time.perf_counter() - start:.0f} s] {run_name(todo[k])}", flush=True)
    return read_rows(path)


def _mean_sd(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def paired(rows: list[dict], metric: str, steps: int, **where) -> tuple[float, float, int]:
    """Mean of DoRA - LoRA over runs paired on (subject, rank, lr, seed), and its 95% half-interval."""
    by = {}
    for r in rows:
        if r["steps"] == steps and r["method"] in ("dora", "lora") and all(r[k] == v for k, v in where.items()):
            by[(r["subject"], r["rank"], r["lr"], r["seed"], r["method"])] = r[metric]
    diffs = [by[k[:4] + ("dora",)] - v for k, v in by.items() if k[4] == "lora" and k[:4] + ("dora",) in by]
    if len(diffs) < 2:
        return float("nan"), float("nan"), len(diffs)
    return mean_interval(diffs)


def combined(r: dict) -> float:
    """What a learning rate is chosen by: the mean of subject fidelity and prompt fidelity."""
    return (r["subject_fidelity"] + r["prompt_fidelity"]) / 2


def best_lrs(rows: list[dict], steps: int) -> dict[tuple[str, str, int], float]:
    """(subject, method, rank) -> the learning rate with the highest mean ``combined`` over seeds."""
    scores = defaultdict(list)
    for r in rows:
        if r["steps"] == steps and r["method"] != "base":
            scores[(r["subject"], r["method"], r["rank"], r["lr"])].append(combined(r))
    best: dict = {}
    for (s, m, rank, lr), v in scores.items():
        key = (s, m, rank)
        if key not in best or statistics.mean(v) > best[key][1]:
            best[key] = (lr, statistics.mean(v))
    return {k: v[0] for k, v in best.items()}


def report(rows: list[dict], eval_steps: list[int]) -> str:
    """The markdown tables: every configuration, then each method at its best learning rate, then DoRA - LoRA."""
    lines = []
    groups = defaultdict(list)
    for r in rows:
        groups[(r["subject"], r["method"], r["rank"], r["lr"], r["steps"])].append(r)
    head = "| subject | method | rank | lr | steps | seeds | subject fidelity | prompt fidelity | prior preservation |"
    lines += ["### Every configuration (mean ± sd over seeds)", "", head, "|" + "---|" * 9]
    order = {"base": 0, "ft": 1, "lora": 2, "dora": 3}
    for key in sorted(groups, key=lambda k: (k[0], order[k[1]], k[2], k[3], k[4])):
        g = groups[key]
        s, m, rank, lr, steps = key
        cells = [_mean_sd([r[k] for r in g]) for k in METRICS]
        lines.append(f"| {s} | {m} | {rank or '-'} | {lr:g} | {steps} | {len(g)} | " + " | ".join(cells) + " |")
    for steps in eval_steps:
        best = best_lrs(rows, steps)
        lines += ["", f"### At each method's best learning rate, {steps} steps", "", head, "|" + "---|" * 9]
        for (s, m, rank), lr in sorted(best.items(), key=lambda kv: (kv[0][0], order[kv[0][1]], kv[0][2])):
            g = groups[(s, m, rank, lr, steps)]
            cells = [_mean_sd([r[k] for r in g]) for k in METRICS]
            lines.append(f"| {s} | {m} | {rank or '-'} | {lr:g} | {steps} | {len(g)} | " + " | ".join(cells) + " |")
    lines += ["", "### DoRA - LoRA, paired runs (mean, 95% interval)", "", "| steps | rank | n pairs | " +
              " | ".join(k.replace("_", " ") for k in METRICS) + " |", "|" + "---|" * 6]  # fmt: skip
    ranks = sorted({r["rank"] for r in rows if r["method"] == "dora"})
    for steps in eval_steps:
        for rank in [*ranks, None]:
            where = {} if rank is None else {"rank": rank}
            cells, n = [], 0
            for k in METRICS:
                mean, half, n = paired(rows, k, steps, **where)
                cells.append(f"{mean:+.3f} ± {half:.3f}")
            lines.append(f"| {steps} | {rank or 'all'} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def shown_rank(rows: list[dict], wanted: int = 8) -> int:
    """``wanted`` if the sweep has it, else its nearest swept rank."""
    ranks = {r["rank"] for r in rows if r["method"] == "dora"}
    return min(ranks, key=lambda k: (abs(k - wanted), k))


def picture_grid(rows: list[dict], out: Path, path: Path, steps: int) -> Path:
    """Per subject: base, FT, LoRA and DoRA (rank 8, best learning rates, seed 0), 4 trigger + 2 class images."""
    from PIL import Image, ImageDraw

    best = best_lrs(rows, steps)
    rank = shown_rank(rows)
    subjects = sorted({r["subject"] for r in rows})
    picks = [0, 1, 2, 3, 8, 9]
    cell = 96
    grid = Image.new("RGB", (110 + cell * len(picks), cell * 4 * len(subjects)), "white")
    draw = ImageDraw.Draw(grid)
    y = 0
    for s in subjects:
        for m in ("base", "ft", "lora", "dora"):
            r = 0 if m in ("base", "ft") else rank
            lr = 0.0 if m == "base" else best[(s, m, r)]
            folder = out / "images" / run_name((s, m, r, lr, 0))
            draw.text((4, y + cell // 2 - 12), f"{s}\n{m}" + (f" r{r}" if r else "") + (f"\nlr {lr:g}" if lr else ""), fill="black")
            for k, idx in enumerate(picks):
                with Image.open(folder / f"{idx:02d}.png") as im:
                    grid.paste(im.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (110 + k * cell, y))
            y += cell
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def analysis_runs(rows: list[dict], args: argparse.Namespace) -> list[Path]:
    """One FT, LoRA and DoRA run (first subject, seed 0, best learning rates) with 8 checkpoint-N folders each."""
    from dora_diffusion.toyworld.finetune import encode_subject, save_run, train_subject

    _init(args.pipeline)
    pipe, subject, steps = _STATE["pipe"], args.subjects[0], max(args.eval_steps)
    every = max(1, steps // 8)
    best, rank = best_lrs(rows, steps), shown_rank(rows)
    data = encode_subject(pipe, subject)
    out = []
    for method in ("ft", "lora", "dora"):
        r = 0 if method == "ft" else rank
        lr = best[(subject, method, r)]
        root = Path(args.out) / "analysis" / method

        def save(step: int, unet, method=method, root=root, lr=lr) -> None:
            if step % every == 0:
                save_run(pipe.unet, unet, method, root / f"checkpoint-{step}", {"learning_rate": lr})

        train_subject(pipe, data, method, max(r, 1), lr, steps, 0, callback=save)
        print(f"analysis run {method} (lr {lr:g}): {root}", flush=True)
        out.append(root)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="Folder for runs.csv, the runs' images and the analysis runs.")
    p.add_argument("--pipeline", default=None, help="Pretrained toy-world pipeline (default: the shipped one).")
    p.add_argument("--subjects", nargs="+", default=["ring_star", "dotted_heart"])
    p.add_argument("--ranks", nargs="+", type=int, default=[4, 8, 16])
    p.add_argument("--adapter_lrs", nargs="+", type=float, default=list(ADAPTER_LRS))
    p.add_argument("--ft_lrs", nargs="+", type=float, default=list(FT_LRS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--eval_steps", nargs="+", type=int, default=[100, 200], help="Score each run after these steps.")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="Processes (one thread each).")
    p.add_argument("--markdown", default=None, help="Also write the tables here.")
    p.add_argument("--grid", default=None, help="Also write the picture grid PNG here.")
    p.add_argument("--analysis", action="store_true", help="Also train the checkpointed runs for the analysis.")
    args = p.parse_args()
    args.eval_steps = sorted(args.eval_steps)
    start = time.perf_counter()
    rows = sweep(args)
    text = report(rows, args.eval_steps)
    print(text)
    print(f"(sweep {time.perf_counter() - start:.0f} s wall)")
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.grid:
        print(f"wrote {picture_grid(rows, Path(args.out), Path(args.grid), args.eval_steps[-1])}")
    if args.analysis:
        for root in analysis_runs(rows, args):
            print(f"  {root}")


if __name__ == "__main__":
    main()
