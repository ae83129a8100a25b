"""The models a run scores, each made by the trainer's own code: PeRFlow students through training.engine's
ReflowEngine (its optimiser, EMA and schedule) and training.export's delta writer, the plug-and-play fine-tune
through training.train_teacher's loop on a shifted copy of the data."""

import copy
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from benchmarks.toy.budget import Budget, Recipe
from training import train_teacher
from training.backends.toy import ToyBackend
from training.engine import ReflowEngine
from training.export import delta_of, write_delta
from training.toy_model import load_toy_model


def frozen_copy(student: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """A frozen copy of the student holding the given (EMA) weights."""
    m = copy.deepcopy(student).eval().requires_grad_(False)
    m.load_state_dict(weights, strict=False)
    return m


def train_student(
    teacher: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    b: Budget,
    recipe: Recipe,
    iters: int,
    on_checkpoint: Callable[[int, dict, nn.Module], None] | None = None,
    seed: int = 0,
) -> tuple[nn.Module, dict]:
    """Reflow (PeRFlow Alg. 1) of a teacher copy for `iters` optimiser steps of the trainer's engine; returns the EMA
    student and {iters, cpu_seconds, wall_seconds, final_loss}. Training time is this process's CPU time
    (time.process_time, independent of other jobs on the machine) and wall time of the steps alone; at each of
    b.checkpoint_iters() on_checkpoint(iteration, times so far, EMA student) is called outside the clock."""
    device = next(teacher.parameters()).device
    backend = ToyBackend(teacher, images, labels, device, time_kind=recipe.time_kind)
    engine = ReflowEngine(
        Accelerator(cpu=device.type == "cpu"), backend, recipe.reflow_config(b.solver_steps), batch_size=b.batch,
        lr=b.lr, warmup=b.warmup, lr_schedule=recipe.lr_schedule, total_steps=iters, ema_decay=b.ema, seed=seed,
    )  # fmt: skip
    cpu, wall, losses = 0.0, 0.0, []
    marks = set(b.checkpoint_iters()) if on_checkpoint is not None else set()
    for it in range(iters):
        c0, w0 = time.process_time(), time.perf_counter()
        losses.append(engine.step(it))
        cpu, wall = cpu + time.process_time() - c0, wall + time.perf_counter() - w0
        if it + 1 in marks:
            on_checkpoint(
                it + 1, {"cpu_seconds": cpu, "wall_seconds": wall}, frozen_copy(backend.student, engine.weights())
            )
    info = {"iters": iters, "cpu_seconds": cpu, "wall_seconds": wall, "final_loss": float(np.mean(losses[-20:]))}
    return frozen_copy(backend.student, engine.weights()), info


def save_student(path: Path, teacher: nn.Module, student: nn.Module, b: Budget, recipe: Recipe, iters: int) -> dict:
    """Write the student's delta with training.export (what users load); returns the delta."""
    base = teacher.state_dict()
    delta = delta_of(student.state_dict(), base)
    write_delta(path, delta, base, rcfg=recipe.reflow_config(b.solver_steps), architecture="toy", steps_trained=iters)
    return delta


def apply_delta(base: nn.Module, delta: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of base with W + dW (plug-and-play: any fine-tune of the same base)."""
    m = copy.deepcopy(base)
    with torch.no_grad():
        for k, v in m.state_dict().items():
            v.add_(delta[k].to(v))
    return m.eval()


def thicken(images: torch.Tensor) -> torch.Tensor:
    """The shifted domain for plug-and-play: the foreground dilated by a 3x3 window, per channel. The foreground is
    the side of the median pixel the mean lies on (the minority: bright strokes on a dark background are max-pooled,
    dark strokes on a light one min-pooled), so any data set gets thicker shapes, not a thinner background."""
    flat = images.transpose(0, 1).flatten(1)
    bright = flat.median(dim=1).values <= flat.mean(dim=1)
    sign = torch.where(bright, 1.0, -1.0).to(images).view(1, -1, 1, 1)
    return sign * F.max_pool2d(sign * images, 3, stride=1, padding=1)


def finetune(teacher_path: Path, images: torch.Tensor, labels: torch.Tensor, b: Budget, threads: int, device: str):
    """A fine-tune of the teacher file on (images, labels): training.train_teacher's own loop (--init), lr 3e-4,
    b.finetune_iters steps of 2 x b.batch images, no EMA; returns the network."""
    with tempfile.TemporaryDirectory(prefix="perflow-finetune-") as tmp:
        data, out = Path(tmp) / "data.npz", Path(tmp) / "finetune.safetensors"
        pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
        np.savez(data, images=pixels, labels=labels.numpy())
        argv = ["--data", str(data), "--out", str(out), "--init", str(teacher_path), "--steps", str(b.finetune_iters)]
        argv += ["--batch", str(2 * b.batch), "--lr", "3e-4", "--warmup", "0", "--ema", "0", "--seed", "1"]
        train_teacher.main([*argv, "--threads", str(threads)])
        return load_toy_model(out, device).requires_grad_(False)
