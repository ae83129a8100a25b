"""One reflow optimisation step under Hugging Face accelerate (one CPU, N GPUs, several machines; training.train
refuses FSDP for now), with the state a checkpoint keeps. Used by `training.train` and the toy benchmark.

A step's global batch is batch_size x grad_accum items, drawn from one generator seeded by (seed, step): dataset
indices, timepoints, noise and the CFG-dropout mask. Micro-batch i is its i-th slice of batch_size items, split over
the processes, so any process count and any accumulation of the same global batch see the same items and draws.
Noise is drawn at the first micro-batch's latent size; a micro-batch of another size (aspect buckets: each
micro-batch is one bucket) gets fresh noise of its own size from the same generator, after the step's other draws,
so a bucketed run with accumulation is as deterministic, and as exactly resumable, as any other.
"""

import math
from collections.abc import Callable

import torch
from accelerate import Accelerator

from training.backends.base import Backend
from training.ema import EMA
from training.reflow import ReflowConfig, draw_reflow_noise, make_reflow_batch, reflow_loss

LR_SCHEDULES = ("constant", "cosine")


def lr_lambda(warmup_steps: int, schedule: str = "constant", total_steps: int = 0) -> Callable[[int], float]:
    """Linear warmup to the base learning rate over warmup_steps, then constant (published) or, for `cosine`, a
    half-cosine decay to 0 at total_steps (issue 13: better paired error at every step count on the toy)."""

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
        if schedule == "constant":
            return warm
        return warm * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))

    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr schedule must be one of {', '.join(LR_SCHEDULES)}; got {schedule!r}")
    return factor


def batch_indices(step: int, n: int, global_batch: int, seed: int) -> torch.Tensor:
    """Dataset indices of a step's global batch: a fresh permutation per epoch, last partial batch dropped."""
    epoch, k = divmod(step, n // global_batch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[k * global_batch : (k + 1) * global_batch]


def enable_gradient_checkpointing(model: torch.nn.Module, block_names: tuple[str, ...]) -> int:
    """Recompute the forward of every submodule whose class name is in block_names during backward;
    returns how many blocks were wrapped (0 where the model has none of them)."""
    from torch.utils.checkpoint import checkpoint

    n = 0
    for module in model.modules():
        if type(module).__name__ in block_names:
            forward = module.forward
            module.forward = lambda *a, _f=forward, **k: checkpoint(_f, *a, use_reentrant=False, **k)
            n += 1
    return n


class ReflowEngine:
    """AdamW (betas 0.9/0.999, eps 1e-8 as published) with warmup, EMA, gradient clipping and accumulation over the
    backend's trainable student parameters (the whole UNet, or its LoRA adapters)."""

    def __init__(
        self,
        accelerator: Accelerator,
        backend: Backend,
        rcfg: ReflowConfig,
        *,
        batch_size: int,
        grad_accum: int = 1,
        lr: float,
        weight_decay: float = 0.0,
        warmup: int = 0,
        lr_schedule: str = "constant",
        total_steps: int = 0,
        max_grad_norm: float = 1.0,
        ema_decay: float = 0.0,
        seed: int = 0,
    ):
        self.accelerator, self.backend, self.rcfg = accelerator, backend, rcfg
        self.batch_size, self.grad_accum, self.max_grad_norm, self.seed = batch_size, grad_accum, max_grad_norm, seed
        self.params = {k: p for k, p in backend.student.named_parameters() if p.requires_grad}
        optimizer = torch.optim.AdamW(
            self.params.values(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, lr_schedule, total_steps))
        self.ema = EMA(self.params, ema_decay) if ema_decay > 0 else None
        self.model, self.optimizer = accelerator.prepare(backend.student, optimizer)
        self.student_fn = backend.student_fn(self.model)

    def step(self, step: int) -> float:
        """Optimiser step number `step` (0-based) on its global batch; returns the mean loss over all processes.
        A non-finite loss or gradient raises FloatingPointError before any weight changes."""
        acc, world, rank = self.accelerator, self.accelerator.num_processes, self.accelerator.process_index
        size = self.batch_size * self.grad_accum
        idx = batch_indices(step, len(self.backend), size, self.seed)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        mine, losses = slice(rank * self.batch_size // world, (rank + 1) * self.batch_size // world), []
        for micro in range(self.grad_accum):
            lo = micro * self.batch_size
            part = slice(lo + mine.start, lo + mine.stop)
            latents, cond, null = self.backend.batch(idx[part])
            shape = tuple(latents.shape[1:])
            if micro == 0:
                t, noise, keep = draw_reflow_noise(self.rcfg, size, shape, g)
            if shape == noise.shape[1:]:
                micro_noise = noise[part]
            else:  # another bucket than micro-batch 0: fresh noise of its size, for the whole micro-batch as above
                micro_noise = torch.randn((self.batch_size, *shape), generator=g)[mine]
            b = make_reflow_batch(
                self.rcfg, self.backend.teacher_eps, latents, cond, null, self.backend.alphas_cumprod,
                t[part], micro_noise, keep[part],
            )  # fmt: skip
            with acc.accumulate(self.model):
                loss = reflow_loss(self.student_fn(b.z_t, b.t, b.cond), b.target, b.t, self.rcfg.reweighting)
                mean = acc.reduce(loss.detach().clone(), "mean").item()
                if not math.isfinite(mean):
                    self.optimizer.optimizer.zero_grad(set_to_none=True)
                    raise FloatingPointError(f"non-finite loss ({mean}) at step {step + 1}")
                acc.backward(loss)
                if acc.sync_gradients:
                    norm = acc.clip_grad_norm_(list(self.params.values()), self.max_grad_norm)
                    if acc.scaler is None and not math.isfinite(float(norm)):
                        self.optimizer.optimizer.zero_grad(set_to_none=True)
                        raise FloatingPointError(f"non-finite gradient norm ({float(norm)}) at step {step + 1}")
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            losses.append(mean)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.params)
        return sum(losses) / len(losses)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def weights(self) -> dict[str, torch.Tensor]:
        """The trained tensors to export: the EMA where enabled, else the live parameters (float32 copies)."""
        if self.ema is not None:
            return {k: v.clone() for k, v in self.ema.shadow.items()}
        return {k: p.detach().float().clone() for k, p in self.params.items()}

    def state_dict(self) -> dict:
        """What a checkpoint keeps for an exact resume."""
        scaler = self.accelerator.scaler
        return {
            "student": {k: p.detach().cpu().clone() for k, p in self.params.items()},
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["student"].keys() != self.params.keys():
            raise ValueError("the checkpoint holds other trainable parameters than this run")
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(state["student"][k])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
