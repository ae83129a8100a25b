"""Per-window classifier-free guidance: one guidance scale per PeRFlow time window."""

import torch

from .windows import window_index


def parse_cfg_list(text: str) -> list[float]:
    """'7,5,3,1' -> [7.0, 5.0, 3.0, 1.0]; a single number is a constant schedule."""
    try:
        values = [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError as e:
        raise ValueError(f"CFG list {text!r} is not a comma-separated list of numbers, e.g. '7,5,3,1'") from e
    if not values:
        raise ValueError("CFG list is empty; give one number (constant) or one per window, e.g. '7,5,3,1'")
    if any(not (0.0 <= v <= 100.0) for v in values):
        raise ValueError(f"CFG values must lie in [0, 100], got {values}")
    return values


def window_cfg_scales(values: list[float], num_windows: int) -> list[float]:
    """One scale per window, noisiest first; a shorter list repeats its last value, a longer one is an error."""
    if len(values) > num_windows:
        raise ValueError(f"{len(values)} CFG values for {num_windows} windows; give at most one per window")
    return values + [values[-1]] * (num_windows - len(values))


def ramp_cfg_scales(start: float, end: float, num_windows: int) -> list[float]:
    """Linear ramp from `start` in the first (noisiest) window to `end` in the last."""
    if num_windows == 1:
        return [start]
    return [start + (end - start) * i / (num_windows - 1) for i in range(num_windows)]


def cfg_at(scales: list[float], t: torch.Tensor) -> float:
    """The guidance scale for time t (the noisiest t of a batch), taken from the window that holds it."""
    return scales[int(window_index(torch.as_tensor(t).max(), len(scales)))]
