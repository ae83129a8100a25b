"""PeRFlow on a flow-matching toy teacher: the flow ODE solvers, reflow batches on the flow line, the flow teacher's
objective and the training runs (metadata, refusals, exact resume, 2 processes = 1 process)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from perflow_core.delta_format import DeltaMetadata
from perflow_core.flow_windows import flow_sigmas, flow_window_sigmas, time_shift
from training import reflow
from training.checkpointing import load_checkpoint
from training.cli import UserError
from training.solvers import flow_ode_solve, shifted_sigmas, solve_teacher_flow
from training.toy_model import ToyUNet, load_toy_model, save_toy_model, toy_model_metadata, toy_time_kind
from training.train import train
from training.train_teacher import flow_loss
from training.train_teacher import main as train_teacher

REPO = Path(__file__).resolve().parents[1]
FLOW_TEACHER = REPO / "training" / "teacher" / "toy_flow_teacher.safetensors"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def flow_toy(tmp_path_factory):
    """A tiny random flow toy teacher (base 8, metadata time_kind flow) and 64 random 8x8 images."""
    d = tmp_path_factory.mktemp("flow_toy")
    torch.manual_seed(0)
    save_toy_model(d / "teacher.safetensors", ToyUNet(num_classes=10, in_channels=1, base=8), {"time_kind": "flow"})
    rng = np.random.default_rng(0)
    np.savez(d / "data.npz", images=rng.integers(0, 256, (64, 8, 8), dtype=np.uint8), labels=rng.integers(0, 10, 64))
    return d


def run_args(toy: Path, out: Path, *extra: str) -> list[str]:
    return [
        *("--teacher", str(toy / "teacher.safetensors"), "--data", str(toy / "data.npz"), "--out", str(out)),
        *("--batch-size", "8", "--threads", "1", "--solver-steps", "2", "--no-samples", "--warmup", "2", "--cpu"),
        *("--flow-shift", "3", "--sampler-point-share", "0.5", "--cond-dropout", "0.3"),
        *extra,
    ]


def test_euler_is_exact_for_constant_and_heun_for_linear_velocity():
    x = torch.randn(3, 1, 2, 2)
    c = torch.randn(3, 1, 2, 2)
    sigmas = shifted_sigmas(5, 3.0)
    assert torch.allclose(flow_ode_solve(lambda x_, s: c, x, sigmas), x - c, atol=1e-6)  # from s = 1 to 0
    # dx/ds = s: exact x(s') = x(s) - (s^2 - s'^2) / 2. Heun (trapezoid) is exact but on the last step to s = 0,
    # an Euler step there (s (s - 0) instead of s^2 / 2); Euler misses by s_i (s_i - s_(i+1)) on every step.
    heun = flow_ode_solve(lambda x_, s: s.view(-1, 1, 1, 1).expand_as(x_), x, sigmas, "heun")
    euler = flow_ode_solve(lambda x_, s: s.view(-1, 1, 1, 1).expand_as(x_), x, sigmas, "euler")
    s = sigmas.double()
    last = s[-2].item()
    assert torch.allclose(heun, x - (1 - last**2) / 2 - last**2, atol=1e-6)
    assert torch.allclose(euler - x, -(s[:-1] * (s[:-1] - s[1:])).sum().float().expand_as(x), atol=1e-6)
    evaluations = []
    flow_ode_solve(lambda x_, s: evaluations.append(s) or c, x, sigmas, "heun")
    assert len(evaluations) == 2 * 5 - 1 and all((s > 0).all() for s in evaluations)


def test_teacher_solve_is_per_item_and_guided():
    z = torch.randn(2, 1, 2, 2)
    s_s, s_e = torch.tensor([1.0, 0.5]), torch.tensor([0.75, 0.0])

    def teacher(x, s, cond):
        return cond.view(-1, 1, 1, 1).float().expand_as(x)  # velocity = the conditioning value

    cond, null = torch.tensor([2.0, -1.0]), torch.tensor([0.0, 0.0])
    out = solve_teacher_flow(teacher, z, s_s, s_e, 3, cond, cfg=2.5, null_cond=null)
    expected = z + (s_e - s_s).view(-1, 1, 1, 1) * (2.5 * cond).view(-1, 1, 1, 1)
    assert torch.allclose(out, expected, atol=1e-6)
    with pytest.raises(ValueError, match="null_cond"):
        solve_teacher_flow(teacher, z, s_s, s_e, 3, cond, cfg=2.0)


def test_reflow_batch_on_a_straight_teacher_targets_eps_minus_x0():
    """A teacher whose flow is exactly straight (one data point x0: v = (x - x0) / s): z_s, the solve, z_t and the
    target must all lie on x_s = (1 - s) x0 + s eps, whatever the window, shift and timepoint."""
    cfg = reflow.ReflowConfig(
        parameterization="velocity", time_kind="flow", flow_shift=3.0, solver_steps=3, sampler_point_share=0.5
    )
    cfg.validate()
    x0 = torch.randn(1, 1, 4, 4).expand(64, -1, -1, -1)
    t, noise, keep = reflow.draw_reflow_noise(cfg, 64, (1, 4, 4), torch.Generator().manual_seed(0))

    def teacher(x, s, cond):
        return (x - x0) / s.view(-1, 1, 1, 1)

    labels = torch.zeros(64, dtype=torch.long)
    b = reflow.make_reflow_batch(cfg, teacher, x0, labels, labels + 1, torch.ones(1000), t, noise, keep)
    s = t.view(-1, 1, 1, 1)
    assert torch.allclose(b.z_t, (1 - s) * x0 + s * noise, atol=1e-5)
    assert torch.allclose(b.target, noise - x0, atol=1e-4)
    bounds = set(flow_window_sigmas(4, 3.0).tolist())
    assert any(v in bounds for v in t.tolist())  # sampler points at window starts were drawn


def test_flow_timepoints_are_shifted_grid_times_and_schedule_points():
    t = reflow.sample_timepoints(4000, 8, torch.Generator().manual_seed(0), flow_shift=3.0)
    assert set(t.tolist()) == set(time_shift(1 - torch.arange(8) / 8, 3.0).float().tolist())
    points, mass = reflow.sampler_points(4, (4, 8), flow_shift=3.0)
    expected = set(flow_sigmas(4, 4, 3.0)[:-1].tolist()) | set(flow_sigmas(8, 4, 3.0)[:-1].tolist())
    assert set(points.tolist()) == expected and mass.sum().item() == pytest.approx(1.0)
    assert mass[points.tolist().index(1.0)] == pytest.approx(0.5 / 4 + 0.5 / 8)  # shared by both schedules


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"parameterization": "diff_eps", "time_kind": "flow"}, "velocity for a flow teacher"),
        ({"parameterization": "velocity", "time_kind": "flow", "flow_shift": 0.0}, "flow shift"),
        ({"flow_shift": 3.0}, "flow_shift"),
        ({"time_kind": "rectified"}, "time_kind"),
    ],
)
def test_reflow_config_refuses_mixed_time_kinds(change, match):
    with pytest.raises(ValueError, match=match):
        reflow.ReflowConfig(**change).validate()


def test_diffusion_settings_read_as_before_flow():
    assert "time_kind" not in reflow.ReflowConfig().as_dict()  # SD checkpoints written earlier still resume
    flow = reflow.ReflowConfig(parameterization="velocity", time_kind="flow", flow_shift=3.0).as_dict()
    assert flow["time_kind"] == "flow" and flow["flow_shift"] == 3.0


def test_flow_objective_is_velocity_on_the_straight_line():
    """A model that knows x0 and answers eps - x0 from (x_s, s) has zero flow loss: x_s = (1 - s) x0 + s eps, fed
    s*1000."""
    x0 = torch.randn(16, 1, 4, 4)

    class Oracle(torch.nn.Module):
        num_classes = 10

        def forward(self, xs, timestep, labels):
            s = (timestep / 1000).view(-1, 1, 1, 1)
            eps = (xs - (1 - s) * x0) / s
            return eps - x0

    loss = flow_loss(Oracle(), x0, torch.zeros(16, dtype=torch.long), 0.1, torch.Generator().manual_seed(0))
    assert loss.item() < 1e-8


def test_train_teacher_flow_writes_a_flow_teacher(flow_toy, tmp_path):
    out = tmp_path / "t.safetensors"
    train_teacher(["--objective", "flow", "--data", str(flow_toy / "data.npz"), "--out", str(out), "--steps", "2"]
                  + ["--batch", "4", "--base", "8", "--warmup", "1", "--threads", "1"])  # fmt: skip
    meta = toy_model_metadata(out)
    assert meta["time_kind"] == "flow" and meta["objective"] == "velocity" and toy_time_kind(out) == "flow"


def test_committed_flow_teacher():
    assert FLOW_TEACHER.stat().st_size < 4 * 2**20
    assert toy_time_kind(FLOW_TEACHER) == "flow" and "final_loss" in toy_model_metadata(FLOW_TEACHER)
    model = load_toy_model(FLOW_TEACHER)
    with torch.no_grad():
        assert torch.isfinite(
            model(torch.randn(2, 1, 16, 16), torch.tensor([1000.0, 20.0]), torch.tensor([3, 10]))
        ).all()


def test_unknown_teacher_time_kind_is_refused(tmp_path):
    path = tmp_path / "odd.safetensors"
    save_toy_model(path, ToyUNet(num_classes=2, base=8), {"time_kind": "edm"})
    with pytest.raises(ValueError, match="time_kind 'edm'"):
        toy_time_kind(path)


@pytest.mark.parametrize("lora", [False, True])
def test_flow_run_writes_velocity_files_with_flow_metadata(flow_toy, tmp_path, lora):
    extra = ("--lora-rank", "4", "--export-delta") if lora else ()
    summary = train(run_args(flow_toy, tmp_path / "run", "--steps", "3", *extra))
    assert summary["step"] == 3
    names = ["perflow_delta.safetensors"] + (["perflow_lora.safetensors"] if lora else [])
    for name in names:
        with safe_open(str(tmp_path / "run" / name), "pt") as f:
            md = DeltaMetadata.from_metadata(f.metadata())
        assert (md.parameterization, md.time_kind, md.flow_shift, md.base_architecture) == (
            "velocity", "flow", 3.0, "toy"
        ), name  # fmt: skip


@pytest.mark.parametrize(
    ("teacher", "flags", "message"),
    [
        ("flow", ("--parameterization", "diff_eps"), "velocity"),
        ("diffusion", ("--flow-shift", "3"), "--flow-shift goes with a flow-matching teacher"),
        ("flow", ("--flow-shift", "0"), "--flow-shift"),
    ],
)
def test_mismatched_flags_are_refused(flow_toy, tiny_toy, tmp_path, teacher, flags, message):
    toy = flow_toy if teacher == "flow" else tiny_toy
    argv = [a for a in run_args(toy, tmp_path / "run", "--steps", "2") if a not in ("--flow-shift", "3")]
    with pytest.raises(UserError, match=message):
        train([*argv, *flags])


def trained(out: Path) -> dict[str, torch.Tensor]:
    ck = load_checkpoint(out / "checkpoint.pt")["engine"]
    tensors = {f"student.{k}": v for k, v in ck["student"].items()}
    for i, s in ck["optimizer"]["state"].items():
        tensors |= {f"adam.{i}.{k}": v for k, v in s.items() if isinstance(v, torch.Tensor)}
    return tensors


def test_flow_resume_after_stop_is_exact(flow_toy, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train(run_args(flow_toy, a, "--steps", "4"))
    train(run_args(flow_toy, b, "--steps", "4", "--stop-at-step", "2"))
    with pytest.raises(UserError, match="flow_shift"):
        train(run_args(flow_toy, b, "--steps", "4", "--resume", "--flow-shift", "2"))
    train(run_args(flow_toy, b, "--steps", "4", "--resume"))
    ta, tb = trained(a), trained(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_flow_two_processes_match_one_process(flow_toy, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ("--steps", "2", "--log-every", "1")
    train(run_args(flow_toy, one, *common))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += [
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*cmd, "-m", "training.train", *run_args(flow_toy, two, *common)], cwd=REPO, env=env, capture_output=True,
        text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ta, tb = trained(one), trained(two)
    for k in ta:
        if k.startswith("adam.") and k.endswith("exp_avg"):  # the same gradients, up to summation order
            torch.testing.assert_close(ta[k], tb[k], atol=1e-6, rtol=1e-4, msg=k)


def test_sample_teacher_solves_a_flow_teacher_with_euler(flow_toy, tmp_path, monkeypatch):
    from training import sample_teacher

    calls = []
    monkeypatch.setattr(sample_teacher, "flow_ode_solve", lambda *a, **k: calls.append(a) or torch.zeros(20, 1, 8, 8))
    monkeypatch.setattr(sample_teacher, "ode_solve", lambda *a, **k: pytest.fail("DDIM on a flow teacher"))
    out = tmp_path / "grid.png"
    argv = ["--model", str(flow_toy / "teacher.safetensors"), "--out", str(out), "--steps", "3", "--per-class", "2"]
    sample_teacher.main([*argv, "--size", "8", "--threads", "1"])
    assert out.is_file() and len(calls) == 2 and torch.equal(calls[0][2], shifted_sigmas(3, 1.0))
