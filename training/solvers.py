"""The teacher's ODE solvers and the few-step samplers, on the project's t convention (any eps function).

Convention: t in [0, 1], t = 1 is noise; a network gets timestep t*1000 and the noise level at t is
alphas_cumprod[t*1000 - 1] (fractional indices interpolate log sigma, as ComfyUI's ModelSamplingDiscrete). At t = 0
alpha_cumprod is 1 (diffusers' set_alpha_to_one=True), so a last step to 0 returns the x0 prediction itself.
This module holds the one DDIM step of the repository: the reflow teacher solve and every DDIM sampler use it.

Flow-matching teachers (SD3, Flux, the toy flow teacher) use sigma s in [0, 1] instead: x_s = (1 - s) x0 + s eps,
the network predicts v = eps - x0 = dx/ds, fed s the way the toy feeds t. Their one ODE loop is flow_ode_solve
(Euler or Heun); the flow reflow teacher solve and every flow sampler use it.
"""

from collections.abc import Callable

import torch

from perflow_core.flow_windows import time_shift
from perflow_core.model_sampling import PeRFlowModelSampling
from perflow_core.sampling import sample_perflow
from perflow_core.schedule import perflow_sigmas, sd_alphas_cumprod
from perflow_core.windows import NUM_TRAIN_TIMESTEPS

Cond = torch.Tensor | dict
EpsFn = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]  # eps(x, t per item [B], cond)
SPACINGS = ("trailing", "normal", "leading")


def per_item(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B] (or a scalar) -> [B, 1, ..., 1] in x's dtype and device, to broadcast against x."""
    values = values.to(x.device, x.dtype)
    return values.reshape(values.shape[:1] + (1,) * (x.ndim - 1)) if values.ndim else values


def alpha_bar(t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Noise level at t (any shape, float64 for exact indices): alphas_cumprod[t*1000 - 1], log sigma interpolated
    between table entries (ComfyUI ModelSamplingDiscrete.sigma), 1 at t = 0."""
    ac = alphas_cumprod.double().to(t.device)
    idx = (t.double() * NUM_TRAIN_TIMESTEPS - 1).clamp(0, len(ac) - 1)
    lo = torch.floor(idx + 1e-9).long().clamp(max=len(ac) - 1)
    w = (idx - lo).clamp(min=0)
    log_sigma = 0.5 * torch.log((1 - ac) / ac)
    ls = torch.lerp(log_sigma[lo], log_sigma[(lo + 1).clamp(max=len(ac) - 1)], torch.where(w < 1e-6, 0.0, w))
    return torch.where(t > 0, 1 / (1 + torch.exp(2 * ls)), torch.ones_like(ls))


def ddim_step(x: torch.Tensor, eps: torch.Tensor, a_now: torch.Tensor, a_next: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (Song et al. 2021, eq. 12, eta = 0): x0 = (x - sqrt(1 - a) eps) / sqrt(a), then
    x' = sqrt(a') x0 + sqrt(1 - a') eps."""
    x0 = (x - (1 - a_now).sqrt() * eps) / a_now.sqrt()
    return a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps


def guided_eps(eps_fn: EpsFn, x: torch.Tensor, t: torch.Tensor, cond: Cond, null_cond: Cond, scale: float):
    """Classifier-free guidance eps_u + s (eps_c - eps_u) (Ho & Salimans 2022); a plain conditional call at s = 1."""
    eps = eps_fn(x, t, cond)
    if scale == 1.0:
        return eps
    eps_u = eps_fn(x, t, null_cond)
    return eps_u + scale * (eps - eps_u)


def _on_grid(t: torch.Tensor) -> torch.Tensor:
    """t rounded to the 1/1000 grid (float64), at least 1/1000: the published solver's index round(t*1000) - 1,
    which is 0 (not alpha = 1) at t = 0."""
    return (torch.round(t.double() * NUM_TRAIN_TIMESTEPS) / NUM_TRAIN_TIMESTEPS).clamp(min=1 / NUM_TRAIN_TIMESTEPS)


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
    """Teacher PF-ODE from t_s to t_e (per item, [B]) in `steps` equal DDIM steps, times rounded to the 1/1000 grid
    (published PFODESolver)."""
    if cfg != 1.0 and null_cond is None:
        raise ValueError("classifier-free guidance (cfg != 1) needs null_cond")
    x = z_s
    for i in range(steps):
        t_now, t_next = (_on_grid(t_s + (t_e - t_s) * (j / steps)) for j in (i, i + 1))
        a_now, a_next = (per_item(alpha_bar(t, alphas_cumprod).float(), x) for t in (t_now, t_next))
        eps = guided_eps(teacher_eps, x, t_now.float().to(x.device), cond, null_cond, cfg).to(x.dtype)
        x = ddim_step(x, eps, a_now, a_next)
    return x


def ddim_times(steps: int, spacing: str = "trailing") -> torch.Tensor:
    """steps + 1 descending t values (float64) ending in 0. trailing: (steps - i)/steps, from t = 1 (Lin et al.
    2024); normal: ComfyUI's `normal` scheduler for SD, timesteps linspace(999, 0) as t = (timestep + 1)/1000;
    leading: SD's default DDIM grid, timesteps k*(1000//steps) + 1."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if spacing == "trailing":
        t = torch.arange(steps, 0, -1, dtype=torch.float64) / steps
    elif spacing == "normal":
        t = (torch.linspace(999, 0, steps, dtype=torch.float64) if steps > 1 else torch.tensor([999.0]).double()) + 1
        t = t / NUM_TRAIN_TIMESTEPS
    elif spacing == "leading":
        t = (torch.arange(steps - 1, -1, -1, dtype=torch.float64) * (NUM_TRAIN_TIMESTEPS // steps) + 2) / 1000
    else:
        raise ValueError(f"spacing must be one of {', '.join(SPACINGS)}; got {spacing!r}")
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


FLOW_SAMPLERS = ("euler", "heun")


def flow_euler_step(x: torch.Tensor, v: torch.Tensor, s_now: torch.Tensor, s_next: torch.Tensor) -> torch.Tensor:
    """Euler step of the flow ODE dx/ds = v (rectified flow; SD3 arXiv 2403.03206 Sec. 2): x + (s' - s) v."""
    return x + (s_next - s_now) * v


@torch.no_grad()
def flow_ode_solve(
    velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    sampler: str = "euler",
) -> torch.Tensor:
    """Integrate dx/ds = velocity_fn(x, s per item [B]) from x at sigmas[0] through sigmas [N+1] (one schedule) or
    [N+1, B] (one per item). euler: flow_euler_step; heun: Heun's 2nd order (Karras et al. 2022, Alg. 1), corrected
    on every step but one ending at s = 0, where the velocity eps - x0 is not predictable: 2N - 1 evaluations."""
    if sampler not in FLOW_SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(FLOW_SAMPLERS)}; got {sampler!r}")
    sigmas = sigmas.to(x.device, torch.float32)
    sigmas = sigmas[:, None].expand(-1, len(x)) if sigmas.ndim == 1 else sigmas
    for s_now, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        v = velocity_fn(x, s_now).to(x.dtype)
        x_next = flow_euler_step(x, v, per_item(s_now, x), per_item(s_next, x))
        if sampler == "heun" and bool((s_next > 0).all()):
            v_next = velocity_fn(x_next, s_next).to(x.dtype)
            x_next = flow_euler_step(x, (v + v_next) / 2, per_item(s_now, x), per_item(s_next, x))
        x = x_next
    return x


@torch.no_grad()
def solve_teacher_flow(
    teacher_velocity: EpsFn,
    z_s: torch.Tensor,
    s_s: torch.Tensor,
    s_e: torch.Tensor,
    steps: int,
    cond: Cond,
    cfg: float = 1.0,
    null_cond: Cond | None = None,
) -> torch.Tensor:
    """A flow teacher's own ODE from s_s to s_e (per item, [B]) in `steps` equal Euler steps in sigma, guidance on
    the velocity (PeRFlow Alg. 1 with the base's solver)."""
    if cfg != 1.0 and null_cond is None:
        raise ValueError("classifier-free guidance (cfg != 1) needs null_cond")
    frac = torch.arange(steps + 1, dtype=torch.float64, device=s_s.device)[:, None] / steps
    sigmas = s_s.double()[None] + (s_e.double() - s_s.double())[None] * frac
    return flow_ode_solve(lambda x, s: guided_eps(teacher_velocity, x, s, cond, null_cond, cfg), z_s, sigmas)


def shifted_sigmas(steps: int, shift: float) -> torch.Tensor:
    """steps + 1 sigmas shift(1 - i/steps), i = 0..steps: a flow model's own schedule (SD3's time shift over
    evenly spaced times, as ComfyUI's simple scheduler for SD3 and Flux up to its 1000-entry table)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return time_shift(torch.arange(steps, -1, -1, dtype=torch.float64) / steps, shift).float()


SAMPLERS = ("ddim", "dpmpp_2m")


@torch.no_grad()
def ode_solve(
    eps_fn: Callable[[torch.Tensor, float], torch.Tensor],
    noise: torch.Tensor,
    steps: int,
    sampler: str = "ddim",
    spacing: str = "trailing",
    alphas_cumprod: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample `eps_fn(x, t) -> eps` (t a float, guidance already applied) from x = noise at the first time of
    `ddim_times` down to t = 0 with `ddim` (ddim_step) or `dpmpp_2m`: returns x0."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {sampler!r}")
    times = ddim_times(steps, spacing)
    abar = alpha_bar(times, sd_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod)
    if sampler == "dpmpp_2m":
        return _dpmpp_2m(eps_fn, noise, times, abar)
    x, abar = noise, abar.float()
    for i in range(steps):
        x = ddim_step(x, eps_fn(x, float(times[i])), abar[i].to(x), abar[i + 1].to(x))
    return x


def _dpmpp_2m(eps_fn, x: torch.Tensor, times: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, multistep 2nd order in data prediction), VP form with lambda = log(a/s):
    x' = (s'/s) x - a' expm1(-h) D, D = x0 first, then (1 + 1/2r) x0 - (1/2r) x0_prev; the last step to t = 0
    returns x0."""
    x0_prev, h_prev = None, None
    for i in range(len(times) - 1):
        alpha, sigma = abar[i].sqrt(), (1 - abar[i]).sqrt()
        x0 = (x - sigma.to(x) * eps_fn(x, float(times[i]))) / alpha.to(x)
        if abar[i + 1] >= 1.0:
            return x0
        alpha_n, sigma_n = abar[i + 1].sqrt(), (1 - abar[i + 1]).sqrt()
        h = torch.log(alpha_n / sigma_n) - torch.log(alpha / sigma)
        d = x0 if x0_prev is None else (1 + 0.5 * h / h_prev).to(x) * x0 - (0.5 * h / h_prev).to(x) * x0_prev
        x = (sigma_n / sigma).to(x) * x - (alpha_n * torch.expm1(-h)).to(x) * d
        x0_prev, h_prev = x0, h
    return x


@torch.no_grad()
def perflow_solve(
    eps_fn: EpsFn,
    noise: torch.Tensor,
    cond: Cond,
    null_cond: Cond,
    cfg: float | Callable[[torch.Tensor], float],
    parameterization: str,
    num_windows: int,
    alphas_cumprod: torch.Tensor | None = None,
    steps: int = 4,
) -> torch.Tensor:
    """PeRFlow sampling of a student eps_fn(x, t, cond) through PeRFlowModelSampling and sample_perflow, as ComfyUI
    runs it; guidance d_u + cfg (d_c - d_u) on the x0 estimates, as ComfyUI's CFG. `cfg` may be a function of the
    current t (per-window CFG schedules)."""
    ms = PeRFlowModelSampling(parameterization, num_windows, alphas_cumprod).to(noise.device)

    def denoised(x, s, c):
        return ms.calculate_denoised(s, eps_fn(ms.calculate_input(s, x), s, c).float(), x)

    def model(x, s):
        scale = cfg(s) if callable(cfg) else cfg
        d_c = denoised(x, s, cond)
        if scale == 1.0:
            return d_c
        d_u = denoised(x, s, null_cond)
        return d_u + scale * (d_c - d_u)

    sigmas = perflow_sigmas(steps, num_windows).to(noise.device)
    x = ms.noise_scaling(sigmas[0], noise, torch.zeros_like(noise), max_denoise=True)
    return sample_perflow(model, x, sigmas, disable=True)
