"""Toy-backend training runs: loss goes down, exact resume, 2-process gloo = 1 process, signals, divergence."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from perflow_core.delta_format import state_dict_hash
from training import reflow
from training.checkpointing import load_checkpoint
from training.toy_model import ToyUNet, save_toy_model
from training.train import train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A tiny random teacher (base 8) and 64 random 8x8 'images' with labels."""
    d = tmp_path_factory.mktemp("toy")
    torch.manual_seed(0)
    save_toy_model(d / "teacher.safetensors", ToyUNet(num_classes=10, in_channels=1, base=8))
    rng = np.random.default_rng(0)
    np.savez(d / "data.npz", images=rng.integers(0, 256, (64, 8, 8), dtype=np.uint8), labels=rng.integers(0, 10, 64))
    return d


def args(toy, out, *extra):
    return [
        *("--teacher", str(toy / "teacher.safetensors"), "--data", str(toy / "data.npz"), "--out", str(out)),
        *("--batch-size", "8", "--threads", "1", "--solver-steps", "2", "--no-samples", "--warmup", "2"),
        *extra,
    ]


def logged_losses(out: Path) -> list[float]:
    return [float(m) for m in re.findall(r"step \d+ loss ([0-9.e+-]+)", (out / "train.log").read_text())]


def test_short_run_lowers_loss(toy, tmp_path):
    out = tmp_path / "run"
    train(args(toy, out, "--steps", "60", "--lr", "2e-3", "--log-every", "1", "--parameterization", "velocity"))
    losses = logged_losses(out)
    assert len(losses) == 60
    assert np.mean(losses[-15:]) < 0.7 * np.mean(losses[:15])


def test_delta_file_is_student_minus_teacher(toy, tmp_path):
    out = tmp_path / "run"
    summary = train(args(toy, out, "--steps", "3", "--ema-decay", "0"))
    assert summary["step"] == 3 and not summary["interrupted"]
    teacher = load_file(toy / "teacher.safetensors")
    delta = load_file(out / "perflow_delta.safetensors")
    student = load_checkpoint(out / "checkpoint.pt")["student"]
    assert set(delta) == set(teacher)
    for k in teacher:
        torch.testing.assert_close(teacher[k] + delta[k], student[k], atol=1e-6, rtol=1e-6)
    with safe_open(out / "perflow_delta.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["base_architecture"] == "toy" and meta["parameterization"] == "diff_eps"
    assert meta["num_windows"] == "4" and meta["steps_trained"] == "3" and meta["cfg_mode"] == "sync"
    assert meta["base_hash"] == state_dict_hash(teacher)


RECIPES = [(), ("--sampler-point-share", "0.75", "--lr-schedule", "cosine")]  # published; issue 13's


@pytest.mark.parametrize("recipe", RECIPES)
def test_resume_matches_uninterrupted_run(toy, tmp_path, recipe):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ("--steps", "6", "--cond-dropout", "0.3", *recipe)
    train(args(toy, a, *common))
    summary = train(args(toy, b, *common, "--stop-at-step", "3"))
    assert summary["interrupted"] and load_checkpoint(b / "checkpoint.pt")["step"] == 3
    assert not (b / "perflow_delta.safetensors").exists()
    train(args(toy, b, *common, "--resume"))
    ca, cb = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(b / "checkpoint.pt")
    assert ca["step"] == cb["step"] == 6
    for k in ca["student"]:
        torch.testing.assert_close(ca["student"][k], cb["student"][k], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ca["ema"]["shadow"][k], cb["ema"]["shadow"][k], atol=1e-6, rtol=1e-6)
    da, db = load_file(a / "perflow_delta.safetensors"), load_file(b / "perflow_delta.safetensors")
    for k in da:
        torch.testing.assert_close(da[k], db[k], atol=1e-6, rtol=1e-6)


def test_resume_refuses_a_moved_cosine_end(toy, tmp_path):
    out = tmp_path / "run"
    train(args(toy, out, "--steps", "4", "--stop-at-step", "1", "--lr-schedule", "cosine"))
    with pytest.raises(ValueError, match="resume with the checkpoint's --lr-schedule cosine --steps 4"):
        train(args(toy, out, "--steps", "8", "--lr-schedule", "cosine", "--resume"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_two_process_gloo_matches_one_process(toy, tmp_path, recipe):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ("--steps", "3", "--cond-dropout", "0.3", *recipe)
    train(args(toy, one, *common))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*cmd, "-m", "training.train", *args(toy, two, *common)], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    c1, c2 = load_checkpoint(one / "checkpoint.pt"), load_checkpoint(two / "checkpoint.pt")
    assert "2 process(es), global batch 8" in (two / "train.log").read_text()
    assert logged_losses(one) == logged_losses(two)
    # Same gradients every step (Adam moments). Parameters whose gradient is pure rounding noise (biases right
    # before a GroupNorm, which cancels them) get Adam's full-size steps in both runs with random signs: skip those.
    s1, s2 = c1["optimizer"]["state"], c2["optimizer"]["state"]
    noise_floor = 1e-6 * max(float(s["exp_avg"].abs().max()) for s in s1.values())  # rounding, across torch builds
    for i, k in enumerate(c1["student"]):
        m1, m2 = s1[i]["exp_avg"], s2[i]["exp_avg"]
        assert (m1 - m2).abs().max() <= 1e-4 * m1.abs().max() + noise_floor, k
        real = s1[i]["exp_avg_sq"].sqrt() > 1e-7
        torch.testing.assert_close(c1["student"][k][real], c2["student"][k][real], atol=1e-6, rtol=1e-5, msg=k)


def test_sigterm_saves_checkpoint_and_exits_cleanly(toy, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "training.train", *args(toy, out, "--steps", "100000", "--log-every", "1")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not ((out / "train.log").is_file() and logged_losses(out)):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert "checkpoint saved" in err
    assert load_checkpoint(out / "checkpoint.pt")["step"] >= 1


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(toy, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real, calls = reflow.reflow_loss, []

    def poisoned(*a, **k):
        calls.append(1)
        return real(*a, **k) * (float("nan") if len(calls) == 5 else 1.0)

    monkeypatch.setattr(reflow, "reflow_loss", poisoned)
    with pytest.raises(FloatingPointError, match="non-finite loss .* at step 5"):
        train(args(toy, out, "--steps", "10", "--checkpoint-every", "2"))
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 4


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--lr", "-1", r"--lr must be a float in \(0, 1\]"),
        ("--windows", "0", "num_windows must be an integer in 1..100"),
        ("--cond-dropout", "1", r"cond_dropout must be a float in \[0, 1\)"),
        ("--ema-decay", "1.5", r"--ema-decay must be a float in \[0, 1\)"),
        ("--batch-size", "1000", "exceeds the dataset size"),
    ],
)
def test_bad_config_is_rejected_with_range(toy, tmp_path, flag, value, message):
    with pytest.raises(ValueError, match=message):
        train(args(toy, tmp_path / "run", "--steps", "2", flag, value))
