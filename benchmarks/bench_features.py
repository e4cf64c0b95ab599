"""Training features on the toy world, through train_dreambooth_dora.py itself: pivotal tuning, the magnitude
learning rate, the debiased loss, and the options of other trainers (EMA, LoRA+, caption dropout, Huber loss; issue
31 item 5), each against plain DoRA at equal steps.

    python benchmarks/bench_features.py --out bench-features --variants "dora,dora + pivotal tuning,dora magnitude lr x10,dora magnitude lr x0.1,dora + debiased loss,lora"   # about 15 minutes on 2 cores
    python benchmarks/bench_features.py --out bench-features --markdown features.md   # every variant: about twice as long
    python benchmarks/bench_features.py --out bench-options --markdown options.md \
        --variants "dora,dora + EMA,dora + LoRA+ x16,dora + LoRA+ x4,dora + caption dropout 0.1,dora + huber"   # issue 31 item 5

Every subject x variant x seed is one run of ``dora_diffusion.training.main`` on the shipped toy-world model with the
demo's recipe at rank 4 (AdamW lr 2e-3, 4 images per step, 150 steps, cached latents, ``attn`` targets) on the
subject's 6 instance images. The adapter folder is loaded with ``load_dora_weights`` (with its embeddings, for
pivotal tuning) and scored by ``toyworld.score`` as in bench_quality.py: subject and prompt fidelity on trigger
prompts over backgrounds the instances never show (8 images), prior preservation on class prompts (4 images).
With pivotal tuning the trigger word (``zwx``) becomes the new tokens ``<s0><s1>`` in captions and prompts; the
scorer reads the prompt as written with the trigger. Each variant is compared with plain DoRA paired on
(subject, seed): mean difference and its 95% interval (t over the pairs).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_quality import eval_prompts  # noqa: E402
from common import mean_interval  # noqa: E402

VARIANTS = {
    "dora": [],
    "dora + pivotal tuning": ["--train_text_encoder_ti", "--text_encoder_lr", "2e-3"],
    "dora magnitude lr x10": ["--magnitude_lr", "2e-2"],
    "dora magnitude lr x0.1": ["--magnitude_lr", "2e-4"],
    "dora + debiased loss": ["--debiased_estimation_loss"],
    "lora": ["--adapter", "lora"],
    "dora + EMA": ["--use_ema"],  # default decay 0.995; at step 150 the warm-up gives 150/159
    "dora + LoRA+ x16": ["--loraplus_lr_ratio", "16"],  # the paper's ratio
    "dora + LoRA+ x4": ["--loraplus_lr_ratio", "4"],
    "dora + caption dropout 0.1": ["--caption_dropout_rate", "0.1"],
    "dora + huber": ["--loss_type", "huber"],  # kohya's defaults: --huber_c 0.1, --huber_schedule snr
}
"""Variant -> flags added to the demo's recipe."""
FIELDS = ("subject", "variant", "seed", "subject_fidelity", "prompt_fidelity", "prior_preservation", "train_s")
METRICS = FIELDS[3:6]


def train(subject, variant: str, seed: int, work: Path, steps: int) -> Path:
    from dora_diffusion.demo import TRAIN_FLAGS
    from dora_diffusion.toyworld import PIPELINE_DIR, make_subject_dataset
    from dora_diffusion.training import main

    data = work / f"data-{subject.name}"
    if not data.exists():
        make_subject_dataset(data, subject, n=6)
    out = work / f"{subject.name}-{variant.replace(' ', '_').replace(',', '')}-{seed}"
    flags = [*TRAIN_FLAGS, "--rank", "4", "--seed", str(seed)]  # later flags win: the rank docs/quality.md measured
    extra = list(VARIANTS[variant])
    if "--train_text_encoder_ti" in extra:
        extra += ["--token_abstraction", subject.trigger]
    argv = ["--pretrained_model_name_or_path", str(PIPELINE_DIR), "--dataset", str(data), "--output_dir", str(out),
            "--overwrite_output_dir", "--max_train_steps", str(steps), "--validation_prompt", "none", *flags, *extra]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        main(argv)
    return out


def evaluate(subject, adapter: Path, variant: str) -> dict[str, float]:
    from dora_diffusion import toyworld
    from dora_diffusion.toyworld.finetune import sample
    from dora_diffusion.training.step.pivotal import replace_abstractions, token_plan

    pipe = toyworld.load_pipeline()
    pipe.load_dora_weights(adapter)
    trigger, t_seeds, klass, c_seeds = eval_prompts(subject)
    shown = trigger
    if "pivotal" in variant:
        plan = token_plan(subject.trigger, 2)
        shown = [replace_abstractions(p, plan) for p in trigger]
    images = sample(pipe, pipe.unet, shown + klass, t_seeds + c_seeds)
    on_trigger = toyworld.score(images[:8], trigger, subject)
    on_class = toyworld.score(images[8:], klass, subject)
    return {
        "subject_fidelity": on_trigger["subject_fidelity"],
        "prompt_fidelity": on_trigger["prompt_fidelity"],
        "prior_preservation": on_class["prior_preservation"],
    }


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{**r, "seed": int(r["seed"]), **{k: float(r[k]) for k in (*METRICS, "train_s")}} for r in csv.DictReader(f)]


def paired(rows: list[dict], variant: str, metric: str) -> tuple[float, float, int]:
    """Mean of (variant - plain DoRA) over runs paired on (subject, seed), with its 95% half-interval."""
    by = {(r["subject"], r["seed"], r["variant"]): r[metric] for r in rows}
    diffs = [v - by[(s, seed, "dora")] for (s, seed, name), v in by.items() if name == variant and (s, seed, "dora") in by]
    if len(diffs) < 2:
        return float("nan"), float("nan"), len(diffs)
    return mean_interval(diffs)


def report(rows: list[dict]) -> str:
    lines = ["| variant | subject | subject fidelity | prompt fidelity | prior preservation | train s |", "|---|---|---|---|---|---|"]
    for variant in VARIANTS:
        for subject in sorted({r["subject"] for r in rows}):
            sel = [r for r in rows if r["variant"] == variant and r["subject"] == subject]
            if sel:
                cells = [f"{statistics.mean(r[m] for r in sel):.2f}" for m in (*METRICS, "train_s")]
                lines.append(f"| {variant} | {subject} | " + " | ".join(cells) + " |")
    lines += ["", "Paired against plain DoRA (same subject and seed), mean difference ± 95% interval:", "",
              "| variant | subject fidelity | prompt fidelity | prior preservation | pairs |", "|---|---|---|---|---|"]  # fmt: skip
    for variant in VARIANTS:
        if variant == "dora":
            continue
        cells, n = [], 0
        for m in METRICS:
            mean, half, n = paired(rows, variant, m)
            cells.append(f"{mean:+.3f} ± {half:.3f}")
        if n >= 2:  # a variant not run (or run once) has no interval: no row, rather than a row of nan
            lines.append(f"| {variant} | " + " | ".join(cells) + f" | {n} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="Work folder; runs.csv there makes an interrupted sweep resume.")
    ap.add_argument("--subjects", default="dotted_heart,ring_star")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="Comma-separated subset of the variants.")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--markdown", default=None, help="Also write the tables to this file.")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: OpenMP spins badly on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from dora_diffusion.toyworld import SUBJECTS

    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    path = work / "runs.csv"
    rows = read_rows(path)
    done = {(r["subject"], r["variant"], r["seed"]) for r in rows}
    variants = [v for v in args.variants.split(",") if v]
    start = time.perf_counter()
    for name in args.subjects.split(","):
        for variant in variants:
            for seed in (int(s) for s in args.seeds.split(",")):
                if (name, variant, seed) in done:
                    continue
                subject = SUBJECTS[name]
                t0 = time.perf_counter()
                adapter = train(subject, variant, seed, work, args.steps)
                row = {"subject": name, "variant": variant, "seed": seed, **evaluate(subject, adapter, variant),
                       "train_s": time.perf_counter() - t0}  # fmt: skip
                new = not path.exists()
                with open(path, "a", newline="") as f:
                    writer = csv.DictWriter(f, FIELDS)
                    if new:
                        writer.writeheader()
                    writer.writerow(row)
                rows.append(row)
                print(f"[{time.perf_counter() - start:.0f} s] {name} / {variant} / seed {seed}: "
                      + ", ".join(f"{m} {row[m]:.2f}" for m in METRICS), flush=True)  # fmt: skip
    text = report(rows)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
