"""Noise table and PeRFlow step schedules (the published `set_timesteps`, plus ComfyUI's denoise convention)."""

import logging
import math

import numpy as np
import torch

from .flow_windows import flow_sigmas
from .windows import (
    DEFAULT_NUM_WINDOWS,
    NUM_TRAIN_TIMESTEPS,
    check_denoise,
    check_num_windows,
    steps_per_window,
    time_windows,
)

log = logging.getLogger("perflow")


def sd_alphas_cumprod() -> torch.Tensor:
    """Stable Diffusion's table: scaled-linear betas 0.00085..0.012 over 1000 steps, float32 like diffusers."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def alphas_cumprod_at(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Noise level at t: alphas_cumprod[t*1000 - 1], index 0 at t = 0 (SP get_window_alpha)."""
    idx = torch.clamp((t * NUM_TRAIN_TIMESTEPS - 1).long(), min=0)
    return alphas_cumprod.to(t.device)[idx].to(t.dtype)


def _window_tops(num_windows: int) -> list[int]:
    """The first (largest) integer timestep of each window, int(start * 1000) as the published schedule has it."""
    return [int(s * NUM_TRAIN_TIMESTEPS) for s in time_windows(num_windows)[0]]


def _check_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a whole number of at least 1, got {steps!r}")
    return steps


def perflow_timesteps(steps: int, num_windows: int = DEFAULT_NUM_WINDOWS) -> np.ndarray:
    """Integer timesteps of the published `set_timesteps`: per-window linspace, remainder to the noisiest windows,
    truncated by int64 cast (916.67 -> 916); fewer steps than windows are raised to one per window.

    Where the published truncation would repeat a timestep (a zero-length step), every window instead gets its
    steps spread evenly over its own distinct integer timesteps; a window with more steps than timesteps passes
    the surplus to the next ones, and more than 1000 steps are capped to the 1000 that exist. Both are logged."""
    _check_steps(steps)
    tops = _window_tops(num_windows)
    starts, ends = time_windows(num_windows)
    per_window = steps_per_window(steps, num_windows)
    steps = sum(per_window)  # raised to one per window where fewer
    capacity = [top - below for top, below in zip(tops, tops[1:] + [0], strict=True)]
    if all(n <= c for n, c in zip(per_window, capacity, strict=True)):
        t = np.concatenate(
            [np.linspace(s, e, num=n, endpoint=False) for s, e, n in zip(starts, ends, per_window, strict=True)]
        )
        published = (t * NUM_TRAIN_TIMESTEPS).astype(np.int64)
        if np.all(np.diff(published) < 0):
            return published
    requested = steps
    steps = min(steps, NUM_TRAIN_TIMESTEPS)
    surplus = max(0, steps - sum(min(n, c) for n, c in zip(per_window, capacity, strict=True)))
    counts = []
    for n, c in zip(per_window, capacity, strict=True):
        take = min(c, min(n, c) + surplus)
        surplus -= take - min(n, c)
        counts.append(take)
    if requested > NUM_TRAIN_TIMESTEPS:
        log.warning(
            "PeRFlow: %d steps requested but only %d distinct timesteps exist; sampling %d steps.",
            requested,
            NUM_TRAIN_TIMESTEPS,
            steps,
        )
    else:
        log.warning(
            "PeRFlow: %d steps on %d windows would repeat timesteps in the published schedule (zero-length steps); "
            "spreading them over distinct timesteps instead (per window: %s).",
            steps,
            num_windows,
            ", ".join(map(str, counts)),
        )
    return np.concatenate(
        [top - (np.arange(n) * c) // n for top, n, c in zip(tops, counts, capacity, strict=True) if n]
    ).astype(np.int64)


def perflow_sigmas(steps: int, num_windows: int = DEFAULT_NUM_WINDOWS, denoise: float = 1.0) -> torch.Tensor:
    """Strictly decreasing t values ending in 0, starting at 1 for denoise 1. For denoise < 1, ComfyUI's convention:
    schedule int(steps/denoise) steps and keep the last steps+1 values; where that exceeds the 1000 distinct
    timesteps, the timesteps at or below `denoise` are used (logged). denoise 0 gives an empty schedule (nothing
    to do); a denoise below the finest timestep 0.001 is refused."""
    _check_steps(steps)
    check_num_windows(num_windows)
    denoise = check_denoise(denoise)
    if denoise <= 0.0:
        return torch.zeros(0)
    if denoise > 0.9999:
        return _with_final_zero(perflow_timesteps(steps, num_windows))
    total = int(min(steps / denoise, 10**9))
    if total <= NUM_TRAIN_TIMESTEPS:
        return _with_final_zero(perflow_timesteps(total, num_windows))[-(steps + 1) :]
    finest = math.floor(denoise * NUM_TRAIN_TIMESTEPS + 1e-6)
    if finest < 1:
        raise ValueError(
            f"denoise {denoise:g} is below PeRFlow's finest timestep 1/{NUM_TRAIN_TIMESTEPS}: there is nothing to "
            f"denoise; use denoise 0 to skip sampling, or at least {1 / NUM_TRAIN_TIMESTEPS:g}"
        )
    used = min(steps, finest)
    log.warning(
        "PeRFlow: denoise %g at %d steps schedules int(steps/denoise) = %d steps, more than the %d distinct "
        "timesteps; sampling %d steps over the timesteps %g..%g instead.",
        denoise,
        steps,
        total,
        NUM_TRAIN_TIMESTEPS,
        used,
        used / NUM_TRAIN_TIMESTEPS,
        1 / NUM_TRAIN_TIMESTEPS,
    )
    return _with_final_zero(np.arange(used, 0, -1, dtype=np.int64))


def stock_scheduler_sigmas(steps: int, num_windows: int, flow_shift: float | None = None) -> torch.Tensor:
    """The schedule for ComfyUI's own schedulers (KSampler, BasicScheduler), which ask for `steps` values and keep
    only the last steps+1 of them: refuses fewer steps than windows (the cut schedule would not start at t = 1)
    and, for the SD family, more steps than timesteps (the tail would silently drop denoise), naming the fix.
    With flow_shift (a rectified-flow model) the schedule is flow_sigmas over that shift's windows."""
    _check_steps(steps)
    check_num_windows(num_windows)
    if steps < num_windows:
        raise ValueError(
            f"the 'perflow' scheduler needs at least {num_windows} steps for this {num_windows}-window model, got "
            f"{steps} (ComfyUI schedules int(steps/denoise) steps and keeps the last steps+1 values, so fewer would "
            f"not start at t = 1). Set steps to {num_windows} or more, or use the PeRFlow Scheduler node, which "
            f"raises steps to {num_windows} for you"
        )
    if flow_shift is not None:
        return flow_sigmas(steps, num_windows, flow_shift)
    if steps > NUM_TRAIN_TIMESTEPS:
        raise ValueError(
            f"the 'perflow' scheduler got {steps} steps (ComfyUI schedules int(steps/denoise)), more than PeRFlow's "
            f"{NUM_TRAIN_TIMESTEPS} distinct timesteps. Keep steps/denoise at or below {NUM_TRAIN_TIMESTEPS}, or use "
            "the PeRFlow Scheduler node, which caps the schedule to the timesteps that exist and keeps denoise"
        )
    return perflow_sigmas(steps, num_windows)


def _with_final_zero(timesteps: np.ndarray) -> torch.Tensor:
    return torch.cat([torch.from_numpy(timesteps).to(torch.float32) / NUM_TRAIN_TIMESTEPS, torch.zeros(1)])
