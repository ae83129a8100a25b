"""CI checks of the toy benchmark on a flow-matching teacher (issue 14 section 3): `--quick --teacher-kind flow`
produces the flow rows (teacher Euler and Heun, PeRFlow K = 4 and K = 2) and no DDIM / DPM++ row, the flow meta,
students written as flow deltas and the flow targets; a teacher kind that disagrees with the teacher file, or a
phase the kind does not run, is refused; no sampler of one kind can run for the other."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from benchmarks.toy import cli
from benchmarks.toy.sampling import TEACHER_SAMPLERS, Sampler, run_sampler
from benchmarks.toy.targets import check_targets

REPO = Path(__file__).resolve().parents[1]
FLOW_TEACHER = REPO / "training" / "teacher" / "toy_flow_teacher.safetensors"
TEACHER = REPO / "training" / "teacher" / "toy_teacher.safetensors"
CFGS = (1.0, 2.5)


def flow_rows(ref_steps: int) -> set[tuple]:
    """(group, model, sampler, steps, cfg) of a flow teacher's main phase."""
    rows = set()
    for cfg in CFGS:
        rows |= {("main", "teacher", "euler", s, cfg) for s in (1, 2, 4, 5, 6, 7, 8, 16, ref_steps)}
        rows |= {("main", "teacher", "heun", s, cfg) for s in (2, 3, 4)}
        rows |= {("main", "teacher (no delta)", "perflow-K4", 4, cfg), ("main", "perflow-K2", "perflow-K2", 2, cfg)}
        rows |= {("main", "perflow", "perflow-K4", s, cfg) for s in (4, 5, 6, 7, 8)}
    return rows


@pytest.mark.skipif(not FLOW_TEACHER.is_file(), reason="bundled toy flow teacher not present")
def test_quick_flow_benchmark(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.toy", "--quick", "--teacher-kind", "flow", "--out", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads((tmp_path / "results.json").read_text())
    meta, records = out["meta"], out["records"]
    got = [(r["group"], r["model"], r["sampler"], r["steps"], r["cfg"]) for r in records]
    assert len(got) == len(set(got)) and set(got) == flow_rows(meta["budget"]["ref_steps"])
    for r in records:  # Heun: two evaluations per step but the last; guidance doubles every count
        per_pass = 2 * r["steps"] - 1 if r["sampler"] == "heun" else r["steps"]
        assert r["nfe"] == per_pass * (1 if r["cfg"] == 1.0 else 2), r
        assert all(math.isfinite(r[k]) for k in ("paired_mse", "fd_ref", "fd_real", "acc"))
    ref = [r for r in records if r["sampler"] == "euler" and r["steps"] == meta["budget"]["ref_steps"]]
    assert all(r["paired_mse"] == 0.0 for r in ref)  # the reference row is the reference itself
    assert meta["teacher_kind"] == "flow" and meta["flow_shift"] == 1.0 and meta["reference"].startswith("euler-")
    assert Path(meta["teacher"]).name == FLOW_TEACHER.name
    assert meta["reduced"] and not any(x.endswith(" skipped") for x in meta["reduced_by"])  # main is all it runs
    recipes = meta["training"]["recipes"]
    assert set(recipes) == {"perflow", "perflow-K2"}
    assert all(
        r["reflow"]["time_kind"] == "flow" and r["reflow"]["parameterization"] == "velocity" for r in recipes.values()
    )
    for name in recipes:
        with safe_open(str(tmp_path / f"{name}.safetensors"), framework="pt") as f:
            delta_meta = f.metadata()
        assert delta_meta["time_kind"] == "flow" and float(delta_meta["flow_shift"]) == 1.0
    names = [t["target"] for t in out["targets"]]
    assert any(n.startswith("flow floor") for n in names) and any(n.startswith("flow goal") for n in names)
    assert all(t["pass"] is not None for t in out["targets"])
    assert not any("DDIM" in n or "DPM" in n for n in names)
    md = (tmp_path / "results.md").read_text()
    assert md.startswith("# PeRFlow toy benchmark: REDUCED RUN") and "teacher Euler-K" in md
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "error_vs_steps.png").is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--teacher-kind", "diffusion", "--teacher", str(FLOW_TEACHER)], "is a flow model"),
        (["--teacher-kind", "flow", "--teacher", str(TEACHER)], "is a diffusion model"),
        (["--teacher-kind", "flow", "--phases", "main,cfg_schedule"], "cfg_schedule not run for a flow teacher"),
        (["--teacher", "no/such/teacher.safetensors"], "toy model not found: no/such/teacher.safetensors"),
    ],
)
def test_kind_mismatch_is_refused(tmp_path, capsys, argv, message):
    """A teacher kind that disagrees with the file's metadata time_kind ends in one error line, before any output."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        cli.parse_args([*argv, "--out", str(out)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "Traceback" not in err
    assert not out.exists()


def test_kind_is_read_from_the_teacher_file(tmp_path):
    """Without --teacher-kind the file decides; with --teacher-kind flow alone the bundled flow teacher is used."""
    assert cli.parse_args(["--teacher", str(FLOW_TEACHER), "--out", str(tmp_path)]).teacher_kind == "flow"
    assert cli.parse_args(["--out", str(tmp_path)]).teacher_kind == "diffusion"
    args = cli.parse_args(["--teacher-kind", "flow", "--out", str(tmp_path)])
    assert args.teacher == FLOW_TEACHER and args.teacher_kind == "flow"


class NeverCalled(torch.nn.Module):
    num_classes = 10

    def forward(self, *a):
        raise AssertionError("a sampler of the wrong kind reached the network")


@pytest.mark.parametrize(
    "kind, name", [(k, n) for k in TEACHER_SAMPLERS for o in TEACHER_SAMPLERS if o != k for n in TEACHER_SAMPLERS[o]]
)
def test_no_sampler_of_another_kind(kind, name):
    """A flow teacher cannot be sampled with DDIM / DPM++, nor an eps teacher with flow Euler / Heun."""
    with pytest.raises(KeyError):
        run_sampler(
            NeverCalled(), torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), Sampler(name, 4, 1.0), kind
        )


@pytest.mark.parametrize("ratio, floor, goal", [(1.2, False, False), (0.8, True, False), (0.5, True, True)])
def test_flow_targets_floor_and_goal(ratio, floor, goal):
    """PeRFlow-4 / Euler-4 paired MSE at CFG 1 decides the floor (<= 1.0x) and the goal (<= 0.5x)."""
    rows = {("teacher", "euler", 4): 0.01, ("perflow", "perflow-K4", 4): 0.01 * ratio}
    rows |= {("teacher (no delta)", "perflow-K4", 4): 0.01, ("perflow-K2", "perflow-K2", 2): 0.02}
    records = [
        {"group": "main", "model": m, "sampler": s, "steps": n, "cfg": 1.0, "paired_mse": v}
        for (m, s, n), v in rows.items()
    ]
    trend = [{"recipe": "perflow", "paired_mse": v, "teacher_mse": 0.01} for v in (0.009, 0.007)]
    verdicts = {t["target"].split(":")[0]: t["pass"] for t in check_targets(records, trend, "flow")}
    assert verdicts["flow floor"] is floor and verdicts["flow goal"] is goal
    assert verdicts["training works"] is True and verdicts["moonshot"] is False
