"""PeRFlow windows and sampling schedules for flow-matching models (SD3, SD3.5, Flux): x_s = (1 - s) x0 + s eps.

A flow model's sigma s runs from 1 (noise) to 0 (data); samplers place their steps at s = shift(t) for t spread
evenly in [0, 1], with SD3's time shift s = shift * t / (1 + (shift - 1) * t) (arXiv 2403.03206, Eq. 23; Flux's
exp(mu) shift with sigma exponent 1 is the same map with shift = e^mu). PeRFlow cuts the time into K equal windows
(arXiv 2405.07510, Sec. 3). Here they are equal in the SHIFTED sigma: window k spans sigma in [1 - k/K,
1 - (k + 1)/K] whatever the shift; the shift only spreads the steps inside each window (evenly in the unshifted
time t, as the model's own sampler spreads them) and the trainer's timepoints.

Why sigma, not t (measured on the toy flow teacher, 500 paired samples, cfg 1, 600 training steps each, shift 3
like SD3): PeRFlow K=4 at 4 steps reached paired MSE 0.00243 to teacher Euler-100 with windows equal in sigma
against 0.00573 with windows equal in t (0.11x and 0.27x teacher Euler-4's 0.02157), at 8 steps 0.00112 against
0.00274. Windows equal in t put the boundaries at sigma 1, .9, .75, .5, 0 under shift 3, so the last window spans
half the sigma range, where the trajectories bend most. Most of the gap is the schedule: the untrained teacher's
Euler on the same 4 sigmas gives 0.00804 (sigma windows) against 0.02157 (t windows = its own shift-3 Euler-4), and
training gains about 3.5x on either. The toy is 16x16 and samples best at shift 1 (where the two readings coincide:
PeRFlow-4 0.00261), so this shows robustness to a shift that does not suit the model, not what suits SD3 at 1024 px
(unmeasured); sigma windows also keep a trained file's windows independent of Flux's resolution-dependent shift.
"""

import numpy as np
import torch

from .number_parsing import finite
from .windows import check_denoise, check_num_windows, steps_per_window

MAX_FLOW_STEPS = 1000  # the most sampling steps a flow schedule accepts (ComfyUI's flow samplings have 1000 sigmas)
MIN_FLOW_SHIFT, MAX_FLOW_SHIFT = 0.01, 100.0  # SD3 uses 3, Flux e^mu ~1.2..3.2, video models up to ~17
_MAX_DENOISE_TOTAL = 10**6  # int(steps/denoise) beyond this: denoise too small to resolve
_RELATIVE_SLACK = 1e-6  # a sigma within this relative distance above a boundary belongs to the window below it


def check_flow_shift(shift: float) -> float:
    """The one range check for a flow shift: a finite number in [0.01, 100]; returns it as float, else ValueError."""
    shift = finite(shift, "flow shift")
    if not MIN_FLOW_SHIFT <= shift <= MAX_FLOW_SHIFT:
        raise ValueError(
            f"flow shift must be from {MIN_FLOW_SHIFT:g} to {MAX_FLOW_SHIFT:g} (1 = no shift; SD3 uses 3), "
            f"got {shift!r}"
        )
    return shift


def time_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """sigma = shift * t / (1 + (shift - 1) * t), SD3's time shift (arXiv 2403.03206, Eq. 23); t in [0, 1]."""
    return shift * t / (1 + (shift - 1) * t)


def time_unshift(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """The inverse of time_shift: t = sigma / (shift - (shift - 1) * sigma)."""
    return sigma / (shift - (shift - 1) * sigma)


def _window_bounds(num_windows: int) -> np.ndarray:
    """K + 1 window boundaries in sigma 1, 1 - 1/K, ..., 0 (float64, PeRFlow Sec. 3 equal windows)."""
    return np.arange(num_windows, -1, -1, dtype=np.float64) / num_windows


def flow_window_sigmas(num_windows: int, shift: float) -> torch.Tensor:
    """K + 1 window boundaries in sigma, 1.0 ... 0.0, noisiest first (PeRFlow Sec. 3, windows equal in sigma: the
    same for every shift, which is checked all the same)."""
    check_num_windows(num_windows)
    check_flow_shift(shift)
    return torch.from_numpy(_window_bounds(num_windows)).to(torch.float32)


def _schedule_sigmas(steps: int, num_windows: int, shift: float) -> np.ndarray:
    """steps sigmas (float64): each window's share of the steps spread evenly in the unshifted time from the
    window's start (endpoint excluded), then shifted, the window start kept exact; the remainder to the noisiest
    windows, as the published set_timesteps spreads them; fewer steps than windows are raised to one per window
    (logged)."""
    bounds = _window_bounds(num_windows)
    times = time_unshift(bounds, shift)
    per_window = steps_per_window(steps, num_windows)
    windows = []
    for i, n in enumerate(per_window):
        sigmas = time_shift(np.linspace(times[i], times[i + 1], num=n, endpoint=False), shift)
        sigmas[0] = bounds[i]
        windows.append(sigmas)
    return np.concatenate(windows)


def _check_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_FLOW_STEPS:
        raise ValueError(f"steps must be a whole number from 1 to {MAX_FLOW_STEPS}, got {steps!r}")
    return steps


def flow_sigmas(steps: int, num_windows: int, shift: float, denoise: float = 1.0) -> torch.Tensor:
    """The PeRFlow sampling schedule of a flow model: strictly decreasing sigmas ending in 0, every window boundary
    among them, steps spread over the windows as the published schedule does (PeRFlow Sec. 3) and inside each
    window by the shift.
    denoise < 1 follows ComfyUI's convention, as perflow_sigmas does for SD: schedule int(steps/denoise) steps and
    keep the last steps + 1 values; img2img then starts on the model's own straight line at the first sigma.
    denoise 0 gives an empty schedule (nothing to do)."""
    _check_steps(steps)
    check_num_windows(num_windows)
    shift = check_flow_shift(shift)
    denoise = check_denoise(denoise)
    if denoise <= 0.0:
        return torch.zeros(0)
    if denoise > 0.9999:
        return torch.from_numpy(np.append(_schedule_sigmas(steps, num_windows, shift), 0.0)).float()
    total = int(min(steps / denoise, 10**12))
    if total > _MAX_DENOISE_TOTAL:
        raise ValueError(
            f"denoise {denoise:g} at {steps} steps is too small to schedule (int(steps/denoise) = {total} steps, more "
            f"than {_MAX_DENOISE_TOTAL}); use a denoise of at least {steps / _MAX_DENOISE_TOTAL:g}, or 0 to skip"
        )
    return torch.from_numpy(np.append(_schedule_sigmas(total, num_windows, shift), 0.0)[-(steps + 1) :]).float()


def flow_window_index(sigma: torch.Tensor, num_windows: int, shift: float) -> torch.Tensor:
    """Index of the window holding each sigma; a boundary belongs to the window that starts there (as the SD
    window_index), with a relative slack of 1e-6 for sigmas computed in another precision."""
    sigma = torch.as_tensor(sigma)
    inner = flow_window_sigmas(num_windows, shift)[1:-1].to(sigma.device, torch.float64)
    return (sigma.to(torch.float64).unsqueeze(-1) <= inner * (1 + _RELATIVE_SLACK)).sum(-1)


def window_of_sigma(sigma: torch.Tensor, num_windows: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma_start, sigma_end) of the window holding each sigma, same shape and dtype as sigma."""
    sigma = torch.as_tensor(sigma)
    dtype = sigma.dtype if sigma.is_floating_point() else torch.float32
    bounds = flow_window_sigmas(num_windows, shift).to(sigma.device, dtype)
    idx = flow_window_index(sigma, num_windows, shift)
    return bounds[idx], bounds[idx + 1]
