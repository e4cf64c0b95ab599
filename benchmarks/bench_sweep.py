"""Sweep v2 (issue 33 item 3): DoRA against LoRA at ranks 1, 2, 4 and 8, and full fine-tuning (FT, the paper's
reference), every run through the training script itself, on the toy world's three targets.

    python benchmarks/bench_sweep.py --out bench-sweep --part attn,all,all_long,prior,ft,ft_low --workers 2  # all of it
    python benchmarks/bench_sweep.py --out bench-sweep --part attn --workers 2     # one part (resumable)
    python benchmarks/bench_sweep.py --out bench-sweep --report --markdown sweep.md --figure docs/img/sweep.png

A run is one call of ``dora_diffusion.training.main`` (train_dreambooth_dora.py) on the shipped toy-world model with
the part's recipe (below) at one seed. Its output folder is loaded with ``load_dora_weights`` and scored as
bench_reach.py does: 8 trigger prompts over backgrounds (subjects) or objects (the style) that no instance image
shows, seeds 100-107, and 4 class prompts, seeds 200-203; 20 Euler steps, guidance 4. Targets:

- ``dotted_heart`` (a subject every method learns on ``attn``), ``wide_ring_star`` (one yellow star in a wide white
  ring, "a ohwx yellow star": a look only the convolutions learn) and the style ``icon`` (a round framed badge under
  any object, "a tok icon of a red star");
- ``fidelity`` is subject fidelity for ``dotted_heart`` and the style reader's fidelity to the look for the other two;
  ``prompt_fidelity`` prompt fidelity (object fidelity: the named shape and colour kept); ``preservation`` prior
  preservation (style preservation: the plain prompts stay plain) on the class prompts.

Parts (each method x rank x target x seed; seeds 0-4 unless ``PART_SEEDS`` or ``--seeds`` says otherwise; lowest
seed first, so a sweep stopped early is balanced):

- ``attn``: the demo's recipe (``--unet_targets attn``, AdamW 2e-3, 4 images a step, 150 steps), DoRA and LoRA at
  ranks 1, 2, 4, 8, checkpoints every 50 steps (for the analysis of item 4); seeds 0-19 (on ``dotted_heart`` 0-49
  at rank 1 and 0-29 at rank 2);
- ``all``: the same recipe on ``--unet_targets all`` (attention, feed-forward and every convolution); on ``icon``, the
  target it learns, seeds 0-59 at rank 1, 0-39 at rank 2 and 0-14 at ranks 4 and 8, read on 64 images
  (``PART_REPEATS``);
- ``all_long``: ``--unet_targets all`` at half the learning rate (1e-3) and 800 steps, the one recipe of bench_reach.py
  that draws ``wide_ring_star``'s wide ring (run on that target only, ``PART_TARGETS``); seeds 0-72 at rank 1, 0-49
  at rank 2, 0-37 at ranks 4 and 8; scored on every evaluation prompt 8 times (``PART_REPEATS``);
- ``prior``: ``attn`` with ``--with_prior_preservation`` (12 class images from the base model, 20 steps each, weight 1),
  on ``dotted_heart`` ("a pink heart"; seeds 0-54 at rank 1, 0-14 at rank 2, 0-9 at rank 4, 0-24 at rank 8) and
  ``wide_ring_star`` ("a yellow star"); ``icon`` has no single class prompt;
- ``ft``: ``--adapter full`` (the same weights trained themselves) on ``attn`` at lr 5e-4 (the best FT learning rate of
  bench_quality.py's sweep), 150 steps, on ``attn`` (checkpoints every 50 steps) and on ``all``;
- ``ft_low``: FT on ``attn`` at lr 1e-4 (checkpoints every 50 steps), for bench_decomposition.py.

Rows go to ``OUT/runs.csv`` as runs finish; a rerun skips the runs it holds, so a part can be stopped and resumed.
``--rescore`` scores a part's finished runs again from their folders where ``PART_REPEATS`` now asks for more draws
than their rows were read at (the ``repeats`` column), keeping their training times.
``--report`` reads every row there: per configuration the mean and sd over seeds, and DoRA - LoRA paired on (part,
target, rank, seed) with a 95% t interval, per rank and pooled, written with ``--markdown``; ``--figure`` draws DoRA -
LoRA against rank with those intervals, per metric and target.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import mean_interval  # noqa: E402

TARGETS = ("dotted_heart", "wide_ring_star", "icon")
RANKS = (1, 2, 4, 8)
ATTN = ("--unet_targets", "attn", "--learning_rate", "2e-3", "--max_train_steps", "150")
ALL = ("--unet_targets", "all", "--learning_rate", "2e-3", "--max_train_steps", "150")
ALL_LONG = ("--unet_targets", "all", "--learning_rate", "1e-3", "--max_train_steps", "800")
PRIOR = ("--with_prior_preservation", "--num_class_images", "12", "--prior_generation_steps", "20")
CHECKPOINTS = ("--checkpointing_steps", "50")
PARTS: dict[str, tuple[str, ...]] = {"attn": ATTN + CHECKPOINTS, "all": ALL, "all_long": ALL_LONG, "prior": ATTN + PRIOR}
"""Part -> flags on top of the demo's recipe (``demo.TRAIN_FLAGS``; a later flag wins)."""
FT = {"attn": ("--unet_targets", "attn", "--learning_rate", "5e-4", "--max_train_steps", "150") + CHECKPOINTS,
      "all": ("--unet_targets", "all", "--learning_rate", "5e-4", "--max_train_steps", "150")}  # fmt: skip
"""FT's flags per target set (part ``ft``; its rows carry the target set as ``targets``)."""
FT_LOW = {"attn": ("--unet_targets", "attn", "--learning_rate", "1e-4", "--max_train_steps", "150") + CHECKPOINTS}
"""Part ``ft_low``: FT on ``attn`` at a fifth of the learning rate (for the analysis of item 4: does the sign of the
ΔM-ΔD slope depend on how far a run moves the weights?)."""
FT_PARTS = {"ft": FT, "ft_low": FT_LOW}
PART_SEEDS = {"attn": tuple(range(20)), ("all", "icon"): tuple(range(15)), ("prior", "dotted_heart"): tuple(range(10)),
              ("all", "icon", 1): tuple(range(60)), ("all", "icon", 2): tuple(range(40)),
              ("attn", "dotted_heart", 1): tuple(range(50)), ("attn", "dotted_heart", 2): tuple(range(30)),
              ("prior", "dotted_heart", 1): tuple(range(55)), ("prior", "dotted_heart", 2): tuple(range(15)),
              ("prior", "dotted_heart", 8): tuple(range(25)),
              ("all_long", "wide_ring_star"): tuple(range(10)),
              ("all_long", "wide_ring_star", 1): tuple(range(73)), ("all_long", "wide_ring_star", 2): tuple(range(50)),
              ("all_long", "wide_ring_star", 4): tuple(range(38)), ("all_long", "wide_ring_star", 8): tuple(range(38))}  # fmt: skip
"""Seeds per part, ``(part, target)`` or ``(part, target, rank)`` (the most specific wins) where 5 (0-4, the rest)
leave the paired DoRA - LoRA interval on a learned target wider than ±0.02 and runs are cheap enough to add more:
the rank-specific entries are the configurations whose spread over seeds is widest, each count fixed before its runs
from the paired sd the configuration showed (docs/quality.md, "How the seed counts were chosen")."""
PART_REPEATS: dict = {"all_long": 8, ("all", "icon"): 8}
"""Draws of each evaluation prompt where not 1 (``bench_reach.evaluate``'s ``repeats``), per part, ``(part, target)``
or ``(part, target, rank)`` (the most specific wins, as in ``PART_SEEDS``): ``all_long``'s
fidelity read on 8 images moves by about ±0.1 between seed sets on one adapter (the wide ring is drawn on some seeds,
not others), as much as the training seed moves it, so its runs are read on 64 trigger and 32 class images; so are
``all``'s on ``icon``, the other look that is learned (at rank 1 the widest interval of the learned targets at 8
images, sd 0.113 over 60 pairs). The looks nobody learns on ``attn``, and the subject, are read on 8 trigger and 4
class images."""


def most_specific(table: dict, part: str, target: str, rank: int, default):
    """``table``'s entry for a configuration, the most specific key first: ``(part, target, rank)``, ``(part,
    target)``, ``part``; else ``default`` (how ``PART_SEEDS`` and ``PART_REPEATS`` are read)."""
    for k in ((part, target, rank), (part, target), part):
        if k in table:
            return table[k]
    return default


def repeats_of(run: dict) -> int:
    """The draws per evaluation prompt a run (a job or a row) is read at: its ``PART_REPEATS`` entry, else 1."""
    return most_specific(PART_REPEATS, run["part"], run["target"], int(run["rank"]), 1)


PART_TARGETS = {"all_long": ("wide_ring_star",)}
"""Targets per part where not all three: ``all_long`` exists for the target the other recipes do not learn."""
FIELDS = ("part", "targets", "target", "method", "rank", "seed", "fidelity", "prompt_fidelity", "preservation", "train_s",
          "repeats")  # fmt: skip
METRICS = ("fidelity", "prompt_fidelity", "preservation")


def jobs(parts: list[str], seeds: list[int] | None = None, targets: tuple[str, ...] | None = None) -> list[dict]:
    """Every run the parts name: dicts with part, targets, target, method, rank, seed and the flags, lowest seed first
    (a sweep stopped early holds every configuration at the same seeds). ``seeds`` / ``targets`` None: the part's own
    (``PART_SEEDS``, ``PART_TARGETS``; else seeds 0-4 and the three targets)."""
    out = []
    for part in parts:
        for target in targets or PART_TARGETS.get(part, TARGETS):
            if part == "prior" and class_prompt(target) is None:
                continue  # a style of many objects (icon) has no single class prompt
            if part in FT_PARTS:
                for modules, flags in FT_PARTS[part].items():
                    out += [dict(part=part, targets=modules, target=target, method="ft", rank=0, seed=s,
                                 flags=("--adapter", "full", *flags))
                            for s in seeds or most_specific(PART_SEEDS, part, target, 0, range(5))]  # fmt: skip
                continue
            modules = "all" if part.startswith("all") else "attn"
            for rank in RANKS:
                seeds_rank = seeds or most_specific(PART_SEEDS, part, target, rank, range(5))
                for method in ("dora", "lora"):
                    out += [dict(part=part, targets=modules, target=target, method=method, rank=rank, seed=s,
                                 flags=("--adapter", method, "--rank", str(rank), *PARTS[part])) for s in seeds_rank]  # fmt: skip
    return sorted(out, key=lambda j: j["seed"])


def class_prompt(name: str) -> str | None:
    """The prior-preservation class prompt of a target: a subject's (``a pink heart``), a one-object style's plain
    object (``wide_ring_star``: ``a yellow star``); None for a style of several objects."""
    from bench_reach import target_of

    from dora_diffusion.toyworld.styles import Style

    target = target_of(name)
    if not isinstance(target, Style):
        return target.class_prompt
    objects = set(target.objects)
    if len(objects) != 1:
        return None
    shape, colour = objects.pop()
    return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}"


def run_name(job: dict) -> str:
    return f"{job['part']}-{job['targets']}-{job['target']}-{job['method']}-r{job['rank']}-s{job['seed']}"


def key(row: dict) -> tuple:
    return (row["part"], row["targets"], row["target"], row["method"], int(row["rank"]), int(row["seed"]))


def prepare(work: Path, job: dict) -> None:
    """The target's dataset (and for prior preservation its class images, by one run of the script), made once
    before the workers start: two workers must not write the same folder."""
    from bench_reach import target_of

    from dora_diffusion.toyworld import make_subject_dataset
    from dora_diffusion.toyworld.styles import Style, make_style_dataset

    target = target_of(job["target"])
    data = work / f"data-{target.name}"
    if not data.exists():
        (make_style_dataset if isinstance(target, Style) else make_subject_dataset)(data, target)


def train(work: Path, job: dict) -> Path:
    """One run of the training script; returns its output folder (a finished run is not trained again)."""
    from bench_reach import target_of

    from dora_diffusion.demo import TRAIN_FLAGS
    from dora_diffusion.toyworld import PIPELINE_DIR
    from dora_diffusion.training import main

    target = target_of(job["target"])
    out = work / "runs" / run_name(job)
    if (out / "pytorch_lora_weights.safetensors").is_file() and (out / "training_args.json").is_file():
        return out
    extra = list(job["flags"])
    if "--with_prior_preservation" in extra:
        extra += ["--class_prompt", class_prompt(target.name), "--class_data_dir", str(work / f"class-{target.name}")]
    recipe = list(TRAIN_FLAGS)
    if job["method"] == "ft":  # full fine-tuning has no rank (the script refuses --rank with --adapter full)
        k = recipe.index("--rank")
        del recipe[k : k + 2]
    argv = ["--pretrained_model_name_or_path", str(PIPELINE_DIR), "--dataset", str(work / f"data-{target.name}"),
            "--output_dir", str(out), "--overwrite_output_dir", *recipe, "--seed", str(job["seed"]), *extra]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        main(argv)
    return out


def score(folder: Path, run: dict) -> dict:
    """The figures of the adapter in ``folder`` for ``run`` (a job or a row), read at its ``PART_REPEATS``, with
    that count as ``repeats``."""
    from bench_reach import evaluate, target_of

    repeats = repeats_of(run)
    return {**evaluate(target_of(run["target"]), folder, repeats=repeats), "repeats": repeats}


def run_one(work: str, job: dict, threads: int) -> dict:
    """Train and score one job (in a worker process)."""
    import torch

    torch.set_num_threads(threads)
    start = time.perf_counter()
    folder = train(Path(work), job)
    train_s = time.perf_counter() - start
    return {**{k: job[k] for k in FIELDS[:6]}, **score(folder, job), "train_s": round(train_s, 1)}


def rescore_one(work: str, row: dict, threads: int) -> dict:
    """``row`` scored again from its run folder at its ``PART_REPEATS`` (its training time kept)."""
    import torch

    torch.set_num_threads(threads)
    folder = Path(work) / "runs" / run_name(row)
    if not (folder / "pytorch_lora_weights.safetensors").is_file():
        raise FileNotFoundError(f"{folder} holds no adapter: train the run again (delete its row) to score it")
    return {**row, **score(folder, row)}


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{**r, "rank": int(r["rank"]), "seed": int(r["seed"]), **{k: float(r[k]) for k in (*METRICS, "train_s")},
                 "repeats": int(r.get("repeats") or 1)} for r in csv.DictReader(f)]  # fmt: skip


def write_rows(path: Path, rows: list[dict]) -> None:
    """Every row to ``path`` at once (a temporary file, then a rename: a stopped rewrite loses no row)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows({k: r[k] for k in FIELDS} for r in rows)
    os.replace(tmp, path)


def stale(rows: list[dict]) -> list[int]:
    """Indices of the rows read at another number of draws than their ``PART_REPEATS``."""
    return [k for k, r in enumerate(rows) if r["repeats"] != repeats_of(r)]


def rescore(work: Path, parts: list[str], workers: int, threads: int, targets: tuple[str, ...] | None = None) -> None:
    """Score again the rows of ``parts`` (and ``targets``, None: every one) read at another number of draws than
    ``PART_REPEATS`` now asks (resumable: the file is rewritten after each run)."""
    path = work / "runs.csv"
    rows = read_rows(path)
    todo = [k for k in stale(rows) if rows[k]["part"] in parts and (not targets or rows[k]["target"] in targets)]
    print(f"{len(todo)} runs to score again in {path}", flush=True)
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [(k, pool.submit(rescore_one, str(work), rows[k], threads)) for k in todo]
        for n, (k, fut) in enumerate(futures, 1):
            old, rows[k] = rows[k], fut.result()
            write_rows(path, rows)
            print(f"[{n}/{len(todo)} {time.perf_counter() - start:.0f} s] {run_name(old)}: fidelity {old['fidelity']:.2f} "
                  f"-> {rows[k]['fidelity']:.2f} ({rows[k]['repeats']} draws)", flush=True)  # fmt: skip


def sweep(work: Path, parts: list[str], seeds: list[int] | None, workers: int, threads: int, targets: tuple[str, ...] | None = None) -> None:
    path = work / "runs.csv"
    held = read_rows(path)
    if held:
        with open(path) as f:
            header = f.readline().strip().split(",")
        if header != list(FIELDS):
            write_rows(path, held)  # a file from before a column was added: its header and rows in today's columns
    done = {key(r) for r in held}
    todo = [j for j in jobs(parts, seeds, targets) if key(j) not in done]
    print(f"{len(todo)} runs to do ({len(done)} in {path})", flush=True)
    for job in todo:
        prepare(work, job)
    first = {}  # prior preservation: the first run of each subject generates its class images, alone
    for job in todo:
        if job["part"] == "prior" and not (work / f"class-{job['target']}").is_dir():
            first.setdefault(job["target"], job)
    start = time.perf_counter()
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        if new:
            writer.writeheader()

        def write(row: dict, k: int) -> None:
            writer.writerow(row)
            f.flush()
            print(f"[{k}/{len(todo)} {time.perf_counter() - start:.0f} s] {run_name(row)}: fidelity {row['fidelity']:.2f}, "
                  f"prompt {row['prompt_fidelity']:.2f}, preservation {row['preservation']:.2f}, train {row['train_s']:.0f} s",
                  flush=True)  # fmt: skip

        count = 0
        for job in first.values():
            count += 1
            write(run_one(str(work), job, threads), count)
        rest = [j for j in todo if j not in first.values()]
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(run_one, str(work), j, threads) for j in rest]
            for fut in futures:
                count += 1
                write(fut.result(), count)


def differences(rows: list[dict], metric: str, **where) -> list[float]:
    """DoRA - LoRA of ``metric`` over runs paired on (part, targets, target, rank, seed) that match ``where``."""
    by = {key(r): r[metric] for r in rows if all(r[k] == v for k, v in where.items())}
    return [v - by[k[:3] + ("lora",) + k[4:]] for k, v in by.items() if k[3] == "dora" and k[:3] + ("lora",) + k[4:] in by]


def _cell(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}" if values else "-"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _signed(values: list[float]) -> str:
    mean, half, n = mean_interval(values)
    return "-" if n < 2 else f"{mean:+.3f} ± {half:.3f}"


def report(rows: list[dict]) -> str:
    parts = list(dict.fromkeys(r["part"] for r in rows))
    lines = ["### DoRA - LoRA, paired on target and seed (mean ± 95% interval; n pairs)", "",
             "| part | rank | targets | n | fidelity | prompt fidelity | preservation |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for part in (p for p in parts if p not in FT_PARTS):
        for rank in (*RANKS, None):
            where = {"part": part} if rank is None else {"part": part, "rank": rank}
            for target in (*TARGETS, None):
                sel = dict(where) if target is None else {**where, "target": target}
                d = {m: differences(rows, m, **sel) for m in METRICS}
                if not d["fidelity"]:
                    continue
                label = "**pooled**" if target is None else target
                lines.append(f"| {part} | {'all' if rank is None else rank} | {label} | {len(d['fidelity'])} | "
                             + " | ".join(_signed(d[m]) for m in METRICS) + " |")  # fmt: skip
    lines += ["", "### Every configuration (mean ± sd over seeds)", "",
              "| part | target set | target | method | rank | seeds | fidelity | prompt fidelity | preservation | train s |",
              "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    configs = dict.fromkeys((r["part"], r["targets"], r["target"], r["method"], r["rank"]) for r in rows)
    order = {t: i for i, t in enumerate(TARGETS)}
    for c in sorted(configs, key=lambda c: (c[0] in FT_PARTS, c[0], order.get(c[2], 9), c[1], c[3], c[4])):
        sel = [r for r in rows if (r["part"], r["targets"], r["target"], r["method"], r["rank"]) == c]
        rank = "-" if c[3] == "ft" else c[4]
        lines.append(f"| {c[0]} | {c[1]} | {c[2]} | {c[3]} | {rank} | {len(sel)} | "
                     + " | ".join(_cell([r[m] for r in sel]) for m in METRICS)
                     + f" | {statistics.mean(r['train_s'] for r in sel):.0f} |")  # fmt: skip
    return "\n".join(lines)


def figure(rows: list[dict], path: Path) -> Path:
    """DoRA - LoRA against rank with 95% intervals: a row of panels per metric, a column per target, a line per part."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 9), dpi=100)
    FigureCanvasAgg(fig)
    titles = {"fidelity": "fidelity", "prompt_fidelity": "prompt / object fidelity", "preservation": "preservation"}
    parts = [p for p in dict.fromkeys(r["part"] for r in rows) if p not in FT_PARTS]
    colors = {p: f"C{k}" for k, p in enumerate(parts)}
    handles = {}  # part -> a line of it, for one legend over every panel (a part may run on some targets only)
    for i, metric in enumerate(METRICS):
        for j, target in enumerate(TARGETS):
            ax = fig.add_subplot(len(METRICS), len(TARGETS), i * len(TARGETS) + j + 1)
            ax.axhline(0, color="gray", lw=0.8)
            for k, part in enumerate(parts):
                xs, ys, hs = [], [], []
                for rank in RANKS:
                    mean, half, n = mean_interval(differences(rows, metric, part=part, target=target, rank=rank))
                    if n >= 2:
                        xs.append(math.log2(rank) + (k - (len(parts) - 1) / 2) * 0.1)
                        ys.append(mean)
                        hs.append(half)
                if xs:
                    handles[part] = ax.errorbar(xs, ys, yerr=hs, marker="o", capsize=3, color=colors[part], label=part)
            ax.set_xticks([math.log2(r) for r in RANKS], [str(r) for r in RANKS])
            if i == 0:
                ax.set_title(target, fontsize=11)
            if i == len(METRICS) - 1:
                ax.set_xlabel("rank")
            if j == 0:
                ax.set_ylabel(f"DoRA − LoRA\n{titles[metric]}", fontsize=9)
    pairs = sorted({len(differences(rows, "fidelity", part=p, target=t, rank=r)) for p in parts for t in TARGETS for r in RANKS} - {0, 1})
    fig.suptitle(f"DoRA − LoRA, paired on target and seed ({'-'.join(map(str, dict.fromkeys([pairs[0], pairs[-1]])))} "
                 "seeds a point), mean and 95% interval", fontsize=11)  # fmt: skip
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=len(handles), fontsize=9, title="part",
               title_fontsize=9, frameon=False)  # fmt: skip
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def run_grid(work: Path, runs: list[str], path: Path) -> Path:
    """A picture of finished runs (names as in ``OUT/runs``, one target): the target's training images, the base
    model, then one row per run with its fidelity; 8 trigger prompts, a gap, 4 class prompts, the scorer's seeds."""
    from bench_reach import draw_rows, evaluate, target_of, training_row
    from PIL import Image

    names = {run.split("-")[2] for run in runs}
    if len(names) != 1:
        raise SystemExit(f"--grid_runs must be runs of one target, got {sorted(names)}")
    target = names.pop()
    rows = [training_row(target)]
    for run in ["base", *runs]:
        folder = None if run == "base" else work / "runs" / run
        if folder is not None and not (folder / "pytorch_lora_weights.safetensors").is_file():
            raise SystemExit(f"{folder} holds no finished run")
        images = work / "grid" / run
        figures = evaluate(target_of(target), folder, images)
        label = "base model" if run == "base" else run.replace(f"-{target}-", "\n", 1)
        rows.append((f"{label}\nfidelity {figures['fidelity']:.2f}", [Image.open(images / f"{k:02d}.png") for k in range(12)]))
    return draw_rows(rows, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="Work folder; its runs.csv makes a stopped sweep resume.")
    ap.add_argument("--part", default="", help=f"Comma-separated parts to run: {', '.join([*PARTS, *FT_PARTS])}.")
    ap.add_argument("--seeds", default="", help="Comma-separated seeds (default: the part's, PART_SEEDS, else 0-4).")
    ap.add_argument("--targets", default="", help="Comma-separated targets (default: the part's, else all three).")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2)))
    ap.add_argument("--threads", type=int, default=1, help="Torch threads per worker.")
    ap.add_argument("--rescore", action="store_true", help="Score --part's runs (of --targets) again where PART_REPEATS asks for another number of draws.")
    ap.add_argument("--report", action="store_true", help="Print the tables of every row in OUT/runs.csv.")
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--figure", default=None)
    ap.add_argument("--grid", default=None, help="Write a picture of --grid_runs (and the base model) here.")
    ap.add_argument("--grid_runs", default="", help="Comma-separated run names (folders in OUT/runs) of one target.")
    args = ap.parse_args()
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    parts = [p for p in args.part.split(",") if p]
    unknown = [p for p in parts if p not in (*PARTS, *FT_PARTS)]
    if unknown:
        ap.error(f"unknown part(s) {unknown}; choose from {', '.join([*PARTS, *FT_PARTS])}")
    if args.rescore and not parts:
        ap.error("--rescore needs --part (the parts whose runs to score again)")
    if parts:
        start = time.perf_counter()
        targets = tuple(t for t in args.targets.split(",") if t)
        if set(targets) - set(TARGETS):
            ap.error(f"unknown target(s) {sorted(set(targets) - set(TARGETS))}; choose from {', '.join(TARGETS)}")
        seeds = [int(s) for s in args.seeds.split(",") if s] or None
        if args.rescore:
            rescore(work, parts, args.workers, args.threads, targets or None)
        else:
            sweep(work, parts, seeds, args.workers, args.threads, targets or None)
        print(f"parts {','.join(parts)}: {time.perf_counter() - start:.0f} s wall, {args.workers} workers x {args.threads} thread(s)")
    if args.report or args.markdown or args.figure:
        rows = read_rows(work / "runs.csv")
        text = report(rows)
        print(text)
        if args.markdown:
            Path(args.markdown).write_text(text + "\n")
        if args.figure:
            print(f"wrote {figure(rows, Path(args.figure))}")
    if args.grid:
        import torch

        torch.set_num_threads(args.threads)
        print(f"wrote {run_grid(work, [r for r in args.grid_runs.split(',') if r], Path(args.grid))}")


if __name__ == "__main__":
    main()
