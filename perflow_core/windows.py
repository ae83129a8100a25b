"""Time windows: PeRFlow cuts t in [0, 1] (t = 1 is noise) into K equal windows, noisiest first."""

import logging
from functools import lru_cache

import torch

from .number_parsing import finite

NUM_TRAIN_TIMESTEPS = 1000
DEFAULT_NUM_WINDOWS = 4  # the published PeRFlow models
MAX_NUM_WINDOWS = 16  # the most windows any node, trainer or delta file accepts
# Published lookup tolerance: (t - 0.1 * precision) <= window_end moves on to the next window (SP Time_Windows).
_LOOKUP_SLACK = 0.1 / NUM_TRAIN_TIMESTEPS


def check_num_windows(num_windows: int) -> int:
    """The one range check for K: an int (not a bool) in 1..MAX_NUM_WINDOWS; returns it, else ValueError."""
    if isinstance(num_windows, bool) or not isinstance(num_windows, int) or not 1 <= num_windows <= MAX_NUM_WINDOWS:
        raise ValueError(
            f"num_windows must be an integer from 1 to {MAX_NUM_WINDOWS} (the published models use "
            f"{DEFAULT_NUM_WINDOWS}), got {num_windows!r}"
        )
    return num_windows


def check_denoise(denoise: float) -> float:
    """denoise as a finite float in [0, 1] (ComfyUI's img2img strength), else ValueError."""
    denoise = finite(denoise, "denoise")
    if not 0.0 <= denoise <= 1.0:
        raise ValueError(f"denoise must be in [0, 1], got {denoise}")
    return denoise


def steps_per_window(steps: int, num_windows: int) -> list[int]:
    """Sampling steps per window, noisiest first: an equal share, the remainder to the noisiest windows (SP
    set_timesteps); fewer steps than windows are raised to one per window (logged on "perflow")."""
    if steps < num_windows:
        logging.getLogger("perflow").warning(
            "PeRFlow: %d steps is fewer than the %d time windows; using %d steps.", steps, num_windows, num_windows
        )
        steps = num_windows
    return [steps // num_windows + (1 if i < steps % num_windows else 0) for i in range(num_windows)]


def time_windows(num_windows: int) -> tuple[list[float], list[float]]:
    """Window starts and ends, e.g. K=4: starts [1, .75, .5, .25], ends [.75, .5, .25, 0] (SP Time_Windows)."""
    check_num_windows(num_windows)
    starts = [1.0 * i / num_windows for i in range(1, num_windows + 1)][::-1]
    return starts, starts[1:] + [0.0]


def window_index(t: torch.Tensor, num_windows: int) -> torch.Tensor:
    """Index of the window holding each t; a boundary t belongs to the window that starts there (t=.75 -> [.75,.5])."""
    t = torch.as_tensor(t)
    inner_ends = _inner_ends(num_windows, t.dtype if t.is_floating_point() else torch.float32, t.device)
    return ((t - _LOOKUP_SLACK).unsqueeze(-1) <= inner_ends).sum(-1)


@lru_cache(maxsize=64)
def _inner_ends(num_windows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Window ends except the final 0, as a tensor (cached: the sampler looks windows up every step)."""
    return torch.tensor(time_windows(num_windows)[1][:-1], dtype=dtype, device=device)


def window_of(t: torch.Tensor, num_windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(t_start, t_end) of the window holding each t, same shape and dtype as t."""
    starts, ends = time_windows(num_windows)
    t = torch.as_tensor(t)
    idx = window_index(t, num_windows)
    dtype = t.dtype if t.is_floating_point() else torch.float32
    return (
        torch.tensor(starts, dtype=dtype, device=t.device)[idx],
        torch.tensor(ends, dtype=dtype, device=t.device)[idx],
    )
