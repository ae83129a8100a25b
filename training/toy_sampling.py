"""DDIM and PeRFlow sampling on the project's t convention (any eps function; wrappers for the toy), PNG grid writer.

Convention: t in [0, 1], t = 1 is noise; the network gets timestep t*1000 and the noise level at t is
alphas_cumprod[t*1000 - 1]. At t = 0 we use alpha_cumprod = 1 (diffusers' set_alpha_to_one=True), so the last
DDIM step returns the x0 prediction itself rather than re-noising it to alphas_cumprod[0].
"""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from perflow_core.model_sampling import PeRFlowModelSampling
from perflow_core.sampling import sample_perflow
from perflow_core.schedule import alphas_cumprod_at, perflow_sigmas, sd_alphas_cumprod


def ddim_times(steps: int, spacing: str = "trailing") -> torch.Tensor:
    """steps + 1 descending t values ending in 0: trailing t_i = (steps - i)/steps (starts at t = 1); leading is SD's
    default DDIM grid, timesteps k*(1000//steps) + 1 as t = (timestep + 1)/1000."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if spacing == "trailing":
        t = torch.arange(steps, 0, -1, dtype=torch.float64) / steps
    elif spacing == "leading":
        t = (torch.arange(steps - 1, -1, -1, dtype=torch.float64) * (1000 // steps) + 2) / 1000
    else:
        raise ValueError(f"spacing must be 'trailing' or 'leading', got {spacing!r}")
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


def alpha_bar(t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Noise level at t (float64 t for exact indices), 1 at t = 0."""
    return torch.where(t > 0, alphas_cumprod_at(alphas_cumprod, t).double(), torch.ones_like(t)).float()


def predict_eps(model, x: torch.Tensor, t: float, labels: torch.Tensor, cfg: float) -> torch.Tensor:
    """Model eps at t; with cfg != 1 classifier-free guidance eps_u + cfg*(eps_c - eps_u) (null class = num_classes)."""
    timestep = torch.full((x.shape[0],), t * 1000.0, dtype=x.dtype, device=x.device)
    if cfg == 1.0:
        return model(x, timestep, labels)
    null = torch.full_like(labels, model.num_classes)
    eps_c, eps_u = model(torch.cat([x, x]), torch.cat([timestep, timestep]), torch.cat([labels, null])).chunk(2)
    return eps_u + cfg * (eps_c - eps_u)


@torch.no_grad()
def ddim_solve(
    eps_fn: Callable[[torch.Tensor, float], torch.Tensor],
    noise: torch.Tensor,
    steps: int,
    spacing: str = "trailing",
    alphas_cumprod: torch.Tensor | None = None,
) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) over any eps-prediction `eps_fn(x, t) -> eps` (t a float in [0, 1], guidance
    already applied), from x = noise at the first t of `ddim_times` down to t = 0 (alpha = 1): returns x0."""
    ac = sd_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod
    times = ddim_times(steps, spacing)
    abar = alpha_bar(times, ac)
    x = noise
    for i in range(steps):
        a, a_prev = abar[i].to(x), abar[i + 1].to(x)
        eps = eps_fn(x, float(times[i]))
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()  # DDIM eq. 12: x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps  # x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps
    return x


@torch.no_grad()
def ddim_sample(
    model,
    noise: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    cfg: float = 1.0,
    spacing: str = "trailing",
    alphas_cumprod: torch.Tensor | None = None,
) -> torch.Tensor:
    """DDIM of the toy model (`ddim_solve` with `predict_eps`); returns x0 in about [-1, 1]."""
    return ddim_solve(lambda x, t: predict_eps(model, x, t, labels, cfg), noise, steps, spacing, alphas_cumprod)


@torch.no_grad()
def perflow_solve(
    eps_fn: Callable,
    noise: torch.Tensor,
    cond,
    null_cond,
    cfg: float,
    parameterization: str,
    num_windows: int,
    alphas_cumprod: torch.Tensor | None = None,
    steps: int = 4,
) -> torch.Tensor:
    """PeRFlow sampling of a student eps_fn(x, t, cond) (t in [0, 1] per item) through PeRFlowModelSampling and
    sample_perflow, as ComfyUI runs it; guidance d_u + cfg (d_c - d_u) on the x0 estimates, as ComfyUI's CFG."""
    ms = PeRFlowModelSampling(parameterization, num_windows, alphas_cumprod).to(noise.device)

    def denoised(x, s, c):
        return ms.calculate_denoised(s, eps_fn(ms.calculate_input(s, x), s, c).float(), x)

    def model(x, s):
        d_c = denoised(x, s, cond)
        if cfg == 1.0:
            return d_c
        d_u = denoised(x, s, null_cond)
        return d_u + cfg * (d_c - d_u)

    sigmas = perflow_sigmas(steps, num_windows).to(noise.device)
    x = ms.noise_scaling(sigmas[0], noise, torch.zeros_like(noise), max_denoise=True)
    return sample_perflow(model, x, sigmas, disable=True)


def save_grid(path: str | Path, images: torch.Tensor, nrow: int, pad: int = 2, scale: int = 1) -> None:
    """Write images [N, C, H, W] in [-1, 1] (C = 1 or 3) as a PNG grid, nrow images per row, nearest upscaling."""
    n, c, h, w = images.shape
    if c not in (1, 3):
        raise ValueError(f"save_grid needs 1 or 3 channels, got {c}")
    rows = -(-n // nrow)
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    for k in range(n):
        r, q = divmod(k, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = pixels[k]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)
