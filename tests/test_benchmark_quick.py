"""CI check of the reproduction benchmark: `--quick` produces every row, finite numbers, and its outputs."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEACHER = REPO / "training" / "teacher" / "toy_teacher.safetensors"
CFGS = (1.0, 2.5)


def expected_rows() -> set[tuple]:
    """(group, model, sampler, steps, cfg) of every row the benchmark must produce."""
    rows = set()
    for cfg in CFGS:
        rows |= {("main", "teacher", "ddim", s, cfg) for s in (1, 2, 4, 8, 16, 100)}
        rows |= {("main", "teacher", "ddim-normal", 4, cfg)}
        rows |= {("main", "teacher", "dpmpp_2m", s, cfg) for s in (4, 8)}
        rows |= {("main", "teacher (no delta)", "perflow-K4", 4, cfg), ("main", "perflow", "perflow-K2", 2, cfg)}
        rows |= {("main", "perflow", "perflow-K4", s, cfg) for s in (4, 8)}
        rows |= {
            ("param", f"{p} 3s grid {g}", "perflow-K4", 4, cfg) for p in ("diff_eps", "velocity") for g in (1000, 8)
        }
        rows |= {
            ("param", f"{p} 1.5s grid {g}", "perflow-K4", 4, 1.0) for p in ("diff_eps", "velocity") for g in (1000, 8)
        }
        pnp = [("finetune+delta", "perflow-K4"), ("finetune", "perflow-K4"), ("finetune", "ddim")]
        rows |= {("plug_and_play", m, s, 4, cfg) for m, s in pnp}
        rows |= {("plug_and_play", "teacher", "ddim", 100, cfg)}
    for steps in (4, 8):
        for cfg in ("1,1,1,1", "2.5,1,1,1", "2.5,2.5,1,1", "2.5,2,1.5,1", "2.5,2.5,2.5,2.5"):
            rows.add(("cfg_schedule", "perflow", "perflow-K4", steps, cfg))
    return rows


def finite_numbers(obj) -> list[float]:
    """Every int/float inside a JSON value."""
    if isinstance(obj, dict):
        return [v for x in obj.values() for v in finite_numbers(x)]
    if isinstance(obj, list):
        return [v for x in obj for v in finite_numbers(x)]
    return [float(obj)] if isinstance(obj, (int, float)) and not isinstance(obj, bool) else []


@pytest.mark.skipif(not TEACHER.is_file(), reason="bundled toy teacher not present")
def test_quick_benchmark_produces_every_row(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.toy",
        "--quick",
        "--out",
        str(tmp_path),
        "--cache",
        str(tmp_path / "cache"),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads((tmp_path / "results.json").read_text())
    fields = ("model", "sampler", "steps", "cfg", "nfe", "paired_mse", "fd_ref", "fd_real", "acc", "seconds")
    for r in out["records"]:
        assert all(f in r for f in fields), r
    got = [(r["group"], r["model"], r["sampler"], r["steps"], r["cfg"]) for r in out["records"]]
    assert len(got) == len(set(got))
    assert set(got) == expected_rows()
    numbers = finite_numbers({k: out[k] for k in ("records", "trend", "cost", "param_curve")})
    assert numbers and all(math.isfinite(v) for v in numbers)
    assert len(out["trend"]) >= 2 and len(out["cost"]["train"]) == 5 and len(out["cost"]["delta_rss"]) >= 2
    assert len(out["targets"]) == 7
    assert len(out["param_curve"]) == 8 and all(p["seconds"] >= p["mark"] for p in out["param_curve"])
    plots = (
        ("error_vs_nfe.png", "trend.png", "param_vs_time.png") if importlib.util.find_spec("matplotlib") else ()
    )  # optional dependency
    for name in ("results.md", "perflow_delta_K4.safetensors", *plots):
        assert (tmp_path / name).is_file(), name
    assert len(list((tmp_path / "grids").glob("*.png"))) == len(got)
