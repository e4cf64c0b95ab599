"""docs/quality.md's sweep v2 figures are ``benchmarks/bench_sweep.py --report`` on the runs the sweep wrote
(``benchmarks/data/sweep_v2/runs.csv``), and those runs are exactly the ones the sweep's one command names."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_sweep  # noqa: E402
from common import mean_interval, t95  # noqa: E402

RUNS = REPO / "benchmarks" / "data" / "sweep_v2" / "runs.csv"
ALL_PARTS = ["attn", "all", "all_long", "prior", "ft", "ft_low"]


def _t_cdf(x: float, df: int, steps: int = 20000) -> float:
    """P(T <= x) for Student's t, by Simpson's rule on its density (independent of the table)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    f = lambda t: c * (1 + t * t / df) ** (-(df + 1) / 2)  # noqa: E731
    h = x / steps
    area = f(0) + f(x) + sum((4 if i % 2 else 2) * f(i * h) for i in range(1, steps))
    return 0.5 + area * h / 3


@pytest.mark.parametrize("df", [1, 2, 4, 9, 14, 19, 29, 30, 40, 60])
def test_t95_is_the_975_quantile(df):
    assert _t_cdf(t95(df), df) == pytest.approx(0.975, abs=2e-4)


def test_t95_between_tabulated_degrees_is_the_wider_interval():
    assert t95(35) == t95(30) > t95(40)
    assert _t_cdf(t95(35), 35) > 0.975
    assert math.isnan(t95(0))


def test_differences_pair_dora_with_lora_of_the_same_run():
    rows = [dict(part="attn", targets="attn", target="dotted_heart", method=m, rank=4, seed=s, fidelity=f,
                 prompt_fidelity=0.0, preservation=0.0, train_s=1.0)
            for m, s, f in [("dora", 0, 0.9), ("lora", 0, 0.7), ("dora", 1, 0.8), ("lora", 1, 0.75), ("dora", 2, 0.5)]]  # fmt: skip
    d = bench_sweep.differences(rows, "fidelity", rank=4)
    assert sorted(round(v, 6) for v in d) == [0.05, 0.2]  # seed 2 has no LoRA run: not paired
    mean, half, n = mean_interval(d)
    assert (round(mean, 6), n) == (0.125, 2)
    assert half == pytest.approx(12.706 * 0.075)  # t(1) * sd 0.15/sqrt(2) / sqrt(2)


def test_the_one_command_names_exactly_the_runs_reported():
    rows = bench_sweep.read_rows(RUNS)
    keys = [bench_sweep.key(r) for r in rows]
    assert len(keys) == len(set(keys))
    assert set(keys) == {bench_sweep.key(j) for j in bench_sweep.jobs(ALL_PARTS)}


def test_docs_quality_holds_the_report_of_those_runs():
    text = bench_sweep.report(bench_sweep.read_rows(RUNS))
    docs = (REPO / "docs" / "quality.md").read_text()
    assert text in docs
    assert "python benchmarks/bench_sweep.py --out benchmarks/data/sweep_v2 --report" in docs


def test_the_demo_quotes_the_sweep_at_its_own_rank():
    """The demo's paragraph quotes DoRA - LoRA at its recipe: the sweep's ``attn`` rows on its subject at its rank."""
    from dora_diffusion import demo

    flags = list(demo.TRAIN_FLAGS)
    rank = int(flags[flags.index("--rank") + 1])
    d = bench_sweep.differences(bench_sweep.read_rows(RUNS), "fidelity", part="attn", target=demo.SUBJECT.name, rank=rank)
    assert len(d) == 20
    mean, half, _ = mean_interval(d)
    assert demo.SWEEP_GAP == f"{mean:+.3f} ± {half:.3f}"
    assert f"over {len(d)} training seeds" in demo.explain_scores(_demo_scores())


def _demo_scores():
    from dora_diffusion.compare.plan import Column
    from dora_diffusion.compare.scores import ColumnScore

    values = {"subject fidelity": 0.5, "prompt fidelity": 0.5}
    return [ColumnScore(Column(name, None if name is None else 1.0), 4, values) for name in (None, "dora", "lora")]


def test_every_run_is_read_at_its_parts_draws():
    """A part whose runs were scored again at more draws (``PART_REPEATS``) holds no row read at the old count."""
    rows = bench_sweep.read_rows(RUNS)
    assert bench_sweep.stale(rows) == []
    assert {r["repeats"] for r in rows if r["part"] == "all_long"} == {8}
    assert [r["repeats"] for r in rows] == [bench_sweep.repeats_of(r) for r in rows]


def test_the_most_specific_repeats_entry_wins(monkeypatch):
    monkeypatch.setattr(bench_sweep, "PART_REPEATS", {"all": 2, ("all", "icon"): 4, ("all", "icon", 1): 8})
    run = dict(part="all", target="icon", rank=1)
    assert bench_sweep.repeats_of(run) == 8
    assert bench_sweep.repeats_of({**run, "rank": 2}) == 4
    assert bench_sweep.repeats_of({**run, "target": "dotted_heart"}) == 2
    assert bench_sweep.repeats_of({**run, "part": "attn"}) == 1


def test_more_draws_read_the_same_prompts_and_seeds_first():
    import bench_reach

    target = bench_reach.target_of("wide_ring_star")
    trigger, klass, t_seeds, c_seeds = bench_reach.eval_batch(target)
    assert (len(trigger), len(klass), t_seeds, c_seeds) == (8, 4, list(range(100, 108)), list(range(200, 204)))
    more = bench_reach.eval_batch(target, repeats=8)
    assert (len(more[0]), len(more[1])) == (64, 32)
    assert (more[0][:8], more[1][:4], more[2][:8], more[3][:4]) == (trigger, klass, t_seeds, c_seeds)
    assert more[2][-1] < 200 and len(set(more[2] + more[3])) == 96  # no seed drawn twice
    with pytest.raises(ValueError, match="repeats must be 1 to 12"):
        bench_reach.eval_batch(target, repeats=13)


def test_a_runs_csv_from_before_the_repeats_column_reads_as_one_draw_and_is_upgraded(tmp_path):
    path = tmp_path / "runs.csv"
    old = [f"all_long,all,wide_ring_star,{m},{r},0,0.25,0.5,0.75,60.0" for r in bench_sweep.RANKS for m in ("dora", "lora")]
    path.write_text(",".join(bench_sweep.FIELDS[:-1]) + "\n" + "\n".join(old) + "\n")
    rows = bench_sweep.read_rows(path)
    assert [r["repeats"] for r in rows] == [1] * 8 and rows[0]["fidelity"] == 0.25
    assert bench_sweep.stale(rows) == list(range(8))  # all_long asks for 8 draws
    bench_sweep.sweep(tmp_path, ["all_long"], [0], workers=1, threads=1)  # every run held: nothing trained
    text = path.read_text().splitlines()
    assert text[0] == ",".join(bench_sweep.FIELDS)
    assert text[1:] == [line + ",1" for line in old]
    assert not (tmp_path / "runs.csv.tmp").exists()


def test_rescore_reads_again_only_the_stale_rows_of_the_parts_and_targets_named(tmp_path, monkeypatch):
    import concurrent.futures

    class Inline(concurrent.futures.Executor):  # the pool, in this process (the fake scorer is not picklable)
        def __init__(self, max_workers=None):
            pass

        def submit(self, fn, *args):
            fut = concurrent.futures.Future()
            fut.set_result(fn(*args))
            return fut

    def fake_rescore(work, row, threads):
        return {**row, "fidelity": row["fidelity"] + 0.5, "repeats": bench_sweep.repeats_of(row)}

    monkeypatch.setattr(bench_sweep, "ProcessPoolExecutor", Inline)
    monkeypatch.setattr(bench_sweep, "rescore_one", fake_rescore)
    monkeypatch.setattr(bench_sweep, "PART_REPEATS", {"all": 8})
    rows = [dict(part=part, targets="all" if part == "all" else "attn", target=target, method=m, rank=2, seed=0,
                 fidelity=0.25, prompt_fidelity=0.5, preservation=0.75, train_s=9.0, repeats=1)
            for part in ("all", "attn") for target in ("icon", "dotted_heart") for m in ("dora", "lora")]  # fmt: skip
    path = tmp_path / "runs.csv"
    bench_sweep.write_rows(path, rows)
    bench_sweep.rescore(tmp_path, ["all"], workers=1, threads=1, targets=("icon",))
    after = bench_sweep.read_rows(path)
    changed = [(r["part"], r["target"]) for r in after if r["fidelity"] != 0.25]
    assert changed == [("all", "icon"), ("all", "icon")]
    assert [r["repeats"] for r in after] == [8, 8] + [1] * 6 and [r["train_s"] for r in after] == [9.0] * 8
    assert bench_sweep.stale(after) == [2, 3]  # all on dotted_heart is still read at 1 draw: another call's
    bench_sweep.rescore(tmp_path, ["all"], workers=1, threads=1)
    assert bench_sweep.stale(bench_sweep.read_rows(path)) == []
