"""Every training command line ends a user's mistake in one `error:` line, exit status 2, no traceback: bad and
foreign files, a .npy for an .npz, empty data, labels that overflow, an --out that is a file or cannot be created,
truncated and foreign checkpoints, out-of-range options."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from benchmarks.toy import cli as benchmark
from training import make_toy_data, sample_teacher, train, train_teacher
from training.cli import run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tiny_toy, tmp_path_factory):
    """Good and bad inputs, by name."""
    d = tmp_path_factory.mktemp("inputs")
    for name in ("teacher.safetensors", "data.npz"):
        (d / name).write_bytes((tiny_toy / name).read_bytes())
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (16, 8, 8), dtype=np.uint8), rng.integers(0, 10, 16)
    np.save(d / "images.npy", images)
    np.savez(d / "empty.npz", images=np.zeros((0, 8, 8), np.uint8), labels=np.zeros(0, np.int64))
    np.savez(d / "overflow.npz", images=images, labels=np.full(16, 2**64 - 1, np.uint64))
    np.savez(d / "big_labels.npz", images=images, labels=np.full(16, 2**40, np.int64))
    np.savez(d / "float_images.npz", images=images.astype(np.float32), labels=labels)
    np.savez(d / "no_labels.npz", images=images)
    (d / "garbage.bin").write_bytes(b"\x00\x01 not a model or an archive " * 10)
    save_file({"w": torch.zeros(2)}, str(d / "foreign.safetensors"), metadata={"format": "pt"})
    (d / "a_file").write_text("I am a file")
    (d / "exists.png").write_bytes(b"")
    train.train(toy_train(d, "run"))
    ck = (d / "run" / "checkpoint.pt").read_bytes()
    for name, blob in (("truncated", ck[: len(ck) // 2]), ("foreign", None)):
        folder = d / f"{name}_run"
        folder.mkdir()
        if blob is None:
            torch.save({"weights": torch.zeros(3)}, folder / "checkpoint.pt")
        else:
            (folder / "checkpoint.pt").write_bytes(blob)
    return d


def toy_train(d: Path, out: str = "new_run", **opts: str) -> list[str]:
    argv = {"--teacher": d / "teacher.safetensors", "--data": d / "data.npz", "--out": d / out, "--steps": "1"}
    argv |= {"--batch-size": "8", "--solver-steps": "1", "--threads": "1"}
    argv |= {k.replace("_", "-"): v for k, v in opts.items()}
    return [*(str(x) for kv in argv.items() for x in kv if x is not None), "--no-samples", "--cpu"]


# (command main, argv builder, what the error line names)
CASES = {
    "train: teacher missing": (train.main, lambda d: toy_train(d, __teacher=d / "nope.safetensors"), "not found"),
    "train: teacher garbage": (train.main, lambda d: toy_train(d, __teacher=d / "garbage.bin"), "garbage.bin"),
    "train: teacher foreign": (train.main, lambda d: toy_train(d, __teacher=d / "foreign.safetensors"), "config"),
    "train: data .npy": (train.main, lambda d: toy_train(d, __data=d / "images.npy"), ".npy"),
    "train: data garbage": (train.main, lambda d: toy_train(d, __data=d / "garbage.bin"), "garbage.bin"),
    "train: data empty": (train.main, lambda d: toy_train(d, __data=d / "empty.npz"), "dataset size"),
    "train: labels overflow": (train.main, lambda d: toy_train(d, __data=d / "overflow.npz"), "labels"),
    "train: labels too big": (train.main, lambda d: toy_train(d, __data=d / "big_labels.npz"), "labels"),
    "train: float images": (train.main, lambda d: toy_train(d, __data=d / "float_images.npz"), "uint8"),
    "train: no labels": (train.main, lambda d: toy_train(d, __data=d / "no_labels.npz"), "labels"),
    "train: out is a file": (train.main, lambda d: toy_train(d, out="a_file"), "a_file"),
    "train: out cannot exist": (train.main, lambda d: toy_train(d, __out="/dev/null/run"), "/dev/null"),
    "train: truncated checkpoint": (train.main, lambda d: [*toy_train(d, "truncated_run"), "--resume"], "truncated"),
    "train: foreign checkpoint": (train.main, lambda d: [*toy_train(d, "foreign_run"), "--resume"], "checkpoint"),
    "train: no checkpoint": (train.main, lambda d: [*toy_train(d, "empty_run"), "--resume"], "no checkpoint"),
    "train: used out": (train.main, lambda d: toy_train(d, "run"), "holds a run"),
    "train: bad steps": (train.main, lambda d: toy_train(d, __steps="-3"), "--steps"),
    "train: not a number": (train.main, lambda d: toy_train(d, __lr="fast"), "--lr"),
    "train: unknown option": (train.main, lambda d: [*toy_train(d), "--epochs", "3"], "--epochs"),
    "train_teacher: data .npy": (
        train_teacher.main,
        lambda d: ["--data", str(d / "images.npy"), "--out", str(d / "t1.safetensors")],
        ".npy",
    ),
    "train_teacher: data empty": (
        train_teacher.main,
        lambda d: ["--data", str(d / "empty.npz"), "--out", str(d / "t2.safetensors")],
        "no images",
    ),
    "train_teacher: out exists": (
        train_teacher.main,
        lambda d: ["--data", str(d / "data.npz"), "--out", str(d / "teacher.safetensors")],
        "exists",
    ),
    "train_teacher: init garbage": (
        train_teacher.main,
        lambda d: ["--data", str(d / "data.npz"), "--out", str(d / "t3.safetensors"), "--init", str(d / "garbage.bin")],
        "garbage.bin",
    ),
    "train_teacher: no out": (train_teacher.main, lambda d: ["--data", str(d / "data.npz")], "--out"),
    "sample_teacher: model garbage": (
        sample_teacher.main,
        lambda d: ["--model", str(d / "garbage.bin"), "--out", str(d / "s.png")],
        "garbage.bin",
    ),
    "sample_teacher: out exists": (
        sample_teacher.main,
        lambda d: ["--model", str(d / "teacher.safetensors"), "--out", str(d / "exists.png")],
        "exists",
    ),
    "sample_teacher: bad size": (sample_teacher.main, lambda d: ["--out", str(d / "s2.png"), "--size", "10"], "--size"),
    "make_toy_data: wheel garbage": (
        make_toy_data.main,
        lambda d: ["--wheel", str(d / "garbage.bin"), "--out", str(d / "m.npz")],
        "garbage.bin",
    ),
    "make_toy_data: out exists": (make_toy_data.main, lambda d: ["--out", str(d / "data.npz")], "exists"),
    "benchmark: teacher garbage": (
        benchmark.main,
        lambda d: ["--quick", "--out", str(d / "b1"), "--teacher", str(d / "garbage.bin")],
        "garbage.bin",
    ),
    "benchmark: data .npy": (
        benchmark.main,
        lambda d: ["--quick", "--out", str(d / "b2"), "--data", str(d / "images.npy")],
        ".npy",
    ),
    "benchmark: out is a file": (benchmark.main, lambda d: ["--quick", "--out", str(d / "a_file")], "a_file"),
}


@pytest.mark.parametrize("case", CASES)
def test_user_error_is_one_line_exit_2(files, case, capsys):
    main, argv, names = CASES[case]
    with pytest.raises(SystemExit) as stop:
        run(lambda: main(argv(files)))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert stop.value.code == 2, err[-2000:]
    assert len(lines) == 1 and names in lines[0], err[-2000:]
    assert "Traceback" not in err


def test_the_real_command_line_too(files):
    """The same through `python -m` (argument parsing, cli.run, exit status of the process)."""
    argv = toy_train(files, __data=files / "images.npy")
    proc = subprocess.run([sys.executable, "-m", "training.train", *argv], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error:") and ".npy" in proc.stderr
