"""A run is never lost or silently changed: a used --out is refused (files byte-identical), --resume refuses every
change that breaks exactness naming the setting and both values, one trainer per --out, a NaN teacher is refused."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from training.checkpointing import claim_run_folder, load_checkpoint
from training.cli import UserError
from training.toy_model import ToyUNet, save_toy_model
from training.train import train


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A tiny teacher, a second one of the same shape, data, and a run stopped at step 2 of 4."""
    d = tmp_path_factory.mktemp("toy")
    for seed, name in ((0, "teacher"), (1, "other_teacher")):
        torch.manual_seed(seed)
        save_toy_model(d / f"{name}.safetensors", ToyUNet(num_classes=10, in_channels=1, base=8))
    rng = np.random.default_rng(0)
    for name in ("data", "other_data"):
        images, labels = rng.integers(0, 256, (32, 8, 8), dtype=np.uint8), rng.integers(0, 10, 32)
        np.savez(d / f"{name}.npz", images=images, labels=labels)
    train(args(d, d / "stopped", "--stop-at-step", "2"))
    train(args(d, d / "finished"))
    return d


def args(toy: Path, out: Path, *extra: str) -> list[str]:
    """A tiny run; later options override earlier ones (argparse keeps the last)."""
    base = ["--teacher", str(toy / "teacher.safetensors"), "--data", str(toy / "data.npz"), "--out", str(out)]
    base += ["--batch-size", "8", "--steps", "4", "--threads", "1", "--solver-steps", "1", "--warmup", "2"]
    return [*base, "--no-samples", "--cpu", *extra]


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*")
            if p.is_file()}  # fmt: skip


def test_a_used_out_is_refused_and_left_byte_identical(toy):
    for run in ("finished", "stopped"):
        before = digest(toy / run)
        with pytest.raises(UserError, match="holds a run .*--resume.*--overwrite"):
            train(args(toy, toy / run, "--seed", "5"))
        assert digest(toy / run) == before


def test_overwrite_replaces_the_run(toy, tmp_path):
    out = tmp_path / "run"
    train(args(toy, out, "--steps", "2"))
    train(args(toy, out, "--steps", "3", "--overwrite"))
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 3
    with pytest.raises(UserError, match="exclude each other"):
        train(args(toy, out, "--resume", "--overwrite"))


@pytest.mark.parametrize(
    ("flag", "value", "setting", "old", "new"),
    [
        ("--seed", "1", "seed", "0", "1"),
        ("--batch-size", "16", "batch_size", "8", "16"),
        ("--grad-accum", "2", "grad_accum", "1", "2"),
        ("--lr", "0.001", "lr", "0.0002", "0.001"),
        ("--ema-decay", "0", "ema_decay", "0.99", "0"),
        ("--weight-decay", "0", "weight_decay", "0.01", "0"),
        ("--warmup", "5", "warmup", "2", "5"),
        ("--max-grad-norm", "2", "max_grad_norm", "1.0", "2"),
        ("--solver-steps", "2", "solver_steps", "1", "2"),
        ("--cond-dropout", "0", "cond_dropout", "0.1", "0"),
        ("--lora-rank", "4", "lora_rank", "0", "4"),
        ("--mixed-precision", "bf16", "mixed_precision", "'no'", "'bf16'"),
        ("--teacher", "other_teacher.safetensors", "teacher_hash", "'", "'"),
        ("--data", "other_data.npz", "data_hash", "'", "'"),
    ],
)
def test_resume_refuses_a_changed_setting_naming_it(toy, flag, value, setting, old, new):
    if flag in ("--teacher", "--data"):
        value = str(toy / value)
    before = digest(toy / "stopped")
    with pytest.raises(UserError, match=f"--resume: {setting} is .*{new}.* but the run .* used .*{old}"):
        train(args(toy, toy / "stopped", "--resume", flag, value))
    assert digest(toy / "stopped") == before


def test_resume_refuses_steps_below_the_checkpoint(toy):
    with pytest.raises(UserError, match="--steps 1 is below the checkpoint's step 2"):
        train(args(toy, toy / "stopped", "--resume", "--steps", "1"))


def test_a_second_trainer_on_the_same_out_is_refused(toy, tmp_path):
    out = tmp_path / "run"
    lock = claim_run_folder(out, resume=False, overwrite=False)  # a first trainer holds the folder
    try:
        with pytest.raises(UserError, match="another trainer is writing to"):
            train(args(toy, out))
        assert not (out / "checkpoint.pt").exists()
    finally:
        lock.close()
    train(args(toy, out, "--steps", "1"))  # free again once the first one ends


def test_a_teacher_with_nan_is_refused_before_training(toy, tmp_path):
    torch.manual_seed(0)
    net = ToyUNet(num_classes=10, in_channels=1, base=8)
    with torch.no_grad():
        net.mid1.conv1.weight[0, 0, 0, 0] = float("nan")
    save_toy_model(tmp_path / "nan.safetensors", net)
    out = tmp_path / "run"
    with pytest.raises(UserError, match="tensor mid1.conv1.weight holds NaN"):
        train(args(toy, out, "--teacher", str(tmp_path / "nan.safetensors")))
    assert not (out / "checkpoint.pt").exists()
