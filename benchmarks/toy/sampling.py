"""The samplers the rows compare, all from training.solvers; the one place that picks them by teacher kind."""

import time
from dataclasses import dataclass

import torch
from torch import nn

from perflow_core.cfg_schedule import cfg_at
from perflow_core.flow_windows import flow_sigmas
from perflow_core.schedule import perflow_sigmas
from training.solvers import flow_ode_solve, guided_eps, ode_solve, perflow_solve, shifted_sigmas

CHUNK = 500  # images per network call while sampling (bounds memory at any N)

# The teacher's own samplers by teacher kind (the toy model file's metadata time_kind): row name -> (solver, schedule)
# and the reference every paired error is measured against. diffusion: training.solvers.ode_solve (sampler,
# spacing); flow: training.solvers.flow_ode_solve (sampler) on shifted_sigmas, its own evenly spaced schedule, and
# PeRFlow rows sample with the same Euler step on perflow_core.flow_windows.flow_sigmas (as training.preview does).
# Nothing else in the benchmark names a solver, so a flow teacher cannot reach DDIM nor an eps teacher Euler.
TEACHER_SAMPLERS = {
    "diffusion": {
        "ddim": ("ddim", "trailing"),
        "ddim-normal": ("ddim", "normal"),
        "dpmpp_2m": ("dpmpp_2m", "trailing"),
    },
    "flow": {
        "euler": ("euler", "shifted"),
        "heun": ("heun", "shifted"),
    },
}
REFERENCE = {"diffusion": "ddim", "flow": "euler"}
TEACHER_KINDS = tuple(TEACHER_SAMPLERS)
FLOW_SHIFT = 1.0  # the toy flow teacher's time shift: none (trained on uniform sigma); its windows use the same


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
        """Network evaluations per sample: 2 per step with guidance (cond + uncond), 1 without; flow Heun evaluates
        twice per step but the last (training.solvers.flow_ode_solve)."""
        if self.name == "heun":
            return (2 * self.steps - 1) * (1 if self.cfg == 1.0 else 2)
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
    eps = lambda x, t, y: net(x, t * 1000.0, y)  # noqa: E731  (the toy network is fed t*1000; flow: sigma*1000)
    outs, start = [], time.perf_counter()
    for lo in range(0, len(noise), CHUNK):
        x, y = noise[lo : lo + CHUNK], labels[lo : lo + CHUNK]
        null = torch.full_like(y, net.num_classes)
        if kind == "flow":
            x = flow_sample(eps, x, y, null, sp)
        elif sp.name == "perflow":
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


def flow_sample(velocity, x: torch.Tensor, y: torch.Tensor, null: torch.Tensor, sp: Sampler) -> torch.Tensor:
    """One chunk from a flow-matching net (velocity at sigma): a teacher sampler on its own schedule, or PeRFlow's
    Euler steps on the windowed schedule; guidance on the velocity (the trainer's teacher solve and preview)."""
    if sp.scales is not None:
        raise ValueError("per-window CFG scales are not defined for a flow teacher's rows")
    if sp.name == "perflow":
        solver, sigmas = "euler", flow_sigmas(sp.steps, sp.num_windows, FLOW_SHIFT)
    else:
        solver, _ = TEACHER_SAMPLERS["flow"][sp.name]
        sigmas = shifted_sigmas(sp.steps, FLOW_SHIFT)
    return flow_ode_solve(lambda xx, s: guided_eps(velocity, xx, s, y, null, sp.cfg), x, sigmas, solver)
