"""Time windows: PeRFlow cuts t in [0, 1] (t = 1 is noise) into K equal windows, noisiest first."""

from functools import lru_cache

import torch

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
