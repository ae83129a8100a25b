"""PeRFlow toy benchmark: few-step quality against the teacher's samplers, plug-and-play, CFG, cost.

Usage: python -m benchmarks.toy --out DIR [--quick] [--teacher FILE --data FILE] [--teacher-kind flow] [budget knobs]
       [--phases ...]

The teacher kind (diffusion: an eps teacher, sampled with DDIM / DPM++; flow: a flow-matching teacher, sampled with
its own Euler / Heun steps) is read from the teacher file's metadata (time_kind); --teacher-kind must agree with it
and, without --teacher, picks the bundled teacher of that kind. Every row samples the same fixed noises and labels.
Paired MSE is measured against the row's base model (teacher or fine-tune) sampled with its reference solver
(100-step DDIM, or 100-step Euler for a flow teacher) from the same noise at the same CFG; Frechet distances
use the features of a small classifier trained on the real data. Every trained model gets the same iterations;
training time is process CPU time. Writes results.json (with a meta block), results.md, plots and grids to --out.
"""

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.toy import phases, report
from benchmarks.toy.budget import KNOBS, PHASES, PHASES_BY_KIND, RECIPES_BY_KIND, budget_from
from benchmarks.toy.evaluate import Evaluator
from benchmarks.toy.metrics import load_classifier
from benchmarks.toy.sampling import FLOW_SHIFT, REFERENCE, TEACHER_KINDS
from benchmarks.toy.targets import MAIN_MODEL, check_targets
from training.backends.toy import ToyBackend
from training.cli import ArgumentParser
from training.toy_data import DEFAULT_DATA
from training.toy_model import load_toy_model, toy_time_kind

REPO = Path(__file__).resolve().parents[2]
TEACHERS = {  # the bundled toy teacher of each kind
    "diffusion": REPO / "training" / "teacher" / "toy_teacher.safetensors",
    "flow": REPO / "training" / "teacher" / "toy_flow_teacher.safetensors",
}


def parse_args(argv=None):
    """Command-line options; --quick picks the CI budget, the knobs override either budget."""
    p = ArgumentParser(prog="python -m benchmarks.toy", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI-sized run (seconds; labelled reduced)")
    p.add_argument("--out", type=Path, required=True, help="folder for results.json, results.md, plots, deltas")
    p.add_argument("--cache", type=Path, default=None, help="references and classifier (default: <out>/cache)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 by default)")
    p.add_argument(
        "--teacher", type=Path, default=None, help="a toy model file (default: the bundled teacher of --teacher-kind)"
    )
    p.add_argument(
        "--teacher-kind",
        choices=TEACHER_KINDS,
        default=None,
        help="the teacher's kind, which picks its samplers; read from the teacher file's metadata time_kind, "
        "so the flag checks it (a mismatch is refused) and picks the bundled teacher when --teacher is left out",
    )
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="an .npz of uint8 images and labels")
    p.add_argument("--phases", default=None, help=f"comma-separated subset of {','.join(PHASES)} (default: all)")
    for knob in KNOBS:
        p.add_argument(f"--{knob.replace('_', '-')}", type=float if knob == "lr" else int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for knob in KNOBS:
        value = getattr(args, knob)
        if value is not None and not value > 0:
            p.error(f"--{knob.replace('_', '-')} must be positive, got {value}")
    if args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    args.teacher = args.teacher or TEACHERS[args.teacher_kind or "diffusion"]
    try:
        load_toy_model(args.teacher)  # its own checks of the file, each naming the problem
        kind = toy_time_kind(args.teacher)
    except (OSError, ValueError) as e:
        p.error(f"--teacher: {e}")
    if args.teacher_kind not in (None, kind):
        p.error(
            f"--teacher-kind {args.teacher_kind}: the teacher {args.teacher} is a {kind} model (its metadata "
            f"time_kind); pass --teacher-kind {kind} or leave it out, or give a {args.teacher_kind} teacher file"
        )
    args.teacher_kind = kind
    if args.phases is not None:
        args.phases = tuple(x for x in args.phases.split(",") if x)
        unknown = [x for x in args.phases if x not in PHASES]
        if unknown:
            p.error(f"--phases: unknown {', '.join(unknown)}; choose from {', '.join(PHASES)}")
        other = [x for x in args.phases if x not in PHASES_BY_KIND[kind]]
        if other:
            p.error(
                f"--phases: {', '.join(other)} not run for a {kind} teacher; "
                f"choose from {', '.join(PHASES_BY_KIND[kind])}"
            )
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} is a file; give a folder")
    args.cache = args.cache or args.out / "cache"
    return args


def commit(out: Path) -> str:
    """The checked-out commit, '+dirty' with uncommitted changes to tracked files outside the run's own --out folder
    (a rerun into a committed results folder is not a code change; 'unknown' outside git)."""
    exclude = [f":(exclude){out.resolve().relative_to(REPO)}"] if out.resolve().is_relative_to(REPO) else []
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "-uno", "--", ".", *exclude], capture_output=True, text=True, cwd=REPO
        )
    except OSError:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if head.returncode == 0 else "unknown"


def machine(threads: int) -> str:
    model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "")
    return (
        f"{os.cpu_count()} CPUs ({model or platform.processor()}), {threads} torch thread(s), torch {torch.__version__}"
    )


class Clock:
    """Wall and process CPU seconds per phase, printed as each phase ends."""

    def __init__(self):
        self.phases: dict[str, dict] = {}

    def run(self, name: str, fn, *a):
        print(name, flush=True)
        w, c = time.perf_counter(), time.process_time()
        out = fn(*a)
        self.phases[name] = {"wall_seconds": time.perf_counter() - w, "cpu_seconds": time.process_time() - c}
        print(
            f"  [{name}: {self.phases[name]['wall_seconds']:.0f} s wall, {self.phases[name]['cpu_seconds']:.0f} s CPU]"
        )
        return out


def main(argv=None) -> dict:
    """Run the selected phases and write results.json, results.md, plots and grids."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    overrides = {k: getattr(args, k) for k in KNOBS}
    b = budget_from(args.quick, overrides, args.phases, args.teacher_kind)
    reduced = b.reduced(PHASES_BY_KIND[args.teacher_kind])
    wall0, cpu0, clock, code = time.perf_counter(), time.process_time(), Clock(), commit(args.out)  # the code that runs
    backend = ToyBackend.from_files(args.teacher, args.data, torch.device(args.device))
    teacher, images, labels = backend.teacher, backend.images, backend.labels
    args.out.mkdir(parents=True, exist_ok=True)
    args.cache.mkdir(parents=True, exist_ok=True)
    print(f"budget: {b.as_dict()}" + (f"; REDUCED: {', '.join(reduced)}" if reduced else "; full run"))
    clf, clf_acc = clock.run(
        "classifier", load_classifier, args.cache, args.data, images, labels, b.classifier_epochs, args.device
    )
    print(f"  classifier held-out accuracy {clf_acc:.3f}")
    ev = Evaluator(b.n, b.ref_steps, b.trend_n, args.teacher_kind, clf, images, args.cache, args.seed)
    students = phases.Students(ev, teacher, images, labels, b, args.out, args.seed)
    cost = {}
    if "main" in b.phases:
        clock.run("main rows", phases.main_rows, ev, teacher, students)
    if "cfg_schedule" in b.phases:
        clock.run("CFG schedules", phases.cfg_schedule_rows, ev, teacher, students[MAIN_MODEL])
    if "param" in b.phases:
        clock.run("diff_eps vs velocity", phases.param_rows, ev, teacher, students)
    if "plug_and_play" in b.phases:
        pnp = (ev, teacher, args.teacher, students.delta(MAIN_MODEL), images, labels, b, args.threads)
        clock.run("plug-and-play", phases.plug_and_play_rows, *pnp)
    if "cost" in b.phases:
        delta = args.out / f"{MAIN_MODEL}.safetensors" if MAIN_MODEL in students.nets else None
        cost = clock.run("cost", phases.cost, ev, teacher, students, b, delta)
    print("targets (reported, not asserted)")
    targets = check_targets(ev.records, students.trend, args.teacher_kind)
    by_name = RECIPES_BY_KIND[args.teacher_kind]
    recipes = {
        n: by_name[n].__dict__ | {"reflow": by_name[n].reflow_config(b.solver_steps).as_dict()} for n in students.nets
    }
    meta = {
        "command": " ".join(["python -m benchmarks.toy", *(argv if argv is not None else sys.argv[1:])]),
        "commit": code,
        "machine": machine(args.threads),
        "device": args.device,
        "reduced": bool(reduced),
        "reduced_by": reduced,
        "budget": b.as_dict(),
        "time_grid": "published 1/1000 (t = i/1000) for every recipe but perflow-grid8 (1/8); the trainer's default "
        "puts sampler_point_share of the timepoints on the PeRFlow sampler's own points for sampler_point_steps",
        "training": {
            "batch": b.batch,
            "lr": b.lr,
            "warmup": b.warmup,
            "ema": b.ema,
            "iters": b.iters,
            "recipes": recipes,
        },
        "trained": students.training,
        "data": str(args.data),
        "teacher": str(args.teacher),
        "teacher_kind": args.teacher_kind,
        **({"flow_shift": FLOW_SHIFT} if args.teacher_kind == "flow" else {}),
        "reference": f"{REFERENCE[args.teacher_kind]}-{b.ref_steps}",
        "seed": args.seed,
        "classifier_acc": clf_acc,
        "phase_seconds": clock.phases,
        "total_wall_seconds": time.perf_counter() - wall0,
        "total_cpu_seconds": time.process_time() - cpu0,
    }
    res = {"meta": meta, "records": ev.records, "trend": students.trend, "cost": cost, "targets": targets}
    report.write_results(args.out, res)
    report.write_grids(args.out, ev.images)
    plots = report.write_plots(args.out, res)
    print(
        f"wrote {args.out}: results.json, results.md, {', '.join(plots)}, grids/; "
        f"{meta['total_wall_seconds'] / 60:.1f} min"
    )
    return res
