"""The DoRA paper's section 3 on the toy world (issue 33 item 4): ΔM against ΔD per layer and checkpoint, for the
query and the value matrices separately, FT, LoRA and DoRA, with intervals over runs.

    python benchmarks/bench_sweep.py --out bench-sweep --part attn,ft          # the runs (checkpoints every 50 steps)
    python benchmarks/bench_decomposition.py --sweep bench-sweep --markdown decomposition.md --figure decomposition.png

Every run of bench_sweep.py's ``attn`` part (DoRA and LoRA, ranks 1-8) and of its ``ft`` part on ``attn`` holds
checkpoints at 50, 100 and 150 steps. For each checkpoint and each adapted module the change is measured with
``dora_diffusion.analysis`` (``analyze_pipeline``: the paper's Eq. 3-4, ΔM = mean |m' − m0| over output channels,
ΔD = mean (1 − cos) of the channels). A run's points are then fitted (least squares ΔM on ΔD, Pearson r) four ways:

- ``paper q`` / ``paper v``: the query (value) matrices only, every layer and checkpoint pooled, as the paper's Figure 2
  (query) and Figure 7 (value) pool them: one point per layer and checkpoint;
- ``per step q``: the query matrices at one checkpoint (r across layers only), the mean over the run's checkpoints;
- ``mixed``: every adapted module (to_q, to_k, to_v, to_out of self- and cross-attention) and checkpoint pooled, as
  docs/analysis.md's example did (r = +0.84 for FT);
- ``q, relative ΔM``: ``paper q`` with each layer's ΔM divided by its base weight's mean row norm (a layer with
  larger weights shows a larger ΔM for the same relative change: is the sign made by the layers' scales?).

Per method (FT, LoRA, DoRA) the table gives the mean r and slope over runs (targets x seeds x ranks) with a 95% t
interval, and how many runs have a negative slope. Rows are cached in ``SWEEP/decomposition.csv`` (a rerun measures
only new runs).
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import mean_interval  # noqa: E402

RUN = re.compile(r"^(?P<part>attn|ft|ft_low)-attn-(?P<target>[a-z_]+)-(?P<method>dora|lora|ft)-r(?P<rank>\d+)-s(?P<seed>\d+)$")
FIELDS = ("run", "method", "rank", "target", "seed", "step", "module", "delta_M", "delta_D", "m0")
WAYS = ("paper q", "paper v", "per step q", "mixed", "q, relative ΔM")


def measure(runs: list[Path]) -> list[dict]:
    """ΔM and ΔD of every module at every checkpoint of ``runs`` (the toy world's base model), with the base weight's
    mean row norm ``m0``."""
    import torch

    from dora_diffusion import toyworld
    from dora_diffusion.analysis import analyze_pipeline
    from dora_diffusion.pipeline import delete_dora_adapters

    pipe = toyworld.load_pipeline()
    norms = {n: float(m.weight.detach().flatten(1).norm(dim=1).mean()) for n, m in pipe.unet.named_modules()
             if hasattr(m, "weight") and isinstance(getattr(m, "weight"), torch.Tensor) and m.weight.dim() >= 2}  # fmt: skip
    rows = []
    for run in runs:
        m = RUN.match(run.name)
        for ckpt in sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):
            pipe.load_dora_weights(ckpt / "pytorch_lora_weights.safetensors", adapter_name="x")
            method = "ft lr 1e-4" if m["part"] == "ft_low" else m["method"]
            for r in analyze_pipeline(pipe, ["x"]):
                rows.append({"run": run.name, "method": method, "rank": int(m["rank"]), "target": m["target"],
                             "seed": int(m["seed"]), "step": int(ckpt.name.split("-")[1]), "module": r.module,
                             "delta_M": r.delta_M, "delta_D": r.delta_D, "m0": norms[r.module]})  # fmt: skip
            delete_dora_adapters(pipe, "x")
    return rows


def fits(rows: list[dict]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """method -> way -> [(r, slope) per run]."""
    from dora_diffusion.analysis.decomposition import fit_line

    by_run: dict[str, list[dict]] = {}
    for r in rows:
        by_run.setdefault(r["run"], []).append(r)
    out: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for points in by_run.values():
        method = points[0]["method"]
        ways = out.setdefault(method, {w: [] for w in WAYS})

        def fit(sel: list[dict]) -> tuple[float, float]:
            f = fit_line([p["delta_D"] for p in sel], [p["delta_M"] for p in sel])
            return f.r, f.slope

        q = [p for p in points if p["module"].endswith(".to_q")]
        ways["paper q"].append(fit(q))
        ways["paper v"].append(fit([p for p in points if p["module"].endswith(".to_v")]))
        steps = sorted({p["step"] for p in q})
        per = [fit([p for p in q if p["step"] == s]) for s in steps]
        ways["per step q"].append((statistics.mean(x[0] for x in per), statistics.mean(x[1] for x in per)))
        ways["mixed"].append(fit(points))
        f = fit_line([p["delta_D"] for p in q], [p["delta_M"] / p["m0"] for p in q])
        ways["q, relative ΔM"].append((f.r, f.slope))
    return out


def table(result: dict[str, dict[str, list[tuple[float, float]]]]) -> str:
    lines = ["| method | points fitted | runs | r (mean ± 95%) | slope (mean ± 95%) | runs with slope < 0 |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for method in ("ft", "ft lr 1e-4", "lora", "dora"):
        for way in WAYS:
            vals = [v for v in result.get(method, {}).get(way, []) if not math.isnan(v[0])]
            if not vals:
                continue
            r, rh, n = mean_interval([v[0] for v in vals])
            s, sh, _ = mean_interval([v[1] for v in vals])
            neg = sum(v[1] < 0 for v in vals)
            rtxt = f"{r:+.2f} ± {rh:.2f}" if n > 1 else f"{r:+.2f}"
            stxt = f"{s:+.3g} ± {sh:.2g}" if n > 1 else f"{s:+.3g}"
            label = {"ft": "FT (lr 5e-4)", "ft lr 1e-4": "FT (lr 1e-4)", "lora": "LoRA", "dora": "DoRA"}[method]
            lines.append(f"| {label} | {way} | "
                         f"{n} | {rtxt} | {stxt} | {neg} of {n} |")  # fmt: skip
    return "\n".join(lines)


def figure(rows: list[dict], path: Path) -> Path:
    """Query matrices, one run per method (seed 0, rank 8, first target found): ΔM against ΔD, colour = checkpoint."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.8), dpi=110)
    FigureCanvasAgg(fig)
    for k, method in enumerate(("ft", "lora", "dora")):
        ax = fig.add_subplot(1, 3, k + 1)
        cand = [r for r in rows if r["method"] == method and r["seed"] == 0 and r["rank"] in (0, 8)]
        if not cand:
            continue
        run = sorted({r["run"] for r in cand})[0]
        q = [r for r in cand if r["run"] == run and r["module"].endswith(".to_q")]
        for step in sorted({r["step"] for r in q}):
            pts = [r for r in q if r["step"] == step]
            ax.scatter([p["delta_D"] for p in pts], [p["delta_M"] for p in pts], s=14, label=f"step {step}")
        ax.set_title(f"{dict(ft='FT', lora='LoRA', dora='DoRA')[method]}: {run}", fontsize=8)
        ax.set_xlabel("ΔD (query matrices)")
        if k == 0:
            ax.set_ylabel("ΔM")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", required=True, help="bench_sweep.py's --out folder")
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--figure", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seeds", default="0,1,2,3,4", help="Seeds of the runs to fit (the sweep's FT parts have 0-4).")
    args = ap.parse_args()
    seeds = {int(s) for s in args.seeds.split(",") if s}
    import torch

    torch.set_num_threads(args.threads)
    sweep = Path(args.sweep)
    cache = sweep / "decomposition.csv"
    rows: list[dict] = []
    if cache.is_file():
        with open(cache, newline="") as f:
            rows = [{**r, "rank": int(r["rank"]), "seed": int(r["seed"]), "step": int(r["step"]),
                     "delta_M": float(r["delta_M"]), "delta_D": float(r["delta_D"]), "m0": float(r["m0"])}
                    for r in csv.DictReader(f)]  # fmt: skip
    done = {r["run"] for r in rows}
    runs = [p for p in sorted((sweep / "runs").iterdir()) if RUN.match(p.name) and p.name not in done
            and int(RUN.match(p.name)["seed"]) in seeds and (p / "pytorch_lora_weights.safetensors").is_file()]  # fmt: skip
    new = measure(runs)
    if new:
        fresh = not cache.is_file()
        with open(cache, "a", newline="") as f:
            w = csv.DictWriter(f, FIELDS)
            if fresh:
                w.writeheader()
            w.writerows(new)
        rows += new
    rows = [r for r in rows if r["seed"] in seeds]
    text = table(fits(rows))
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.figure:
        print(f"wrote {figure(rows, Path(args.figure))}")


if __name__ == "__main__":
    main()
