"""Train a PeRFlow delta offline (PeRFlow arXiv 2405.07510; loop after the published perflow_accelerate_sd.py).

    python -m training.train --backend toy --out runs/toy --steps 1000
    torchrun --nproc_per_node 2 -m training.train --backend toy --out runs/toy2   # data-parallel (gloo / nccl)
    python -m training.train --backend toy --out runs/toy --resume                 # continue from checkpoint.pt

Writes to --out: perflow_delta.safetensors (student - teacher), checkpoint.pt, train.log, samples/*.png,
comparison.png (teacher DDIM many-step / teacher DDIM-4 / PeRFlow 4-step from the same noises), metrics.json.
"""

import argparse
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from perflow_core.parameterization import PARAMETERIZATIONS
from training import reflow
from training.backends import make_backend
from training.checkpointing import atomic_torch_save, load_checkpoint, rng_states, set_rng_states
from training.cli import run
from training.ema import EMA
from training.export import delta_of, write_delta
from training.preview import sample_grid
from training.solvers import EpsFn

TOY_TEACHER = Path(__file__).resolve().parent / "teacher" / "toy_teacher.safetensors"
log = logging.getLogger("perflow.train")
LR_SCHEDULES = ("constant", "cosine")


def step_counts(text: str) -> tuple[int, ...]:
    """'4,5,6' -> (4, 5, 6), for --sampler-point-steps."""
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated step counts like 4,5,6,7,8; got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """All options; defaults suit the toy demo (a few minutes on CPU)."""
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--backend", choices=("toy", "comfy"), default="toy")
    a("--out", type=Path, default=Path("runs/toy"), help="output folder")
    a("--teacher", type=Path, default=TOY_TEACHER, help="toy: teacher .safetensors")
    a("--data", type=Path, default=None, help="toy: .npz (uint8 images, int labels); comfy: image folder or .jsonl")
    a("--comfyui", type=Path, default=None, help="comfy: ComfyUI folder (else $COMFYUI_PATH)")
    a("--checkpoint", type=Path, default=None, help="comfy: base model checkpoint (.safetensors)")
    a("--resolution", type=int, default=512, help="comfy: training resolution (pixels)")
    a("--cache-latents", action="store_true", help="comfy: encode every image and caption once, up front")
    a("--parameterization", choices=PARAMETERIZATIONS, default="diff_eps")
    a("--windows", type=int, default=4, help="number of time windows K")
    a("--solver-steps", type=int, default=4, help="teacher DDIM steps per window")
    a("--timestep-grid", type=int, default=1000, help="timepoints on a 1/N grid (published: 1000)")
    a("--cfg-mode", choices=reflow.CFG_MODES, default="sync", help="sync: teacher at cfg 1; fixed: at --cfg-scale")
    a("--cfg-scale", type=float, default=4.5, help="teacher guidance for --cfg-mode fixed")
    a("--cond-dropout", type=float, default=0.1, help="probability of training on the null conditioning")
    a("--reweighting", choices=reflow.REWEIGHTINGS, default="none")
    a(
        "--sampler-point-share",
        type=float,
        default=reflow.ReflowConfig.sampler_point_share,
        help="share of timepoints drawn from the sampler's own evaluation points (window starts first), the rest "
        "on the --timestep-grid; 0 is the published (toy, 600 steps: PeRFlow-4 0.69x DDIM-4 at 0.75, 1.66x at 0)",
    )
    a(
        "--sampler-point-steps",
        type=step_counts,
        default=reflow.ReflowConfig.sampler_point_steps,
        help="step counts whose sampler points --sampler-point-share draws from, e.g. 4,5,6,7,8",
    )
    a("--steps", type=int, default=1000, help="optimiser steps in total")
    a("--batch-size", type=int, default=64, help="global batch (split over processes)")
    a("--lr", type=float, default=2e-4)
    a("--weight-decay", type=float, default=1e-2)
    a("--warmup", type=int, default=50, help="linear warmup steps")
    a(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        default="constant",
        help="after warmup: constant (published) or cosine decay to 0 at --steps",
    )
    a("--max-grad-norm", type=float, default=1.0)
    a("--ema-decay", type=float, default=0.99, help="0 disables EMA; the delta uses EMA weights when enabled")
    a("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast dtype")
    a("--gradient-checkpointing", action="store_true")
    a("--device", default="cpu", help="cpu, cuda or cuda:N")
    a("--threads", type=int, default=0, help="CPU threads per process (0: cores / processes)")
    a("--seed", type=int, default=0)
    a("--log-every", type=int, default=10)
    a("--sample-every", type=int, default=0, help="write a sample grid every N steps (0: only at the end)")
    a("--checkpoint-every", type=int, default=200)
    a("--stop-at-step", type=int, default=0, help="save a checkpoint and stop after this step (time-sliced jobs)")
    a("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    a("--sample-cfg", type=float, default=2.0, help="guidance for the sample grids (cfg-mode fixed: student at 1)")
    a("--sample-teacher-steps", type=int, default=50)
    a("--no-samples", action="store_true", help="skip sample grids and metrics")
    return p


def validate_args(args: argparse.Namespace) -> reflow.ReflowConfig:
    """Check every numeric option against its range before any work; returns the reflow config."""
    checks = [
        ("steps", 1 <= args.steps <= 10**8, "an integer in 1..1e8"),
        ("batch-size", 1 <= args.batch_size <= 65536, "an integer in 1..65536"),
        ("lr", 0 < args.lr <= 1, "a float in (0, 1]"),
        ("weight-decay", 0 <= args.weight_decay <= 1, "a float in [0, 1]"),
        ("warmup", 0 <= args.warmup <= 10**8, "an integer >= 0"),
        ("max-grad-norm", 0 < args.max_grad_norm <= 1e6, "a float in (0, 1e6]"),
        ("ema-decay", 0 <= args.ema_decay < 1, "a float in [0, 1)"),
        ("threads", 0 <= args.threads <= 1024, "an integer in 0..1024"),
        ("log-every", args.log_every >= 1, "an integer >= 1"),
        ("sample-every", args.sample_every >= 0, "an integer >= 0"),
        ("checkpoint-every", args.checkpoint_every >= 1, "an integer >= 1"),
        ("stop-at-step", 0 <= args.stop_at_step <= args.steps, f"an integer in 0..steps ({args.steps})"),
        ("sample-cfg", 1 <= args.sample_cfg <= 30, "a float in [1, 30]"),
        ("sample-teacher-steps", 1 <= args.sample_teacher_steps <= 1000, "an integer in 1..1000"),
        ("resolution", 64 <= args.resolution <= 4096 and args.resolution % 64 == 0, "a multiple of 64 in 64..4096"),
    ]
    for name, ok, allowed in checks:
        if not ok:
            raise ValueError(f"--{name} must be {allowed}; got {getattr(args, name.replace('-', '_'))!r}")
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        raise ValueError(f"--device must be cpu, cuda or cuda:N; got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but torch.cuda.is_available() is False")
    if args.precision == "fp16" and not args.device.startswith("cuda"):
        raise ValueError("--precision fp16 needs --device cuda (use bf16 on CPU)")
    cfg = reflow.ReflowConfig(
        parameterization=args.parameterization,
        num_windows=args.windows,
        solver_steps=args.solver_steps,
        timestep_grid=args.timestep_grid,
        cfg_mode=args.cfg_mode,
        cfg_scale=args.cfg_scale,
        cond_dropout=args.cond_dropout,
        reweighting=args.reweighting,
        sampler_point_share=args.sampler_point_share,
        sampler_point_steps=args.sampler_point_steps,
    )
    cfg.validate()
    return cfg


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


def make_optimizer(
    params, lr: float, weight_decay: float, warmup_steps: int, schedule: str = "constant", total_steps: int = 0
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (betas 0.9/0.999, eps 1e-8 as published) with a warmup, then constant or cosine schedule."""
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup_steps, schedule, total_steps))


def autocast_dtype(precision: str) -> torch.dtype | None:
    """None for fp32, else the autocast dtype for `bf16` / `fp16`."""
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def train_step(
    student: EpsFn,
    batch: reflow.ReflowBatch,
    params: list[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    *,
    reweighting: str = "none",
    max_grad_norm: float = 1.0,
    precision: str = "fp32",
    loss_reduce: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
) -> float:
    """Forward under autocast, MSE, backward, clip, AdamW step. Returns the (all-reduced) loss; on a non-finite
    loss nothing is updated and NaN/inf is returned so that the caller can stop with the last good checkpoint."""
    dtype = autocast_dtype(precision)
    device_type = batch.z_t.device.type
    with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
        pred = student(batch.z_t, batch.t, batch.cond)
    loss = reflow.reflow_loss(pred, batch.target, batch.t, reweighting)
    reduced = loss_reduce(loss.detach().clone())
    if not math.isfinite(reduced.item()):
        optimizer.zero_grad(set_to_none=True)
        return reduced.item()
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return reduced.item()


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


def init_distributed(args: argparse.Namespace) -> tuple[int, int, torch.device]:
    """(rank, world size, device); under torchrun joins the process group (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(args.device)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return dist.get_rank(), world, device
    return 0, 1, device


def batch_indices(step: int, n: int, global_batch: int, seed: int) -> torch.Tensor:
    """Dataset indices of a step's global batch: a fresh permutation per epoch, last partial batch dropped."""
    per_epoch = n // global_batch
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[k * global_batch : (k + 1) * global_batch]


def setup_logging(out: Path, rank: int) -> None:
    """rank 0: <out>/train.log plus stderr; other ranks: warnings on stderr only."""
    for h in list(log.handlers):
        h.close()
        log.removeHandler(h)
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    log.propagate = False
    if rank == 0:
        fh = logging.FileHandler(out / "train.log")
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(fh)
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(logging.Formatter(f"[rank {rank}] %(message)s" if rank else "%(message)s"))
    log.addHandler(sh)


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the end of the current step and exits."""

    def __init__(self):
        self.signal = 0
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def train(argv: list[str] | None = None) -> dict:
    """Run (or resume) a training job; returns a summary dict (also written to metrics.json on rank 0)."""
    args = build_parser().parse_args(argv)
    rcfg = validate_args(args)
    rank, world, device = init_distributed(args)
    if args.batch_size % world:
        raise ValueError(f"--batch-size must be a multiple of the process count ({world}); got {args.batch_size}")
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    args.out.mkdir(parents=True, exist_ok=True)
    setup_logging(args.out, rank)
    torch.manual_seed(args.seed)
    backend = make_backend(args, device)
    if len(backend) < args.batch_size:
        raise ValueError(f"--batch-size ({args.batch_size}) exceeds the dataset size ({len(backend)})")
    student = backend.student
    if args.gradient_checkpointing:
        n = enable_gradient_checkpointing(student, backend.checkpoint_blocks)
        log.info("gradient checkpointing on %d blocks", n)
    named = {k: p for k, p in student.named_parameters() if p.requires_grad}
    opt, sched = make_optimizer(
        list(named.values()), args.lr, args.weight_decay, args.warmup, args.lr_schedule, args.steps
    )
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    ema = EMA(named, args.ema_decay) if args.ema_decay > 0 else None
    ckpt_path, step = args.out / "checkpoint.pt", 0
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    if args.resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        ck = load_checkpoint(ckpt_path)
        if ck["reflow"] != rcfg.as_dict():
            raise ValueError(f"--resume: reflow settings differ from the checkpoint's: {ck['reflow']}")
        was = (ck["config"].get("lr_schedule", "constant"), ck["config"]["steps"])
        if was != (args.lr_schedule, args.steps) and "cosine" in (was[0], args.lr_schedule):
            raise ValueError(
                f"--resume: the cosine learning-rate schedule ends at --steps; resume with the checkpoint's "
                f"--lr-schedule {was[0]} --steps {was[1]}"
            )
        student.load_state_dict(ck["student"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        if ema is not None:
            ema.load_state_dict(ck["ema"])
        set_rng_states(ck["rng"])
        step = ck["step"]
        log.info("resumed from %s at step %d", ckpt_path, step)
    model = torch.nn.parallel.DistributedDataParallel(student) if world > 1 else student
    student_fn = backend.student_fn(model)
    ac = backend.alphas_cumprod

    def all_mean(x: torch.Tensor) -> torch.Tensor:
        if world > 1:
            dist.all_reduce(x)
            x /= world
        return x

    def save_checkpoint() -> None:
        if rank == 0:
            state = {
                "step": step,
                "student": student.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rng_states(),
                "reflow": rcfg.as_dict(),
                "config": config,
            }
            atomic_torch_save(state, ckpt_path)
        if world > 1:
            dist.barrier()

    def final_weights() -> dict[str, torch.Tensor]:
        sd = {k: v.detach().clone() for k, v in student.state_dict().items()}
        if ema is not None:
            sd.update({k: v.to(sd[k].dtype) for k, v in ema.shadow.items()})
        return sd

    def write_samples(name: str) -> dict:
        if rank != 0 or args.no_samples:
            return {}
        (args.out / "samples").mkdir(exist_ok=True)
        path = args.out / "samples" / name
        metrics = sample_grid(
            backend, final_weights(), rcfg, path, sample_cfg=args.sample_cfg, teacher_steps=args.sample_teacher_steps
        )
        log.info("samples %s %s", path, " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return metrics

    log.info("config %s", json.dumps(config, sort_keys=True))
    log.info("%d process(es), global batch %d, %d items, device %s", world, args.batch_size, len(backend), device)
    stop = StopRequest()
    end = args.stop_at_step or args.steps
    bar = tqdm(total=args.steps, initial=step, desc="perflow", disable=rank != 0, dynamic_ncols=True)
    shard = slice(rank * args.batch_size // world, (rank + 1) * args.batch_size // world)
    t0, loss, last_loss = time.time(), float("nan"), float("nan")
    steps_at_start = step
    try:
        while step < end:
            g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
            idx = batch_indices(step, len(backend), args.batch_size, args.seed)[shard]
            t, noise, keep = reflow.draw_reflow_noise(rcfg, args.batch_size, backend.latent_shape(), g)
            latents, cond, null = backend.batch(idx)
            batch = reflow.make_reflow_batch(
                rcfg, backend.teacher_eps, latents, cond, null, ac, t[shard], noise[shard], keep[shard]
            )
            loss = train_step(
                student_fn,
                batch,
                list(named.values()),
                opt,
                sched,
                scaler,
                reweighting=rcfg.reweighting,
                max_grad_norm=args.max_grad_norm,
                precision=args.precision,
                loss_reduce=all_mean,
            )
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite loss ({loss}) at step {step + 1}; stopped without saving. The last good checkpoint "
                    f"({ckpt_path}) is kept: lower --lr, use --precision fp32 or check the data, then --resume."
                )
            if ema is not None:
                ema.update(named)
            step += 1
            last_loss = loss
            lr = sched.get_last_lr()[0]
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if step % args.log_every == 0 or step == end:
                now = time.time()
                its = (step - steps_at_start) / max(now - t0, 1e-9)
                log.info("step %d loss %.5f lr %.3e it/s %.2f", step, loss, lr, its)
            if args.sample_every and step % args.sample_every == 0 and step < args.steps:
                write_samples(f"step_{step:06d}.png")
            flag = torch.tensor([float(stop.signal)])
            if world > 1:
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item():
                save_checkpoint()
                log.info("signal %d: checkpoint saved at step %d; continue with --resume", int(flag.item()), step)
                return {"step": step, "interrupted": True, "loss": last_loss}
            if step % args.checkpoint_every == 0 or step == end:
                save_checkpoint()
    finally:
        stop.restore()
        bar.close()
    seconds = time.time() - t0
    summary = {
        "step": step,
        "interrupted": step < args.steps,
        "loss": last_loss,
        "seconds": round(seconds, 2),
        "seconds_per_it": round(seconds / max(step - steps_at_start, 1), 4),
    }
    if step < args.steps:
        log.info("stopped at step %d (--stop-at-step); continue with --resume", step)
        return summary
    if rank == 0:
        base = backend.base_state_dict()
        summary |= write_samples("final.png")
        if (args.out / "samples" / "final.png").is_file():
            (args.out / "comparison.png").write_bytes((args.out / "samples" / "final.png").read_bytes())
        write_delta(
            args.out / "perflow_delta.safetensors",
            delta_of(final_weights(), base),
            base,
            rcfg=rcfg,
            architecture=backend.architecture,
            steps_trained=step,
            prefix=backend.delta_prefix,
            dtype=backend.delta_dtype,
            summary={**rcfg.as_dict(), **summary, "batch_size": args.batch_size},
        )
        (args.out / "metrics.json").write_text(json.dumps(summary, indent=1))
        log.info("wrote %s; %s", args.out / "perflow_delta.safetensors", json.dumps(summary))
    if world > 1:
        dist.barrier()
    return summary


def main() -> None:
    """CLI entry: one `error:` line (exit 2) for bad options and files; divergence exits 3."""
    try:
        train()
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    run(main)
