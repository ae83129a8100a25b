"""Toy-backend training runs: loss goes down, the delta file, exact resume (stop, SIGTERM, kill -9; 1 and 2 processes,
gradient accumulation), 2 processes = 1 process, accumulation = one larger batch, divergence, tensorboard."""

import os
import random
import re
import shlex
import signal
import socket
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
from training import engine
from training.checkpointing import load_checkpoint
from training.train import train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def toy(tiny_toy):
    return tiny_toy


def args(toy, out, *extra):
    return [
        *("--teacher", str(toy / "teacher.safetensors"), "--data", str(toy / "data.npz"), "--out", str(out)),
        *("--batch-size", "8", "--threads", "1", "--solver-steps", "2", "--no-samples", "--warmup", "2", "--cpu"),
        *extra,
    ]


def logged_losses(out: Path) -> list[float]:
    return [float(m) for m in re.findall(r"step \d+ loss ([0-9.e+-]+)", (out / "train.log").read_text())]


def trained(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the run's checkpoint state: student, EMA, Adam moments."""
    ck = load_checkpoint(out / "checkpoint.pt")["engine"]
    tensors = {f"student.{k}": v for k, v in ck["student"].items()}
    tensors |= {f"ema.{k}": v for k, v in ck["ema"]["shadow"].items()} if ck["ema"] else {}
    for i, s in ck["optimizer"]["state"].items():
        tensors |= {f"adam.{i}.{k}": v for k, v in s.items() if isinstance(v, torch.Tensor)}
    return tensors


def assert_identical(a: Path, b: Path) -> None:
    ta, tb = trained(a), trained(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert load_checkpoint(a / "checkpoint.pt")["step"] == load_checkpoint(b / "checkpoint.pt")["step"]


def assert_same_training(a: Path, b: Path) -> None:
    """Equal up to float summation order: the same gradients every step (Adam's first moments) and the same weights
    wherever the gradient is real, to 5% of one Adam step (Adam normalises each gradient entry, so an entry near zero
    at one step moves by up to lr whatever its rounding). Parameters whose gradient is pure rounding noise (biases
    right before a GroupNorm, which cancels them) get full-size steps with random signs: their weights are skipped."""
    ca, cb = (load_checkpoint(x / "checkpoint.pt")["engine"] for x in (a, b))
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    noise_floor = 1e-6 * max(float(s["exp_avg"].abs().max()) for s in sa.values())
    for i, k in enumerate(ca["student"]):
        m1, m2 = sa[i]["exp_avg"], sb[i]["exp_avg"]
        assert (m1 - m2).abs().max() <= 1e-4 * m1.abs().max() + noise_floor, k
        real = sa[i]["exp_avg_sq"].sqrt() > 1e-7
        torch.testing.assert_close(ca["student"][k][real], cb["student"][k][real], atol=1e-5, rtol=1e-5, msg=k)


def launch(*argv: str, processes: int = 2) -> subprocess.CompletedProcess:
    """`accelerate launch` of training.train on CPU processes (gloo) on a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes)]
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
    return subprocess.run([*cmd, "-m", "training.train", *argv], cwd=REPO, env=env, capture_output=True, text=True)


def test_short_run_lowers_loss(toy, tmp_path):
    out = tmp_path / "run"
    # published timepoint sampling: the default's share on window starts makes a random teacher's per-step velocity
    # loss swing more than this 60-step comparison resolves
    recipe = ("--parameterization", "velocity", "--sampler-point-share", "0")
    train(args(toy, out, "--steps", "60", "--lr", "2e-3", "--log-every", "1", *recipe))
    losses = logged_losses(out)
    assert len(losses) == 60
    assert np.mean(losses[-15:]) < 0.7 * np.mean(losses[:15])


def test_delta_file_is_student_minus_teacher(toy, tmp_path):
    out = tmp_path / "run"
    summary = train(args(toy, out, "--steps", "3", "--ema-decay", "0", "--cfg-mode", "fixed", "--cfg-scale", "3"))
    assert summary["step"] == 3 and not summary["interrupted"]
    teacher = load_file(toy / "teacher.safetensors")
    delta = load_file(out / "perflow_delta.safetensors")
    student = load_checkpoint(out / "checkpoint.pt")["engine"]["student"]
    assert set(delta) == set(teacher)
    for k in teacher:
        torch.testing.assert_close(teacher[k] + delta[k], student[k], atol=1e-6, rtol=1e-6)
    with safe_open(out / "perflow_delta.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["base_architecture"] == "toy" and meta["parameterization"] == "diff_eps"
    assert meta["num_windows"] == "4" and meta["steps_trained"] == "3"
    assert meta["cfg_mode"] == "fixed" and float(meta["cfg_scale"]) == 3.0  # perflow_core writes floats as repr
    assert meta["base_hash"] == state_dict_hash(teacher)


RECIPES = [(), ("--sampler-point-share", "0.75", "--lr-schedule", "cosine")]  # published sampling; issue 13's


@pytest.mark.parametrize("recipe", RECIPES)
def test_resume_after_stop_is_exact(toy, tmp_path, recipe):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ("--steps", "6", "--cond-dropout", "0.3", *recipe)
    train(args(toy, a, *common))
    summary = train(args(toy, b, *common, "--stop-at-step", "3"))
    assert summary["interrupted"] and load_checkpoint(b / "checkpoint.pt")["step"] == 3
    assert not (b / "perflow_delta.safetensors").exists()
    train(args(toy, b, *common, "--resume"))
    assert_identical(a, b)
    da, db = load_file(a / "perflow_delta.safetensors"), load_file(b / "perflow_delta.safetensors")
    assert all(torch.equal(da[k], db[k]) for k in da)


def test_kill_9_at_a_random_step_then_resume_is_exact(toy, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ("--steps", "8", "--checkpoint-every", "1", "--log-every", "1")
    train(args(toy, a, *common))
    kill_after = random.Random().randint(1, 6)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "training.train", *args(toy, b, *common)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600  # a loaded CI machine starts accelerate slowly; the kill point stays random
    while time.time() < deadline and not (
        (b / "checkpoint.pt").is_file() and (b / "train.log").is_file() and len(logged_losses(b)) >= kill_after
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    (b / ".checkpoint.pt.left-by-kill.tmp").write_bytes(b"partial")  # what a kill during a save leaves
    stopped = load_checkpoint(b / "checkpoint.pt")["step"]
    assert 1 <= stopped <= 8, f"killed after step {kill_after}"
    train(args(toy, b, *common, "--resume"))
    assert_identical(a, b)
    assert not list(b.glob(".*.tmp"))


def test_sigterm_saves_checkpoint_and_exits_cleanly(toy, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "training.train", *args(toy, out, "--steps", "100000", "--log-every", "1")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "train.log").is_file() and logged_losses(out)):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert "checkpoint saved" in err
    assert load_checkpoint(out / "checkpoint.pt")["step"] >= 1


def test_grad_accumulation_equals_one_step_with_the_larger_batch(toy, tmp_path):
    big, acc = tmp_path / "big", tmp_path / "acc"
    common = ("--steps", "3", "--cond-dropout", "0.3", "--log-every", "1")
    train(args(toy, big, *common, "--batch-size", "16"))
    train(args(toy, acc, *common, "--batch-size", "8", "--grad-accum", "2"))
    assert logged_losses(big) == pytest.approx(logged_losses(acc), rel=1e-5)
    assert_same_training(big, acc)


class BucketedToy:
    """The toy backend with two latent sizes, as aspect buckets give: a micro-batch whose first item has an odd index
    comes at 12x12 instead of 8x8. Records the sizes of each call."""

    sizes: list[tuple[int, ...]] = []

    def __init__(self, backend):
        self.backend = backend

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def __len__(self) -> int:
        return len(self.backend)

    def batch(self, idx):
        latents, cond, null = self.backend.batch(idx)
        if int(idx[0]) % 2:
            latents = torch.nn.functional.interpolate(latents, size=(12, 12), mode="bilinear")
        self.sizes.append(tuple(latents.shape[1:]))
        return latents, cond, null


def test_buckets_with_grad_accumulation_train_and_resume_exactly(toy, tmp_path, monkeypatch):
    from training import train as train_module

    make = train_module.make_backend
    monkeypatch.setattr(train_module, "make_backend", lambda *a: BucketedToy(make(*a)))
    a, b = tmp_path / "a", tmp_path / "b"
    common = ("--steps", "4", "--grad-accum", "2", "--cond-dropout", "0.3", "--log-every", "1")
    BucketedToy.sizes.clear()
    train(args(toy, a, *common))
    steps = [BucketedToy.sizes[i : i + 2] for i in range(0, 8, 2)]
    assert any(s[0] != s[1] for s in steps), steps  # a step whose two micro-batches are of different sizes
    assert all(np.isfinite(logged_losses(a)))
    train(args(toy, b, *common, "--stop-at-step", "2"))
    train(args(toy, b, *common, "--resume"))
    assert_identical(a, b)


def test_resume_refuses_a_moved_cosine_end(toy, tmp_path):
    out = tmp_path / "run"
    train(args(toy, out, "--steps", "4", "--stop-at-step", "1", "--lr-schedule", "cosine"))
    with pytest.raises(ValueError, match="steps is 8 but the run in the checkpoint used 4"):
        train(args(toy, out, "--steps", "8", "--lr-schedule", "cosine", "--resume"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_two_processes_match_one_process(toy, tmp_path, recipe):
    one, two = tmp_path / "one", tmp_path / "two"
    common = ("--steps", "3", "--cond-dropout", "0.3", "--log-every", "1", *recipe)
    train(args(toy, one, *common))
    proc = launch(*args(toy, two, *common))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es) (MULTI_CPU), global batch 8" in (two / "train.log").read_text()
    assert logged_losses(one) == pytest.approx(logged_losses(two), rel=1e-5)
    assert_same_training(one, two)


def test_accelerate_cpu_launch_of_two_processes_is_refused_with_the_command_that_runs_them(toy, tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process (no MPI): refused, --out untouched, and the
    command the error gives runs 2 processes that match the single-process run."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = ("--steps", "2", "--log-every", "1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*cmd, "-m", "training.train", *args(toy, two, *common)], cwd=REPO, env=env, capture_output=True, text=True
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0 and len(errors) == 1 and "starts ONE process" in errors[0], proc.stderr[-3000:]
    assert not two.exists()
    suggested = shlex.split(errors[0].split(" run: ", 1)[1])
    assert suggested[:7] == ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "-m", "training.train"]
    proc = launch(*suggested[7:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in (two / "train.log").read_text()
    train(args(toy, one, *common))
    assert_same_training(one, two)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what accelerate does on a machine without a GPU")
def test_gpu_launch_on_a_machine_without_gpu_is_refused_naming_cpu(toy, tmp_path):
    """`accelerate launch --multi_gpu` without --cpu: accelerate makes each process a separate one-process run."""
    out = tmp_path / "run"
    proc = launch(*[a for a in args(toy, out, "--steps", "2") if a != "--cpu"])
    assert proc.returncode != 0 and "found no GPU" in proc.stderr and "add --cpu" in proc.stderr, proc.stderr[-3000:]
    assert not out.exists()


def test_fsdp_example_config_parses_and_wraps_the_comfy_unet_blocks():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    from training.backends.comfy import ComfyBackend

    cfg = load_config_from_file(str(REPO / "docs" / "fsdp_sdxl_8gpu.yaml"))
    assert cfg.distributed_type == DistributedType.FSDP and cfg.num_processes == 8 and cfg.mixed_precision == "bf16"
    assert cfg.fsdp_config["fsdp_sharding_strategy"] == "FULL_SHARD"
    assert tuple(cfg.fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(",")) == ComfyBackend.checkpoint_blocks


def test_fsdp_launch_is_refused_before_out_is_touched(toy, tmp_path):
    """The example FSDP config through accelerate's launcher (2 processes here): refused with the reason, as the
    trainer's checkpoints and exports cannot read sharded parameters yet."""
    out = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "docs" / "fsdp_sdxl_8gpu.yaml"),
    ]
    cmd += ["--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*cmd, "-m", "training.train", *args(toy, out, "--steps", "2")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "error: FSDP is not supported yet" in proc.stderr, proc.stderr[-3000:]
    assert not out.exists()


def test_two_process_resume_with_grad_accumulation_is_exact(toy, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ("--steps", "3", "--grad-accum", "2", "--cond-dropout", "0.3")
    for out, extra in ((a, ()), (b, ("--stop-at-step", "1")), (b, ("--resume",))):
        proc = launch(*args(toy, out, *common, *extra))
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert_identical(a, b)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(toy, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real, calls = engine.reflow_loss, []

    def poisoned(*a, **k):
        calls.append(1)
        return real(*a, **k) * (float("nan") if len(calls) == 5 else 1.0)

    monkeypatch.setattr(engine, "reflow_loss", poisoned)
    with pytest.raises(FloatingPointError, match="non-finite loss .* at step 5"):
        train(args(toy, out, "--steps", "10", "--checkpoint-every", "2"))
    ck = load_checkpoint(out / "checkpoint.pt")
    assert ck["step"] == 4
    assert all(torch.isfinite(v).all() for v in ck["engine"]["student"].values())


def test_tensorboard_logs_the_loss_offline(toy, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is in requirements-train.txt, not in this Python")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    train(args(toy, out, "--steps", "3", "--report-to", "tensorboard"))
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent)).Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3]


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--lr", "-1", r"--lr must be a float in \(0, 1\]"),
        ("--windows", "0", "num_windows must be an integer from 1 to 16"),
        ("--windows", "17", "num_windows must be an integer from 1 to 16"),
        ("--cond-dropout", "1", r"cond_dropout must be a float in \[0, 1\)"),
        ("--ema-decay", "1.5", r"--ema-decay must be a float in \[0, 1\)"),
        ("--batch-size", "1000", "exceeds the dataset size"),
        ("--grad-accum", "0", "--grad-accum must be an integer in 1..4096"),
        ("--lora-alpha", "4", "go with --lora-rank"),
    ],
)
def test_bad_config_is_rejected_with_range(toy, tmp_path, flag, value, message):
    with pytest.raises(ValueError, match=message):
        train(args(toy, tmp_path / "run", "--steps", "2", flag, value))
