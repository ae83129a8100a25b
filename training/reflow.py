"""PeRFlow reflow targets and one optimisation step, backend-agnostic (PeRFlow arXiv 2405.07510, Alg. 1).

A backend supplies `teacher_eps(x, t, cond) -> eps` (frozen teacher, t in [0, 1] per item, t = 1 noisiest) and
`student(x, t, cond) -> output` (the network under training, fed t the same way); everything else lives here and
reuses `perflow_core` for windows, noise levels and parameterizations.
"""

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from perflow_core.noising import marginal
from perflow_core.parameterization import PARAMETERIZATIONS, epsilon_for_window_end
from perflow_core.schedule import alphas_cumprod_at
from perflow_core.windows import NUM_TRAIN_TIMESTEPS, window_of

Cond = torch.Tensor | dict
EpsFn = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]
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

    def validate(self) -> None:
        """Reject out-of-range values up front, naming the allowed range."""
        _check(self.parameterization in PARAMETERIZATIONS, "parameterization", self.parameterization, PARAMETERIZATIONS)
        _check(1 <= self.num_windows <= 100, "num_windows", self.num_windows, "an integer in 1..100")
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

    def as_dict(self) -> dict:
        return asdict(self)


def _check(ok: bool, name: str, value, allowed: str | tuple[str, ...]) -> None:
    """Raise ValueError naming the allowed values or range."""
    if not ok:
        allowed = f"one of {', '.join(allowed)}" if isinstance(allowed, tuple) else allowed
        raise ValueError(f"{name} must be {allowed}; got {value!r}")


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] to broadcast against x."""
    return t.reshape(t.shape[:1] + (1,) * (x.ndim - 1)).to(x.dtype)


def sample_timepoints(batch: int, grid: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """t = 1 - floor(u * grid) / grid, u ~ U[0, 1): values 1, 1 - 1/grid, ..., 1/grid (published script, 6.2)."""
    u = torch.rand(batch, generator=generator)
    return 1 - torch.floor(u * grid) / grid


def select_cond(keep: torch.Tensor, cond: Cond, null_cond: Cond) -> Cond:
    """Per item: cond where keep[i] else null_cond (tensors or dicts of tensors, batch first): CFG dropout."""
    if isinstance(cond, dict):
        return {k: select_cond(keep, v, null_cond[k]) for k, v in cond.items()}
    k = keep.to(cond.device).reshape(keep.shape[:1] + (1,) * (cond.ndim - 1))
    return torch.where(k, cond, null_cond.to(cond.dtype).expand_as(cond))


def guided_eps(teacher_eps: EpsFn, x: torch.Tensor, t: torch.Tensor, cond: Cond, null_cond, scale: float):
    """Classifier-free guidance eps_u + s (eps_c - eps_u); a plain conditional call at s = 1."""
    eps = teacher_eps(x, t, cond)
    if scale == 1.0:
        return eps
    eps_u = teacher_eps(x, t, null_cond)
    return eps_u + scale * (eps - eps_u)


def _grid_alphas(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t rounded to the 1/1000 grid, its alphas_cumprod): the published solver rounds its timesteps."""
    t_grid = torch.round(t.double() * NUM_TRAIN_TIMESTEPS) / NUM_TRAIN_TIMESTEPS
    return t_grid.float(), alphas_cumprod_at(alphas_cumprod.double(), t_grid).float()


@torch.no_grad()
def solve_teacher(
    teacher_eps: EpsFn,
    z_s: torch.Tensor,
    t_s: torch.Tensor,
    t_e: torch.Tensor,
    steps: int,
    alphas_cumprod: torch.Tensor,
    cond: Cond,
    cfg: float = 1.0,
    null_cond: Cond | None = None,
) -> torch.Tensor:
    """Teacher PF-ODE from t_s to t_e (per item, [B]) in `steps` equal DDIM steps (published PFODESolver):
    x0 = (x - sqrt(1 - a) eps) / sqrt(a), x <- sqrt(a') x0 + sqrt(1 - a') eps, times on the 1/1000 grid."""
    if cfg != 1.0 and null_cond is None:
        raise ValueError("classifier-free guidance (cfg != 1) needs null_cond")
    x = z_s
    for i in range(steps):
        t_now, a_now = _grid_alphas(alphas_cumprod, t_s + (t_e - t_s) * (i / steps))
        _, a_next = _grid_alphas(alphas_cumprod, t_s + (t_e - t_s) * ((i + 1) / steps))
        eps = guided_eps(teacher_eps, x, t_now.to(x.device), cond, null_cond, cfg).to(x.dtype)
        a_now, a_next = _bcast(a_now, x).to(x.device), _bcast(a_next, x).to(x.device)
        x0 = (x - (1 - a_now).sqrt() * eps) / a_now.sqrt()
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return x


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
    tb = _bcast(t, z_s)
    t_s, t_e = window_of(tb, num_windows)
    z_t = z_s + (z_e - z_s) * (tb - t_s) / (t_e - t_s)
    if parameterization == "velocity":
        return z_t, (z_e - z_s) / (t_e - t_s)
    return z_t, epsilon_for_window_end(parameterization, z_e, z_t, t.to(z_s.dtype), alphas_cumprod, num_windows)


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
    t = sample_timepoints(batch, cfg.timestep_grid, generator)
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
    (`fixed`; a dropped item then follows the unconditional flow)."""
    dev = latents.device
    t, noise, ac = t.to(dev), noise.to(dev, latents.dtype), alphas_cumprod.to(dev)
    t_s, t_e = window_of(t, cfg.num_windows)
    z_s = marginal(latents, noise, _bcast(t_s, latents), ac)
    cond = select_cond(keep.to(dev), cond, null_cond)
    scale = 1.0 if cfg.cfg_mode == "sync" else cfg.cfg_scale
    z_e = solve_teacher(teacher_eps, z_s, t_s, t_e, cfg.solver_steps, ac, cond, scale, null_cond)
    z_t, target = reflow_target(cfg.parameterization, z_s, z_e, t, ac, cfg.num_windows)
    return ReflowBatch(z_t=z_t, t=t, cond=cond, target=target)


def reflow_loss(pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor, reweighting: str = "none") -> torch.Tensor:
    """Mean squared error; `reciprocal` weights items by 1 / max(1 - t, 0.1) / 2.3 (published script)."""
    per_item = ((pred.float() - target.float()) ** 2).flatten(1).mean(1)
    if reweighting == "reciprocal":
        per_item = per_item / torch.clamp(1.0 - t.float(), min=0.1) / 2.3
    return per_item.mean()


class EMA:
    """Exponential moving average of trainable parameters, kept in float32: e <- d e + (1 - d) p."""

    def __init__(self, params: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.shadow = {k: p.detach().float().clone() for k, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor]) -> None:
        for k, p in params.items():
            self.shadow[k].lerp_(p.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}


def warmup_lambda(warmup_steps: int) -> Callable[[int], float]:
    """Linear warmup to the base learning rate over warmup_steps, then constant (published default: constant)."""
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def make_optimizer(
    params, lr: float, weight_decay: float, warmup_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (betas 0.9/0.999, eps 1e-8 as published) with a warmup schedule."""
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(warmup_steps))


def autocast_dtype(precision: str) -> torch.dtype | None:
    """None for fp32, else the autocast dtype for `bf16` / `fp16`."""
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def train_step(
    student: Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor],
    batch: ReflowBatch,
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
    loss = reflow_loss(pred, batch.target, batch.t, reweighting)
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
