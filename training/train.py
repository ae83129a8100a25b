"""Train a PeRFlow delta or LoRA offline (PeRFlow arXiv 2405.07510; loop after the published perflow_accelerate_sd.py).

    python -m training.train --backend toy --out runs/toy --steps 1000                    # one CPU or GPU
    python -m training.train --backend toy --out runs/toy --resume                        # continue from checkpoint.pt
    accelerate launch --multi_gpu --num_processes 2 -m training.train --cpu --backend toy --out runs/toy2  # 2 CPUs
    accelerate launch --multi_gpu --num_processes 8 -m training.train --backend comfy ...  # see the README

Writes to --out: perflow_delta.safetensors (student - teacher) or, with --lora-rank, perflow_lora.safetensors (a
kohya LoRA; --export-delta also writes the merged delta), checkpoint.pt, train.log, samples/*.png, comparison.png
(teacher DDIM many-step / teacher DDIM-4 / PeRFlow 4-step from the same noises), metrics.json.
"""

import argparse
import dataclasses
import json
import logging
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import ProjectConfiguration, broadcast_object_list
from tqdm.auto import tqdm

from perflow_core.delta_format import state_dict_hash
from perflow_core.flow_windows import check_flow_shift
from perflow_core.parameterization import PARAMETERIZATIONS
from training import reflow
from training.backends import make_backend
from training.checkpointing import (
    CHECKPOINT,
    atomic_torch_save,
    check_finite,
    check_resume,
    claim_run_folder,
    load_checkpoint,
    rng_states,
    set_rng_states,
)
from training.cli import ArgumentParser, UserError, describe, run
from training.dataset import add_data_arguments
from training.engine import LR_SCHEDULES, ReflowEngine, enable_gradient_checkpointing
from training.export import delta_of, training_metadata, write_delta, write_lora
from training.preview import sample_grid

TOY_TEACHER = Path(__file__).resolve().parent / "teacher" / "toy_teacher.safetensors"
log = logging.getLogger("perflow.train")


def step_counts(text: str) -> tuple[int, ...]:
    """'4,5,6' -> (4, 5, 6), for --sampler-point-steps."""
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated step counts like 4,5,6,7,8; got {text!r}") from None


def build_parser() -> ArgumentParser:
    """All options; defaults suit the toy demo (a few minutes on CPU)."""
    p = ArgumentParser(prog="python -m training.train", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--backend", choices=("toy", "comfy"), default="toy")
    a("--out", type=Path, required=True, help="output folder (refused if it holds a run, unless --resume/--overwrite)")
    a("--resume", action="store_true", help="continue the run in --out from its checkpoint.pt (same settings)")
    a("--overwrite", action="store_true", help="replace the run in --out")
    a("--teacher", type=Path, default=TOY_TEACHER, help="toy: teacher .safetensors")
    a("--data", type=Path, default=None, help="toy: .npz; comfy: image folder, .jsonl or shards 's/{00000..00099}.tar'")
    a("--comfyui", type=Path, default=None, help="comfy: ComfyUI folder (else $COMFYUI_PATH)")
    a("--checkpoint", type=Path, default=None, help="comfy: base model checkpoint (.safetensors)")
    a("--resolution", type=int, default=512, help="comfy: training resolution (pixels)")
    a("--cache-latents", type=Path, default=None, metavar="DIR", help="comfy: latent cache (training.cache_latents)")
    add_data_arguments(p)  # comfy: --buckets, --caption-key, --data-workers, --shuffle-buffer, --max-pixels, ...
    a("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (0: train the whole UNet)")
    a("--lora-alpha", type=float, default=None, help="LoRA alpha (scale alpha/rank; default: the rank)")
    a("--export-delta", action="store_true", help="with --lora-rank: also write the merged delta")
    a(
        "--parameterization",
        choices=PARAMETERIZATIONS,
        default=None,
        help="default: diff_eps; velocity (the only one) for a flow-matching teacher",
    )
    a("--flow-shift", type=float, default=None, help="flow-matching teachers: time shift of the windows (default 1)")
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
    a("--batch-size", type=int, default=64, help="global batch of one forward pass (split over processes)")
    a("--grad-accum", type=int, default=1, help="forward passes per optimiser step (batch-size x N items)")
    a("--lr", type=float, default=2e-4)
    a("--weight-decay", type=float, default=1e-2)
    a("--warmup", type=int, default=50, help="linear warmup steps")
    a("--lr-schedule", choices=LR_SCHEDULES, default="constant", help="after warmup: constant, or cosine to 0")
    a("--max-grad-norm", type=float, default=1.0)
    a("--ema-decay", type=float, default=0.99, help="0 disables EMA; the outputs use EMA weights when enabled")
    a("--mixed-precision", choices=("no", "bf16", "fp16"), default="no", help="autocast dtype (fp16: GPUs only)")
    a("--gradient-checkpointing", action="store_true")
    a("--cpu", action="store_true", help="train on the CPU even where a GPU is present")
    a("--report-to", choices=("none", "tensorboard", "wandb"), default="none", help="experiment tracker (<out>/logs)")
    a("--threads", type=int, default=0, help="CPU threads per process (0: cores / processes)")
    a("--seed", type=int, default=0)
    a("--log-every", type=int, default=10)
    a("--sample-every", type=int, default=0, help="write a sample grid every N steps (0: only at the end)")
    a("--checkpoint-every", type=int, default=200)
    a("--stop-at-step", type=int, default=0, help="save a checkpoint and stop after this step (time-sliced jobs)")
    a("--sample-cfg", type=float, default=2.0, help="guidance for the sample grids (cfg-mode fixed: student at 1)")
    a("--sample-teacher-steps", type=int, default=50)
    a("--no-samples", action="store_true", help="skip sample grids and metrics")
    return p


def validate_args(args) -> reflow.ReflowConfig:
    """Check every numeric option against its range before any work; returns the reflow config."""
    checks = [
        ("steps", 1 <= args.steps <= 10**8, "an integer in 1..1e8"),
        ("batch-size", 1 <= args.batch_size <= 65536, "an integer in 1..65536"),
        ("grad-accum", 1 <= args.grad_accum <= 4096, "an integer in 1..4096"),
        ("lr", 0 < args.lr <= 1, "a float in (0, 1]"),
        ("weight-decay", 0 <= args.weight_decay <= 1, "a float in [0, 1]"),
        ("warmup", 0 <= args.warmup <= 10**8, "an integer >= 0"),
        ("max-grad-norm", 0 < args.max_grad_norm <= 1e6, "a float in (0, 1e6]"),
        ("ema-decay", 0 <= args.ema_decay < 1, "a float in [0, 1)"),
        ("lora-rank", 0 <= args.lora_rank <= 4096, "an integer in 0..4096"),
        ("lora-alpha", args.lora_alpha is None or 0 < args.lora_alpha <= 1e6, "a float in (0, 1e6]"),
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
            raise UserError(f"--{name} must be {allowed}; got {getattr(args, name.replace('-', '_'))!r}")
    if args.flow_shift is not None:
        try:
            check_flow_shift(args.flow_shift)
        except ValueError as e:
            raise UserError(f"--flow-shift: {e}") from None
    if (args.lora_alpha is not None or args.export_delta) and not args.lora_rank:
        raise UserError("--lora-alpha and --export-delta go with --lora-rank R (LoRA training)")
    if args.report_to != "none":
        import importlib.util

        if importlib.util.find_spec(args.report_to) is None:
            raise UserError(
                f"--report-to {args.report_to}: the package is not installed (pip install {args.report_to})"
            )
    cfg = reflow.ReflowConfig(
        parameterization=args.parameterization or "diff_eps",
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


def reflow_for_teacher(rcfg: reflow.ReflowConfig, args, time_kind: str) -> reflow.ReflowConfig:
    """The reflow config for the teacher's time kind: a flow-matching teacher trains the velocity parameterization
    on flow windows with --flow-shift (default 1); --flow-shift with a diffusion teacher is refused."""
    if time_kind != "flow":
        if args.flow_shift is not None:
            raise UserError("--flow-shift goes with a flow-matching teacher (SD3, Flux, a --objective flow toy)")
        return rcfg
    if args.parameterization not in (None, "velocity"):
        raise UserError(
            f"--parameterization {args.parameterization}: a flow-matching teacher trains the velocity "
            "parameterization; leave --parameterization out or pass velocity"
        )
    shift = 1.0 if args.flow_shift is None else args.flow_shift
    flow = dataclasses.replace(rcfg, parameterization="velocity", time_kind="flow", flow_shift=shift)
    flow.validate()
    return flow


def exact_settings(args, rcfg: reflow.ReflowConfig, backend, processes: int) -> dict:
    """Everything a resumed run must share with the original to continue it exactly, by name."""
    names = ("backend", "batch_size", "grad_accum", "seed", "lr", "weight_decay", "warmup", "max_grad_norm")
    names += ("lr_schedule", "steps") if args.lr_schedule == "cosine" else ()  # cosine decays to 0 at --steps
    names += ("ema_decay", "lora_rank", "lora_alpha", "mixed_precision")
    return {**{n: getattr(args, n) for n in names}, **rcfg.as_dict(), **backend.fingerprint(), "processes": processes}


def setup_logging(out: Path, main: bool) -> None:
    """Main process: <out>/train.log plus stderr; other processes: warnings on stderr only."""
    for h in list(log.handlers):
        h.close()
        log.removeHandler(h)
    log.setLevel(logging.INFO if main else logging.WARNING)
    log.propagate = False
    if main:
        fh = logging.FileHandler(out / "train.log")
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(fh)
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(logging.Formatter("%(message)s" if main else "[process %(process)d] %(message)s"))
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


def on_main(accelerator: Accelerator, fn):
    """fn() on the main process only (None elsewhere); a user error there is raised on every process, so that none
    waits forever for the others."""
    result, error = None, [None]
    if accelerator.is_main_process:
        try:
            result = fn()
        except (ValueError, OSError) as e:
            error[0] = describe(e)
    if accelerator.num_processes > 1:
        broadcast_object_list(error)
    if error[0] is not None:
        raise UserError(error[0])
    return result


def launcher_processes() -> int | None:
    """--num_processes of the `accelerate launch` command line that started this process, where it can be read."""
    try:
        import psutil  # an accelerate dependency

        argv = psutil.Process().parent().cmdline()
    except Exception:  # noqa: BLE001 - no parent, no permission, another platform: the message says N
        return None
    for i, a in enumerate(argv):
        value = argv[i + 1] if a == "--num_processes" and i + 1 < len(argv) else a.partition("--num_processes=")[2]
        if value:
            return int(value) if value.isdigit() else None
    return None


def refuse_single_process_cpu_launch(argv: list[str]) -> None:
    """`accelerate launch --cpu --num_processes N` starts ONE process: accelerate runs several CPU processes only
    through MPI (--mpirun_hostfile) and otherwise runs the script once, with MASTER_ADDR set as the only trace of N > 1
    (accelerate/commands/launch.py: launch_command -> simple_launcher). Training then would run in one process where
    the user asked for N; refuse, with the command that starts N processes (gloo) and gives the same result."""
    env = os.environ
    if env.get("ACCELERATE_USE_CPU", "").lower() != "true" or not env.get("MASTER_ADDR"):
        return
    n = launcher_processes()
    command = ["accelerate", "launch", "--multi_gpu", "--num_processes", str(n or "N"), "-m", "training.train"]
    command += [*argv, *([] if "--cpu" in argv else ["--cpu"])]
    raise UserError(
        f"accelerate launch --cpu --num_processes {n or 'N'} starts ONE process (accelerate runs several CPU "
        f"processes only through MPI, --mpirun_hostfile). For {n or 'N'} processes on CPUs run: {shlex.join(command)}"
    )


def refuse_fsdp() -> None:
    """An accelerate FSDP config (ACCELERATE_USE_FSDP, set by `accelerate launch`) is refused before accelerate reads
    it: the trainer's checkpoints, EMA and exports read whole parameters, which FSDP shards. (On CPUs accelerate
    1.15 would not even use it: its FSDP plugin needs a GPU, and a CPU run gets DDP, accelerate/state.py.)"""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        raise UserError(
            "FSDP is not supported yet: the trainer's checkpoints, EMA and exports read whole parameters, which FSDP "
            "shards. Use DDP (accelerate launch --multi_gpu) with --lora-rank, or with --mixed-precision bf16 and "
            "--gradient-checkpointing for a full UNet (docs/training-multi-gpu.md)"
        )


def check_distributed_setup(accelerator: Accelerator, argv: list[str]) -> None:
    """Refuse, before --out is touched, a run that accelerate set up otherwise than its launch asked."""
    env = os.environ
    if accelerator.num_processes == 1:
        refuse_single_process_cpu_launch(argv)
        if int(env.get("WORLD_SIZE", "1")) > 1:  # `accelerate launch --multi_gpu` on a machine without a GPU
            raise UserError(
                f"the launcher started {env['WORLD_SIZE']} processes, but accelerate found no GPU and set each up as "
                "a separate single-process run; for processes on CPUs add --cpu to the trainer's options"
            )


def train(argv: list[str] | None = None) -> dict:
    """Run (or resume) a training job; returns a summary dict (also written to metrics.json)."""
    args = build_parser().parse_args(argv)
    rcfg = validate_args(args)
    if args.mixed_precision == "fp16" and (args.cpu or not torch.cuda.is_available()):
        raise UserError("--mixed-precision fp16 needs a GPU; use bf16 on the CPU")
    refuse_fsdp()
    AcceleratorState._reset_state()  # a new run in the same Python process (tests) may change these settings
    GradientState._reset_state()
    accelerator = Accelerator(
        cpu=args.cpu,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.grad_accum,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(args.out), logging_dir=str(args.out / "logs")),
    )
    check_distributed_setup(accelerator, sys.argv[1:] if argv is None else argv)
    if args.batch_size % accelerator.num_processes:
        raise UserError(
            f"--batch-size must be a multiple of the process count ({accelerator.num_processes}); got {args.batch_size}"
        )
    lock = on_main(accelerator, lambda: claim_run_folder(args.out, resume=args.resume, overwrite=args.overwrite))
    try:
        return run_training(args, rcfg, accelerator)
    finally:
        if lock is not None:
            lock.close()


def run_training(args, rcfg: reflow.ReflowConfig, accelerator: Accelerator) -> dict:
    """The run in a claimed --out: backend, engine, resume, the loop, checkpoints and the outputs."""
    world, main = accelerator.num_processes, accelerator.is_main_process
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // local))
    setup_logging(args.out, main)
    torch.manual_seed(args.seed)  # LoRA adapters start from this seed
    backend = make_backend(args, accelerator.device)
    rcfg = reflow_for_teacher(rcfg, args, getattr(backend, "time_kind", "diffusion"))
    check_finite(backend.base_state_dict(), f"teacher {args.checkpoint or args.teacher}")
    if len(backend) < args.batch_size * args.grad_accum:
        raise UserError(
            f"--batch-size x --grad-accum ({args.batch_size * args.grad_accum}) exceeds the dataset size "
            f"({len(backend)} items in {args.data or 'the bundled data'})"
        )
    if args.gradient_checkpointing:
        n = enable_gradient_checkpointing(backend.student, backend.checkpoint_blocks)
        log.info("gradient checkpointing on %d blocks", n)
    engine = ReflowEngine(
        accelerator, backend, rcfg, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        weight_decay=args.weight_decay, warmup=args.warmup, lr_schedule=args.lr_schedule, total_steps=args.steps,
        max_grad_norm=args.max_grad_norm,
        ema_decay=args.ema_decay, seed=args.seed,
    )  # fmt: skip
    settings = exact_settings(args, rcfg, backend, world)
    ckpt_path, step = args.out / CHECKPOINT, 0
    if args.resume:
        ck = load_checkpoint(ckpt_path)
        check_resume(ck["settings"], settings, args.steps, ck["step"])
        engine.load_state_dict(ck["engine"])
        set_rng_states(ck["rng"])
        step = ck["step"]
        backend.load_data_state(ck["data"])
        log.info("resumed from %s at step %d", ckpt_path, step)

    def save_checkpoint() -> None:
        state = engine.state_dict()
        check_finite(state["student"], "the student")  # a checkpoint kept as "last good" is finite
        data = backend.data_state()  # every process takes part
        backend.write_skip_report(args.out / "skipped.json")
        if main:
            ck = {"step": step, "engine": state, "rng": rng_states(), "settings": settings, "data": data}
            atomic_torch_save(ck, ckpt_path)
        accelerator.wait_for_everyone()

    def write_samples(name: str) -> dict:
        if not main or args.no_samples:
            return {}
        (args.out / "samples").mkdir(exist_ok=True)
        path = args.out / "samples" / name
        metrics = sample_grid(
            backend, engine.weights(), rcfg, path, sample_cfg=args.sample_cfg, teacher_steps=args.sample_teacher_steps
        )
        log.info("samples %s %s", path, " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return metrics

    config = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in vars(args).items()}  # trackers
    accelerator.init_trackers("perflow", config=config)
    log.info("config %s", json.dumps(config, sort_keys=True))
    log.info(
        "%d process(es) (%s), global batch %d x %d accumulation, %d items, device %s, %s",
        world, accelerator.distributed_type.value, args.batch_size, args.grad_accum, len(backend), accelerator.device,
        f"LoRA rank {args.lora_rank}" if args.lora_rank else "full UNet",
    )  # fmt: skip
    stop = StopRequest()
    end = args.stop_at_step or args.steps
    bar = tqdm(total=args.steps, initial=step, desc="perflow", disable=not main, dynamic_ncols=True)
    t0, steps_at_start, loss = time.time(), step, float("nan")
    try:
        while step < end:
            try:
                loss = engine.step(step)
            except FloatingPointError as e:
                raise FloatingPointError(
                    f"{e}; stopped without saving. The last good checkpoint ({ckpt_path}) is kept: lower --lr, use "
                    "--mixed-precision no or check the data, then --resume."
                ) from None
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{engine.lr():.2e}")
            accelerator.log({"loss": loss, "lr": engine.lr()}, step=step)
            if step % args.log_every == 0 or step == end:
                its = (step - steps_at_start) / max(time.time() - t0, 1e-9)
                log.info("step %d loss %.5f lr %.3e it/s %.2f", step, loss, engine.lr(), its)
            if args.sample_every and step % args.sample_every == 0 and step < args.steps:
                write_samples(f"step_{step:06d}.png")
            signalled = accelerator.gather(torch.tensor([float(stop.signal)], device=accelerator.device)).max()
            if signalled.item():
                save_checkpoint()
                log.info("signal %d: checkpoint saved at step %d; continue with --resume", int(signalled), step)
                return {"step": step, "interrupted": True, "loss": loss}
            if step % args.checkpoint_every == 0 or step == end:
                save_checkpoint()
    finally:
        stop.restore()
        bar.close()
    seconds = time.time() - t0
    summary = {
        "step": step,
        "interrupted": step < args.steps,
        "loss": loss,
        "seconds": round(seconds, 2),
        "seconds_per_it": round(seconds / max(step - steps_at_start, 1), 4),
    }
    if step < args.steps:
        log.info("stopped at step %d (--stop-at-step); continue with --resume", step)
    elif main:
        summary |= write_samples("final.png")
        if (args.out / "samples" / "final.png").is_file():
            (args.out / "comparison.png").write_bytes((args.out / "samples" / "final.png").read_bytes())
        write_outputs(args, rcfg, backend, engine.weights(), step, summary)
        (args.out / "metrics.json").write_text(json.dumps(summary, indent=1))
        log.info("wrote %s; %s", args.out, json.dumps(summary))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def write_outputs(args, rcfg: reflow.ReflowConfig, backend, weights: dict, step: int, summary: dict) -> None:
    """perflow_delta.safetensors (full training, or LoRA with --export-delta) and perflow_lora.safetensors (LoRA)."""
    base, prefix = backend.base_state_dict(), backend.delta_prefix
    summary = {**rcfg.as_dict(), **summary, "batch_size": args.batch_size, "grad_accum": args.grad_accum}
    if args.lora_rank:
        from training.lora import kohya_state_dict, merged_delta

        meta = {
            "parameterization": rcfg.parameterization,
            "num_windows": str(rcfg.num_windows),
            "base_architecture": backend.architecture,
            "base_hash": state_dict_hash({prefix + k: v.detach().cpu() for k, v in base.items()}),
        }
        tensors = kohya_state_dict(backend.student, weights, key_prefix=prefix, dtype=backend.delta_dtype)
        write_lora(args.out / "perflow_lora.safetensors", tensors, meta | training_metadata(rcfg, step, summary))
        if not args.export_delta:
            return
        delta = merged_delta(backend.student, weights)
    else:
        delta = delta_of({**base, **weights}, base)
    write_delta(
        args.out / "perflow_delta.safetensors", delta, base, rcfg=rcfg, architecture=backend.architecture,
        steps_trained=step, prefix=prefix, dtype=backend.delta_dtype, summary=summary,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """CLI entry: one `error:` line (exit 2) for bad options and files; divergence exits 3."""
    try:
        train(argv)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    run(main)
