"""The phases of a run: the trained students (once each, by recipe), then the rows each phase scores."""

import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from benchmarks import delta_load_memory, sampler_overhead
from benchmarks.toy.budget import K4_RECIPES_BY_KIND, RECIPES_BY_KIND, Budget, Recipe
from benchmarks.toy.evaluate import Evaluator
from benchmarks.toy.metrics import features
from benchmarks.toy.models import apply_delta, finetune, save_student, thicken, train_student
from benchmarks.toy.sampling import REFERENCE, TEACHER_SAMPLERS, Sampler
from perflow_core.cfg_schedule import ramp_cfg_scales, window_cfg_scales

CFGS = (1.0, 2.5)
STEPS = (4, 5, 6, 7, 8)  # PeRFlow K = 4 and the teacher's samplers at every count the published grid serves


class Students:
    """The PeRFlow students by recipe name, each trained on first use for b.iters iterations (one budget for every
    trained row), its delta written to out/<name>.safetensors and its trend recorded at b.checkpoint_iters()."""

    def __init__(self, ev: Evaluator, teacher: nn.Module, images, labels, b: Budget, out: Path, seed: int):
        self.ev, self.teacher, self.images, self.labels, self.b, self.out, self.seed = (
            ev, teacher, images, labels, b, out, seed,
        )  # fmt: skip
        self.nets: dict[str, nn.Module] = {}
        self.deltas: dict[str, dict] = {}
        self.training: dict[str, dict] = {}
        self.trend: list[dict] = []

    def __getitem__(self, name: str) -> nn.Module:
        if name not in self.nets:
            recipe = RECIPES_BY_KIND[self.ev.kind][name]
            print(f"training {name}: {recipe}, {self.b.iters} iterations")

            def checkpoint(it: int, times: dict, student: nn.Module) -> None:
                p = self.ev.trend_point(self.teacher, student, recipe.parameterization, recipe.num_windows)
                self.trend.append({"recipe": name, "iteration": it} | times | p)
                print(
                    f"  {name} it {it} ({times['cpu_seconds']:.0f} s CPU): mse {p['paired_mse']:.5f} "
                    f"ratio {p['ratio']:.2f}"
                )

            net, info = train_student(
                self.teacher, self.images, self.labels, self.b, recipe, self.b.iters, checkpoint, self.seed
            )
            self.deltas[name] = save_student(
                self.out / f"{name}.safetensors", self.teacher, net, self.b, recipe, self.b.iters
            )
            self.training[name] = info | {"recipe": recipe.__dict__}
            print(f"  {name}: {info['iters']} it, {info['cpu_seconds']:.0f} s CPU, {info['wall_seconds']:.0f} s wall")
            self.nets[name] = net
        return self.nets[name]

    def delta(self, name: str) -> dict[str, torch.Tensor]:
        """The delta of a student (trained first where it is not yet)."""
        self[name]
        return self.deltas[name]


def main_rows(ev: Evaluator, teacher: nn.Module, students: Students) -> None:
    """Teacher samplers (the reference solver, DDIM or flow Euler, at 1, 2, 4..8, 16, 100; DDIM `normal` spacing at 4;
    DPM-Solver++(2M) 4..8; flow Heun at 2, 3, 4 = 3, 5, 7 evaluations, around the 4 of a 4-step row), the untrained
    teacher through PeRFlow-4, every K = 4 recipe at 4..8 steps and K = 2 at 2, each at CFG 1 and 2.5, paired
    against the teacher's reference."""
    for cfg in CFGS:
        for name in TEACHER_SAMPLERS[ev.kind]:
            counts = {REFERENCE[ev.kind]: (1, 2, *STEPS, 16, ev.ref_steps), "ddim-normal": (4,), "heun": (2, 3, 4)}
            counts = counts.get(name, STEPS)
            for steps in counts:
                ev.row("main", "teacher", teacher, Sampler(name, steps, cfg), teacher)
        ev.row("main", "teacher (no delta)", teacher, Sampler("perflow", 4, cfg), teacher)
        for name in K4_RECIPES_BY_KIND[ev.kind]:
            for steps in STEPS:
                ev.row("main", name, students[name], Sampler("perflow", steps, cfg), teacher)
        ev.row("main", "perflow-K2", students["perflow-K2"], Sampler("perflow", 2, cfg, num_windows=2), teacher)


def cfg_schedule_rows(ev: Evaluator, teacher: nn.Module, student: nn.Module, hi: float = 2.5) -> None:
    """PeRFlow-4/8 with constant vs per-window CFG (perflow_core.cfg_schedule), paired against the teacher's
    reference at constant CFG `hi`."""
    schedules = (
        window_cfg_scales([1.0], 4),
        window_cfg_scales([hi, 1.0], 4),
        window_cfg_scales([hi, hi, 1.0], 4),
        ramp_cfg_scales(hi, 1.0, 4),
        window_cfg_scales([hi], 4),
    )
    for steps in (4, 8):
        for scales in schedules:
            sp = Sampler("perflow", steps, max(scales), scales=tuple(scales))
            ev.row("cfg_schedule", "perflow", student, sp, teacher, ref_cfg=hi)


def param_rows(ev: Evaluator, teacher: nn.Module, students: Students) -> None:
    """diff_eps vs velocity, the same recipe otherwise and the same iterations (equal cost: the same teacher solves
    and network passes per iteration); their curves against iterations and process CPU time are the students'
    trends. Rows: both at 4 steps, CFG 1 and 2.5."""
    for name, param in (("perflow", "diff_eps"), ("perflow-velocity", "velocity")):
        for cfg in CFGS:
            ev.row("param", name, students[name], Sampler("perflow", 4, cfg), teacher, param=param)


def plug_and_play_rows(ev: Evaluator, teacher, teacher_path: Path, delta: dict, images, labels, b, threads: int):
    """Fine-tune the teacher on a shifted domain (thicken), add the delta trained on the original teacher; PeRFlow-4
    with and without the delta and the fine-tune's DDIM-4, paired against the fine-tune's reference, fd_real against
    the shifted real data."""
    shifted = thicken(images)
    ft = finetune(teacher_path, shifted, labels, b, threads, str(ev.noise.device))
    ev.real_feats["shifted"] = features(ev.clf, shifted.to(ev.noise.device))[0]
    with_delta = apply_delta(ft, delta)
    ref = REFERENCE[ev.kind]
    for cfg in CFGS:
        ev.row("plug_and_play", "finetune+delta", with_delta, Sampler("perflow", 4, cfg), ft, real="shifted")
        ev.row("plug_and_play", "finetune", ft, Sampler("perflow", 4, cfg), ft, real="shifted")
        ev.row("plug_and_play", "finetune", ft, Sampler(ref, 4, cfg), ft, real="shifted")
        ev.row("plug_and_play", "teacher", teacher, Sampler(ref, ev.ref_steps, cfg), ft, real="shifted")


def cost(ev: Evaluator, teacher: nn.Module, students: Students, b: Budget, delta_path: Path | None) -> dict:
    """Training cost (process CPU and wall seconds per iteration) against S and K; the sampler's per-step overhead
    (benchmarks.sampler_overhead on the toy's latent) next to one network evaluation; peak RSS of reading a delta
    (benchmarks.delta_load_memory) for the trained delta and synthetic ones."""
    train = []
    for s, k in [(2, 4), (4, 4), (8, 4), (4, 2), (4, 8)]:
        recipe = Recipe(f"cost S={s} K={k}", num_windows=k, sampler_point_share=0.0)  # the draw costs nothing
        sized = replace(b, solver_steps=s)
        train_student(teacher, students.images, students.labels, sized, recipe, 1)  # warm-up
        _, info = train_student(teacher, students.images, students.labels, sized, recipe, b.cost_iters)
        per = {k_: info[f"{k_}_seconds"] / info["iters"] for k_ in ("cpu", "wall")}
        train.append(
            {"solver_steps": s, "num_windows": k, "batch": b.batch} | {f"{k_}_s_per_iter": v for k_, v in per.items()}
        )
        print(f"  train S={s} K={k}: {per['cpu']:.3f} s CPU/iter (batch {b.batch})")
    overhead = sampler_overhead.measure(steps=100, repeats=2, shape=tuple(ev.noise[:1].shape))
    _, secs = ev.sample(teacher, Sampler(REFERENCE[ev.kind], 8, 1.0))
    sampler = {"overhead_us_per_step": overhead, "network_ms_per_step": 1000 * secs / 8, "n": len(ev.noise)}
    print(f"  sampler overhead per step: { {p: round(r['overhead_us_per_step'], 1) for p, r in overhead.items()} } us")
    rss = []
    with tempfile.TemporaryDirectory(prefix="perflow-rss-") as tmp:
        paths = [delta_path] if delta_path is not None else []
        for mb in b.rss_sizes_mb:
            paths.append(Path(tmp) / f"synthetic_{mb}mb.safetensors")
            delta_load_memory.generate(str(paths[-1]), mb, "many")
        for p in paths:
            rss.append({"file": p.name} | delta_load_memory.measure_load(p))
            print(f"  delta read {p.name}: {rss[-1]['file_mib']:.1f} MiB -> peak RSS +{rss[-1]['read_mib']:.1f} MiB")
    return {"train": train, "sampler": sampler, "delta_read": rss}
