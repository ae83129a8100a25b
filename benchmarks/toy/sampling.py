"""The samplers the rows compare, all from training.solvers; the one place that picks them by teacher kind."""

import time
from dataclasses import dataclass

import torch
from torch import nn

from perflow_core.cfg_schedule import cfg_at
from perflow_core.schedule import perflow_sigmas
from training.solvers import guided_eps, ode_solve, perflow_solve

CHUNK = 500  # images per network call while sampling (bounds memory at any N)

# The teacher's own samplers by teacher kind: row name -> training.solvers.ode_solve (sampler, spacing), and the
# reference every paired error is measured against. A flow-matching teacher gets its entry here once
# training.solvers has its Euler solve; nothing else in the benchmark names a solver.
TEACHER_SAMPLERS = {
    "diffusion": {
        "ddim": ("ddim", "trailing"),
        "ddim-normal": ("ddim", "normal"),
        "dpmpp_2m": ("dpmpp_2m", "trailing"),
    },
}
REFERENCE = {"diffusion": "ddim"}
TEACHER_KINDS = tuple(TEACHER_SAMPLERS)


@dataclass(frozen=True)
class Sampler:
    """One sampling configuration: name ('perflow' or a teacher sampler), steps, CFG (a constant, or per-window
    scales for PeRFlow) and K."""

    name: str
    steps: int
    cfg: float
    scales: tuple[float, ...] | None = None
    num_windows: int = 4

    def nfe(self) -> int:
        """Network evaluations per sample: 2 per step with guidance (cond + uncond), 1 without."""
        if self.name != "perflow" or self.scales is None:
            return self.steps * (1 if self.cfg == 1.0 else 2)
        sig = perflow_sigmas(self.steps, self.num_windows)
        return sum(1 if cfg_at(list(self.scales), sig[i]) == 1.0 else 2 for i in range(len(sig) - 1))

    def label(self) -> str:
        return f"perflow-K{self.num_windows}" if self.name == "perflow" else self.name

    def cfg_label(self):
        """The cfg value recorded: a float, or the comma-joined per-window list."""
        return self.cfg if self.scales is None else ",".join(f"{s:g}" for s in self.scales)


def reference_sampler(kind: str, steps: int, cfg: float) -> Sampler:
    """The sampler every paired error is measured against: the teacher kind's reference solver at `steps`."""
    return Sampler(REFERENCE[kind], steps, cfg)


@torch.no_grad()
def run_sampler(
    net: nn.Module, noise: torch.Tensor, labels: torch.Tensor, sp: Sampler, kind: str, param: str = "diff_eps"
) -> tuple[torch.Tensor, float]:
    """Sample all N images with one sampler, in chunks; returns (images clamped to [-1, 1], wall seconds)."""
    eps = lambda x, t, y: net(x, t * 1000.0, y)  # noqa: E731  (the toy network is fed t*1000)
    outs, start = [], time.perf_counter()
    for lo in range(0, len(noise), CHUNK):
        x, y = noise[lo : lo + CHUNK], labels[lo : lo + CHUNK]
        null = torch.full_like(y, net.num_classes)
        if sp.name == "perflow":
            scales = list(sp.scales) if sp.scales is not None else [sp.cfg] * sp.num_windows
            schedule = lambda s, sc=scales: cfg_at(sc, s)  # noqa: E731
            x = perflow_solve(eps, x, y, null, schedule, param, sp.num_windows, steps=sp.steps)
        else:
            solver, spacing = TEACHER_SAMPLERS[kind][sp.name]

            def guided(xx, t, y=y, null=null):
                return guided_eps(eps, xx, torch.full((len(xx),), t, device=xx.device), y, null, sp.cfg)

            x = ode_solve(guided, x, sp.steps, solver, spacing)
        outs.append(x)
    if noise.device.type == "cuda":
        torch.cuda.synchronize()
    return torch.cat(outs).clamp(-1, 1), time.perf_counter() - start
