"""Train a PeRFlow delta offline (PeRFlow arXiv 2405.07510; loop after the published perflow_accelerate_sd.py).

    python -m training.train --backend toy --out runs/toy --steps 1000
    torchrun --nproc_per_node 2 -m training.train --backend toy --out runs/toy2   # data-parallel (gloo / nccl)
    python -m training.train --backend toy --out runs/toy --resume                 # continue from checkpoint.pt

Writes to --out: perflow_delta.safetensors (student - teacher), checkpoint.pt, train.log, samples/*.png,
comparison.png (teacher DDIM many-step / teacher DDIM-4 / PeRFlow 4-step from the same noises), metrics.json.
"""

import argparse
import copy
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from perflow_core.delta_format import save_delta, state_dict_hash
from perflow_core.parameterization import PARAMETERIZATIONS
from perflow_core.schedule import sd_alphas_cumprod
from training import reflow
from training.checkpointing import atomic_torch_save, load_checkpoint, rng_states, set_rng_states

TOY_TEACHER = Path(__file__).resolve().parent / "teacher" / "toy_teacher.safetensors"
log = logging.getLogger("perflow.train")


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
    a("--steps", type=int, default=1000, help="optimiser steps in total")
    a("--batch-size", type=int, default=64, help="global batch (split over processes)")
    a("--lr", type=float, default=2e-4)
    a("--weight-decay", type=float, default=1e-2)
    a("--warmup", type=int, default=50, help="linear warmup steps")
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
    )
    cfg.validate()
    return cfg


class ToyBackend:
    """Toy backend: frozen ToyUNet teacher from a file, student = its copy, data = a uint8 image npz."""

    architecture = "toy"
    checkpoint_blocks = ("ResBlock",)

    def __init__(self, args: argparse.Namespace, device: torch.device):
        from training.toy_data import DEFAULT_DATA, load_toy_data
        from training.toy_model import load_toy_model

        if not args.teacher.is_file():
            raise FileNotFoundError(f"toy teacher not found: {args.teacher}")
        self.device = device
        self.memory_format = torch.channels_last if device.type == "cpu" else torch.contiguous_format  # faster on CPU
        self.teacher = load_toy_model(args.teacher, device).requires_grad_(False).to(memory_format=self.memory_format)
        self.student = copy.deepcopy(self.teacher).train().requires_grad_(True)
        self.images, self.labels = load_toy_data(args.data or DEFAULT_DATA)
        nc, ch = self.teacher.num_classes, self.teacher.config["in_channels"]
        if self.images.shape[1] != ch or self.images.shape[-1] % 4 or self.images.shape[-2] % 4:
            raise ValueError(
                f"data images {tuple(self.images.shape[1:])} do not fit the teacher ({ch} channels, H, W % 4)"
            )
        if int(self.labels.max()) >= nc:
            raise ValueError(f"data labels reach {int(self.labels.max())}; the teacher has {nc} classes")
        self.delta_prefix = ""

    def __len__(self) -> int:
        return len(self.images)

    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    def batch(self, idx: torch.Tensor):
        """(clean latents, labels, null labels) for dataset indices."""
        labels = self.labels[idx].to(self.device)
        images = self.images[idx].to(self.device).contiguous(memory_format=self.memory_format)
        return images, labels, torch.full_like(labels, self.teacher.num_classes)

    def teacher_eps(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.teacher(x, t * 1000, cond)  # the toy teacher is fed t*1000 (noise level ac[t*1000 - 1])

    @staticmethod
    def student_fn(module):
        return lambda x, t, cond: module(x, t * 1000, cond)

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        return self.teacher.state_dict()

    @torch.no_grad()
    def sample_grid(self, weights: dict[str, torch.Tensor], args, path: Path) -> dict:
        """Rows: teacher DDIM-many, teacher DDIM-4, student PeRFlow-4, same noises and labels; MSEs to row 1."""
        from training.toy_sampling import ddim_sample, perflow_solve, save_grid

        student = copy.deepcopy(self.teacher)
        student.load_state_dict(weights)
        nc = self.teacher.num_classes
        labels = torch.arange(nc, device=self.device).repeat(2)
        g = torch.Generator().manual_seed(1234)
        noise = torch.randn((len(labels), *self.latent_shape()), generator=g).to(self.device)
        t_cfg = args.cfg_scale if args.cfg_mode == "fixed" else args.sample_cfg
        s_cfg = 1.0 if args.cfg_mode == "fixed" else args.sample_cfg
        ref = ddim_sample(self.teacher, noise, labels, args.sample_teacher_steps, cfg=t_cfg)
        ddim4 = ddim_sample(self.teacher, noise, labels, 4, cfg=t_cfg)
        null = torch.full_like(labels, nc)
        perflow4 = perflow_solve(
            lambda x, t, lab: student(x, t * 1000.0, lab), noise, labels, null, s_cfg, args.parameterization,
            args.windows,
        )  # fmt: skip
        save_grid(path, torch.cat([ref, ddim4, perflow4]), nrow=len(labels), scale=4)
        return {
            "mse_perflow4_vs_teacher": ((perflow4.clamp(-1, 1) - ref.clamp(-1, 1)) ** 2).mean().item(),
            "mse_ddim4_vs_teacher": ((ddim4.clamp(-1, 1) - ref.clamp(-1, 1)) ** 2).mean().item(),
        }


def make_backend(args: argparse.Namespace, device: torch.device):
    """The teacher/student/data provider for --backend."""
    if args.backend == "toy":
        return ToyBackend(args, device)
    from training.comfy_backend import ComfyBackend

    return ComfyBackend(args, device)


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
        n = reflow.enable_gradient_checkpointing(student, backend.checkpoint_blocks)
        log.info("gradient checkpointing on %d blocks", n)
    named = {k: p for k, p in student.named_parameters() if p.requires_grad}
    opt, sched = reflow.make_optimizer(list(named.values()), args.lr, args.weight_decay, args.warmup)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    ema = reflow.EMA(named, args.ema_decay) if args.ema_decay > 0 else None
    ckpt_path, step = args.out / "checkpoint.pt", 0
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    if args.resume:
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        ck = load_checkpoint(ckpt_path)
        if ck["reflow"] != rcfg.as_dict():
            raise ValueError(f"--resume: reflow settings differ from the checkpoint's: {ck['reflow']}")
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
    ac = getattr(backend, "alphas_cumprod", None)
    ac = sd_alphas_cumprod() if ac is None else ac

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
        if rank != 0 or args.no_samples or not hasattr(backend, "sample_grid"):
            return {}
        (args.out / "samples").mkdir(exist_ok=True)
        path = args.out / "samples" / name
        metrics = backend.sample_grid(final_weights(), args, path)
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
            loss = reflow.train_step(
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
        weights, base = final_weights(), backend.base_state_dict()
        dtype = getattr(backend, "delta_dtype", torch.float32)
        delta = {backend.delta_prefix + k: (weights[k].float() - base[k].float()).to("cpu", dtype) for k in base}
        base_hash = state_dict_hash({backend.delta_prefix + k: v for k, v in base.items()})
        summary |= write_samples("final.png")
        if (args.out / "samples" / "final.png").is_file():
            (args.out / "comparison.png").write_bytes((args.out / "samples" / "final.png").read_bytes())
        cfg_mode = "cfg_sync" if rcfg.cfg_mode == "sync" else f"cfg_fixed {rcfg.cfg_scale:g}"
        save_delta(
            args.out / "perflow_delta.safetensors",
            delta,
            parameterization=rcfg.parameterization,
            num_windows=rcfg.num_windows,
            base_architecture=backend.architecture,
            base_hash=base_hash,
            extra={
                "cfg_mode": cfg_mode,
                "steps_trained": str(step),
                "training_summary": json.dumps({**rcfg.as_dict(), **summary, "batch_size": args.batch_size}),
            },
        )
        (args.out / "metrics.json").write_text(json.dumps(summary, indent=1))
        log.info("wrote %s; %s", args.out / "perflow_delta.safetensors", json.dumps(summary))
    if world > 1:
        dist.barrier()
    return summary


def main() -> None:
    """CLI entry: clear one-line errors for bad options, missing files and divergence."""
    try:
        train()
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if not isinstance(e, FloatingPointError) else 3)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
