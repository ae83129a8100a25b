"""Noise table and PeRFlow step schedules (the published `set_timesteps`, plus ComfyUI's denoise convention)."""

import logging

import numpy as np
import torch

from .windows import NUM_TRAIN_TIMESTEPS, time_windows

log = logging.getLogger("perflow")


def sd_alphas_cumprod() -> torch.Tensor:
    """Stable Diffusion's table: scaled-linear betas 0.00085..0.012 over 1000 steps, float32 like diffusers."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def alphas_cumprod_at(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Noise level at t: alphas_cumprod[t*1000 - 1], index 0 at t = 0 (SP get_window_alpha)."""
    idx = torch.clamp((t * NUM_TRAIN_TIMESTEPS - 1).long(), min=0)
    return alphas_cumprod.to(t.device)[idx].to(t.dtype)


def perflow_timesteps(steps: int, num_windows: int = 4) -> np.ndarray:
    """Integer timesteps of the published `set_timesteps`: per-window linspace, remainder to the noisiest windows,
    truncated by int64 cast (916.67 -> 916); fewer steps than windows are raised to one per window."""
    starts, ends = time_windows(num_windows)
    if steps < num_windows:
        log.warning(
            "PeRFlow: %d steps is fewer than the %d time windows; using %d steps.", steps, num_windows, num_windows
        )
        steps = num_windows
    per_window = [steps // num_windows + (1 if i < steps % num_windows else 0) for i in range(num_windows)]
    t = np.concatenate(
        [np.linspace(s, e, num=n, endpoint=False) for s, e, n in zip(starts, ends, per_window, strict=True)]
    )
    return (t * NUM_TRAIN_TIMESTEPS).astype(np.int64)


def perflow_sigmas(steps: int, num_windows: int = 4, denoise: float = 1.0) -> torch.Tensor:
    """Descending t values ending in 0. For denoise < 1, ComfyUI's convention: schedule int(steps/denoise) steps
    and keep the last steps+1 values; denoise <= 0 gives an empty schedule (nothing to do)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 0.0 <= denoise <= 1.0:
        raise ValueError(f"denoise must be in [0, 1], got {denoise}")
    if denoise <= 0.0:
        return torch.zeros(0)
    total = steps if denoise > 0.9999 else int(steps / denoise)
    ts = torch.from_numpy(perflow_timesteps(total, num_windows))
    sigmas = torch.cat([ts.to(torch.float32) / NUM_TRAIN_TIMESTEPS, torch.zeros(1)])
    return sigmas if denoise > 0.9999 else sigmas[-(steps + 1) :]
