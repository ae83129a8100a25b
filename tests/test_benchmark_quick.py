"""CI checks of the toy benchmark (benchmarks/toy): `--quick` produces every row, finite numbers, the meta block,
the reduced label and its outputs; it runs on another --teacher/--data pair with a phase subset; the plug-and-play
domain shift thickens the foreground of any data set; a budget below the full run is labelled reduced."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.toy import report
from benchmarks.toy.budget import PHASES, Budget, budget_from
from benchmarks.toy.models import thicken

REPO = Path(__file__).resolve().parents[1]
TEACHER = REPO / "training" / "teacher" / "toy_teacher.safetensors"
CFGS = (1.0, 2.5)
K4 = ("perflow", "perflow-published", "perflow-grid8")


def main_rows(ref_steps: int) -> set[tuple]:
    """(group, model, sampler, steps, cfg) of the main phase."""
    rows = set()
    for cfg in CFGS:
        rows |= {("main", "teacher", "ddim", s, cfg) for s in (1, 2, 4, 5, 6, 7, 8, 16, ref_steps)}
        rows |= {("main", "teacher", "ddim-normal", 4, cfg)}
        rows |= {("main", "teacher", "dpmpp_2m", s, cfg) for s in (4, 5, 6, 7, 8)}
        rows |= {("main", "teacher (no delta)", "perflow-K4", 4, cfg), ("main", "perflow-K2", "perflow-K2", 2, cfg)}
        rows |= {("main", m, "perflow-K4", s, cfg) for m in K4 for s in (4, 5, 6, 7, 8)}
    return rows


def plug_and_play_rows(ref_steps: int) -> set[tuple]:
    rows = set()
    for cfg in CFGS:
        pnp = [("finetune+delta", "perflow-K4", 4), ("finetune", "perflow-K4", 4), ("finetune", "ddim", 4)]
        rows |= {("plug_and_play", m, s, n, cfg) for m, s, n in pnp + [("teacher", "ddim", ref_steps)]}
    return rows


def expected_rows(ref_steps: int) -> set[tuple]:
    rows = main_rows(ref_steps) | plug_and_play_rows(ref_steps)
    rows |= {("param", m, "perflow-K4", 4, cfg) for m in ("perflow", "perflow-velocity") for cfg in CFGS}
    for steps in (4, 8):
        for cfg in ("1,1,1,1", "2.5,1,1,1", "2.5,2.5,1,1", "2.5,2,1.5,1", "2.5,2.5,2.5,2.5"):
            rows.add(("cfg_schedule", "perflow", "perflow-K4", steps, cfg))
    return rows


def numbers(obj) -> list[float]:
    """Every int/float inside a JSON value."""
    if isinstance(obj, dict):
        return [v for x in obj.values() for v in numbers(x)]
    if isinstance(obj, list):
        return [v for x in obj for v in numbers(x)]
    return [float(obj)] if isinstance(obj, (int, float)) and not isinstance(obj, bool) else []


def run_benchmark(out: Path, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.toy", "--quick", "--out", str(out), *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


def row_keys(out: dict) -> list[tuple]:
    return [(r["group"], r["model"], r["sampler"], r["steps"], r["cfg"]) for r in out["records"]]


@pytest.mark.skipif(not TEACHER.is_file(), reason="bundled toy teacher not present")
def test_quick_benchmark_produces_every_row(tmp_path):
    out = run_benchmark(tmp_path)
    meta = out["meta"]
    got = row_keys(out)
    assert len(got) == len(set(got))
    assert set(got) == expected_rows(meta["budget"]["ref_steps"])
    fields = ("nfe", "paired_mse", "fd_ref", "fd_real", "acc", "seconds")
    assert all(f in r for r in out["records"] for f in fields)
    values = numbers({k: out[k] for k in ("records", "trend", "cost")})
    assert values and all(math.isfinite(v) for v in values)
    assert meta["reduced"] is True and meta["reduced_by"] and meta["teacher_kind"] == "diffusion"
    recipes = meta["training"]["recipes"]
    assert set(recipes) == {*K4, "perflow-K2", "perflow-velocity"}
    assert recipes["perflow-published"]["reflow"]["sampler_point_share"] == 0.0
    assert recipes["perflow"]["lr_schedule"] == "cosine" and recipes["perflow"]["reflow"]["timestep_grid"] == 1000
    for recipe in recipes:  # every trained model: the same iterations, its trend in process CPU seconds
        curve = [p for p in out["trend"] if p["recipe"] == recipe]
        assert [p["iteration"] for p in curve] == [3, 6]
        assert meta["trained"][recipe]["iters"] == meta["budget"]["iters"]
        assert all(p["cpu_seconds"] > 0 for p in curve)
    assert len(out["targets"]) == 8 and all(t["pass"] is not None for t in out["targets"])
    assert len(out["cost"]["train"]) == 5 and len(out["cost"]["delta_read"]) == 2
    assert (tmp_path / "results.md").read_text().startswith("# PeRFlow toy benchmark: REDUCED RUN")
    plots = ("error_vs_time.png", "error_vs_steps.png") if importlib.util.find_spec("matplotlib") else ()
    for name in ("perflow.safetensors", "perflow-K2.safetensors", *plots):
        assert (tmp_path / name).is_file(), name
    assert len(list((tmp_path / "grids").glob("*.png"))) == len(got)


def test_other_teacher_and_data_with_a_phase_subset(tiny_toy, tmp_path):
    """A tiny 8x8 teacher and random data: the main and plug-and-play rows only, targets of skipped phases marked."""
    extra = ["--teacher", str(tiny_toy / "teacher.safetensors"), "--data", str(tiny_toy / "data.npz")]
    out = run_benchmark(tmp_path, *extra, "--phases", "main,plug_and_play")
    assert set(row_keys(out)) == main_rows(out["meta"]["budget"]["ref_steps"]) | plug_and_play_rows(
        out["meta"]["budget"]["ref_steps"]
    )
    assert {"cfg_schedule skipped", "param skipped", "cost skipped"} <= set(out["meta"]["reduced_by"])
    verdicts = {t["target"].split(" (")[0]: t["pass"] for t in out["targets"]}
    assert verdicts["diff_eps below velocity at equal iterations"] is None
    assert verdicts["plug-and-play"] is not None


strokes = st.lists(st.tuples(st.integers(0, 1), st.integers(1, 10), st.integers(1, 10)), min_size=1, max_size=6)


@settings(max_examples=30, deadline=None)
@given(strokes, st.floats(0.2, 1.0))
def test_thicken_grows_the_foreground_whichever_its_brightness(points, level):
    """Sparse strokes of either brightness: the stroke pixels only grow, and the inverted data set is thickened
    exactly as the inversion of the thickened one (a dark-stroke data set is not thinned)."""
    x = torch.full((2, 1, 12, 12), -1.0)
    for i, r, c in points:
        x[i, 0, r, c] = level
    dark_on_light = -x
    assert torch.equal(thicken(dark_on_light), -thicken(x))
    grown = thicken(x)
    assert ((grown > -1) >= (x > -1)).all() and (grown > -1).sum() > (x > -1).sum()


def test_budget_below_the_full_run_is_labelled_reduced():
    assert Budget().reduced() == [] and budget_from(False, {}, None).reduced() == []
    assert "iters=10" in budget_from(False, {"iters": 10}, None).reduced()
    assert "n=50" in budget_from(False, {"n": 50}, None).reduced()
    assert budget_from(False, {}, PHASES[:1]).reduced() == [f"{p} skipped" for p in PHASES[1:]]
    assert budget_from(True, {}, None).reduced()


@pytest.mark.skipif(not importlib.util.find_spec("matplotlib"), reason="matplotlib not installed")
def test_plots_of_a_run_without_the_main_phase(tmp_path):
    """`--phases plug_and_play` trains one model (a trend) and scores no main rows: the trend plot is written and the
    step-count plot, which has nothing to show, is skipped instead of failing the run after its results."""
    trend = [{"recipe": "perflow", "iteration": i, "cpu_seconds": 10.0 * i, "paired_mse": 0.1 / i, "teacher_mse": 0.05}
             for i in (1, 2)]  # fmt: skip
    records = [{"group": "plug_and_play", "model": "finetune", "sampler": "ddim", "steps": 4, "cfg": 1.0}]
    meta = {"teacher_kind": "diffusion", "reference": "ddim-100"}
    assert report.write_plots(tmp_path, {"trend": trend, "records": records, "meta": meta}) == ["error_vs_time.png"]
    assert (tmp_path / "error_vs_time.png").is_file() and not (tmp_path / "error_vs_steps.png").exists()
