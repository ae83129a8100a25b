"""PeRFlow reflow batches, targets and loss, backend-agnostic (PeRFlow arXiv 2405.07510, Alg. 1).

A backend supplies `teacher_eps(x, t, cond) -> eps` (frozen teacher, t in [0, 1] per item, t = 1 noisiest) and
`student(x, t, cond) -> output` (the network under training, fed t the same way); the teacher solve is
training.solvers', windows, noise levels and parameterizations are perflow_core's.

A flow-matching teacher (time_kind "flow": SD3, Flux, the toy flow teacher) predicts v = eps - x0 at sigma s, with
x_s = (1 - s) x0 + s eps; there t is that sigma, the windows are perflow_core.flow_windows' with flow_shift, and the
student learns the velocity parameterization.
"""

from dataclasses import asdict, dataclass

import torch

from perflow_core.delta_format import TIME_KINDS
from perflow_core.flow_windows import check_flow_shift, flow_sigmas, time_shift, window_of_sigma
from perflow_core.noising import marginal
from perflow_core.parameterization import PARAMETERIZATIONS, epsilon_for_window_end
from perflow_core.schedule import perflow_timesteps
from perflow_core.windows import NUM_TRAIN_TIMESTEPS, check_num_windows, window_of
from training.solvers import Cond, EpsFn, per_item, solve_teacher, solve_teacher_flow

CFG_MODES = ("sync", "fixed")
REWEIGHTINGS = ("none", "reciprocal")


@dataclass
class ReflowConfig:
    """Reflow hyper-parameters; names follow the published script (windows, solving_steps, discrete_timesteps)."""

    parameterization: str = "diff_eps"
    num_windows: int = 4
    solver_steps: int = 4
    timestep_grid: int = NUM_TRAIN_TIMESTEPS
    cfg_mode: str = "sync"
    cfg_scale: float = 4.5
    cond_dropout: float = 0.1
    reweighting: str = "none"
    sampler_point_share: float = 0.75  # published: 0; see sample_timepoints

    sampler_point_steps: tuple[int, ...] = (4, 5, 6, 7, 8)
    time_kind: str = "diffusion"  # "flow": a flow-matching teacher (set from the backend, not by the user)
    flow_shift: float = 1.0  # flow windows' time shift (perflow_core.flow_windows); 1 = none

    def validate(self) -> None:
        """Reject out-of-range values up front, naming the allowed range."""
        _check(self.parameterization in PARAMETERIZATIONS, "parameterization", self.parameterization, PARAMETERIZATIONS)
        check_num_windows(self.num_windows)  # the same 1..16 as the nodes and delta files
        _check(1 <= self.solver_steps <= 1000, "solver_steps", self.solver_steps, "an integer in 1..1000")
        _check(
            self.num_windows <= self.timestep_grid <= NUM_TRAIN_TIMESTEPS
            and NUM_TRAIN_TIMESTEPS % self.timestep_grid == 0,
            "timestep_grid",
            self.timestep_grid,
            f"a divisor of {NUM_TRAIN_TIMESTEPS} in num_windows..{NUM_TRAIN_TIMESTEPS}",
        )
        _check(self.cfg_mode in CFG_MODES, "cfg_mode", self.cfg_mode, CFG_MODES)
        _check(1.0 <= self.cfg_scale <= 30.0, "cfg_scale", self.cfg_scale, "a float in [1, 30]")
        _check(0.0 <= self.cond_dropout < 1.0, "cond_dropout", self.cond_dropout, "a float in [0, 1)")
        _check(self.reweighting in REWEIGHTINGS, "reweighting", self.reweighting, REWEIGHTINGS)
        share, steps = self.sampler_point_share, self.sampler_point_steps
        _check(0.0 <= share <= 1.0, "sampler_point_share", share, "a float in [0, 1]")
        _check(
            share == 0.0 or (len(steps) > 0 and all(self.num_windows <= n <= NUM_TRAIN_TIMESTEPS for n in steps)),
            "sampler_point_steps",
            steps,
            f"one or more step counts in {self.num_windows}..{NUM_TRAIN_TIMESTEPS} (at least one per window)",
        )
        _check(self.time_kind in TIME_KINDS, "time_kind", self.time_kind, TIME_KINDS)
        if self.time_kind == "flow":
            check_flow_shift(self.flow_shift)
            _check(
                self.parameterization == "velocity",
                "parameterization",
                self.parameterization,
                "velocity for a flow teacher",
            )
        else:
            _check(self.flow_shift == 1.0, "flow_shift", self.flow_shift, "1 (no shift) for a diffusion teacher")

    def as_dict(self) -> dict:
        """The settings by name; a diffusion run leaves out the flow entries, so its checkpoints and summaries read
        as those written before flow teachers existed (and resume)."""
        d = asdict(self)
        if self.time_kind == "diffusion":
            del d["time_kind"], d["flow_shift"]
        return d


def _check(ok: bool, name: str, value, allowed: str | tuple[str, ...]) -> None:
    """Raise ValueError naming the allowed values or range."""
    if not ok:
        allowed = f"one of {', '.join(allowed)}" if isinstance(allowed, tuple) else allowed
        raise ValueError(f"{name} must be {allowed}; got {value!r}")


def sampler_points(
    num_windows: int, step_counts: tuple[int, ...], flow_shift: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, probability): every t at which the PeRFlow sampler evaluates the model for one of step_counts
    (perflow_timesteps / 1000: the window starts and the points between; for a flow teacher, with flow_shift, the
    sigmas of flow_sigmas but its final 0), each step count an equal share split evenly over its steps, so a point
    shared by several schedules (a window start) adds up their shares."""
    mass: dict[float, float] = {}
    for n in step_counts:
        if flow_shift is None:
            points = (perflow_timesteps(n, num_windows) / NUM_TRAIN_TIMESTEPS).tolist()
        else:
            points = flow_sigmas(n, num_windows, flow_shift)[:-1].tolist()
        for k in points:
            mass[k] = mass.get(k, 0.0) + 1.0 / (len(points) * len(step_counts))
    keys = sorted(mass, reverse=True)
    return torch.tensor(keys, dtype=torch.float64), torch.tensor([mass[k] for k in keys])


def sample_timepoints(
    batch: int,
    grid: int,
    generator: torch.Generator | None = None,
    *,
    point_share: float = 0.0,
    points: tuple[torch.Tensor, torch.Tensor] | None = None,
    flow_shift: float | None = None,
) -> torch.Tensor:
    """t = 1 - floor(u * grid) / grid, u ~ U[0, 1): values 1, 1 - 1/grid, ..., 1/grid (published script, 6.2).
    With point_share > 0 each item is instead, with that probability, one of the `points` (t, probability) of
    `sampler_points`: the sampler evaluates exactly at window starts, where the target jumps, and a uniform grid
    gives each of them 1/(grid/K) of its window. Issue 13, toy K = 4, 600 iterations: PeRFlow-4 0.69x teacher DDIM-4
    at share 0.75, 0.80x at 0.5, 1.66x at 0 (published); better at every step count 4..16 measured.
    With flow_shift (a flow teacher) the grid is in the unshifted time and is mapped to sigma by the shift, so the
    timepoints are as dense as the model's own sampling steps; the points are sigmas already."""
    u = torch.rand(batch, generator=generator)
    t = 1 - torch.floor(u * grid) / grid
    if flow_shift is not None:
        t = time_shift(t.double(), flow_shift).float()
    if point_share <= 0.0:
        return t
    if points is None:
        raise ValueError("sample_timepoints: point_share > 0 needs points (see sampler_points)")
    pick = torch.rand(batch, generator=generator) < point_share
    index = torch.multinomial(points[1], batch, replacement=True, generator=generator)
    return torch.where(pick, points[0][index].to(t.dtype), t)


def select_cond(keep: torch.Tensor, cond: Cond, null_cond: Cond) -> Cond:
    """Per item: cond where keep[i] else null_cond (tensors or dicts of tensors, batch first): CFG dropout."""
    if isinstance(cond, dict):
        return {k: select_cond(keep, v, null_cond[k]) for k, v in cond.items()}
    k = keep.to(cond.device).reshape(keep.shape[:1] + (1,) * (cond.ndim - 1))
    return torch.where(k, cond, null_cond.to(cond.dtype).expand_as(cond))


def reflow_target(
    parameterization: str,
    z_s: torch.Tensor,
    z_e: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    num_windows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_t, target): z_t on the segment z_s -> z_e at t; the target is the velocity (z_e - z_s)/(t_e - t_s) or the
    eps whose window-end step lands on z_e (published script, 6.4; equal to (z_e - lambda_s z_s) / eta_s)."""
    tb = per_item(t, z_s)
    z_t, v = straight_segment(z_s, z_e, tb, *window_of(tb, num_windows))
    if parameterization == "velocity":
        return z_t, v
    return z_t, epsilon_for_window_end(parameterization, z_e, z_t, t.to(z_s.dtype), alphas_cumprod, num_windows)


def straight_segment(
    z_s: torch.Tensor, z_e: torch.Tensor, t: torch.Tensor, t_s: torch.Tensor, t_e: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_t, v): the point at t on the straight line from z_s (at t_s) to z_e (at t_e) and its velocity
    (z_e - z_s) / (t_e - t_s), PeRFlow's reflow target within a window (arXiv 2405.07510, Sec. 3)."""
    v = (z_e - z_s) / (t_e - t_s)
    return z_s + (t - t_s) * v, v


@dataclass
class ReflowBatch:
    """One batch of student inputs and regression targets."""

    z_t: torch.Tensor
    t: torch.Tensor
    cond: Cond
    target: torch.Tensor


def draw_reflow_noise(
    cfg: ReflowConfig, batch: int, shape: tuple[int, ...], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t, noise, keep) for a whole global batch from one generator, so that any sharding of it over processes
    sees the same draws as one process: timepoints, unit noise and the conditioning-keep mask (CFG dropout)."""
    shift = cfg.flow_shift if cfg.time_kind == "flow" else None
    points = sampler_points(cfg.num_windows, cfg.sampler_point_steps, shift) if cfg.sampler_point_share > 0 else None
    share = cfg.sampler_point_share
    t = sample_timepoints(batch, cfg.timestep_grid, generator, point_share=share, points=points, flow_shift=shift)
    noise = torch.randn((batch, *shape), generator=generator)
    keep = torch.rand(batch, generator=generator) >= cfg.cond_dropout
    return t, noise, keep


@torch.no_grad()
def make_reflow_batch(
    cfg: ReflowConfig,
    teacher_eps: EpsFn,
    latents: torch.Tensor,
    cond: Cond,
    null_cond: Cond,
    alphas_cumprod: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    keep: torch.Tensor,
) -> ReflowBatch:
    """Window of t, z_s = DDPM marginal of the clean latent at t_s (t_s = 1 uses alphas_cumprod[999], not pure
    noise, as published), teacher solve to z_e, straight-line z_t and target. Items with keep = False get
    null_cond; the teacher solves with the same (dropped) conditioning, at guidance 1 (`sync`) or cfg_scale
    (`fixed`; a dropped item then follows the unconditional flow). A flow teacher (cfg.time_kind "flow"): t is
    sigma, z_s = (1 - s_s) x0 + s_s eps on the model's own line, its own Euler solve to z_e, the velocity target."""
    dev = latents.device
    t, noise, ac = t.to(dev), noise.to(dev, latents.dtype), alphas_cumprod.to(dev)
    cond = select_cond(keep.to(dev), cond, null_cond)
    scale = 1.0 if cfg.cfg_mode == "sync" else cfg.cfg_scale
    if cfg.time_kind == "flow":
        s_s, s_e = window_of_sigma(t, cfg.num_windows, cfg.flow_shift)
        z_s = latents + per_item(s_s, latents) * (noise - latents)
        z_e = solve_teacher_flow(teacher_eps, z_s, s_s, s_e, cfg.solver_steps, cond, scale, null_cond)
        z_t, target = straight_segment(z_s, z_e, *(per_item(v, latents) for v in (t, s_s, s_e)))
        return ReflowBatch(z_t=z_t, t=t, cond=cond, target=target)
    t_s, t_e = window_of(t, cfg.num_windows)
    z_s = marginal(latents, noise, per_item(t_s, latents), ac)
    z_e = solve_teacher(teacher_eps, z_s, t_s, t_e, cfg.solver_steps, ac, cond, scale, null_cond)
    z_t, target = reflow_target(cfg.parameterization, z_s, z_e, t, ac, cfg.num_windows)
    return ReflowBatch(z_t=z_t, t=t, cond=cond, target=target)


def reflow_loss(pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor, reweighting: str = "none") -> torch.Tensor:
    """Mean squared error; `reciprocal` weights items by 1 / max(1 - t, 0.1) / 2.3 (published script)."""
    loss = ((pred.float() - target.float()) ** 2).flatten(1).mean(1)
    if reweighting == "reciprocal":
        loss = loss / torch.clamp(1.0 - t.float(), min=0.1) / 2.3
    return loss.mean()
