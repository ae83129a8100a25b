"""Per-window classifier-free guidance: one guidance scale per PeRFlow time window."""

import torch

from .flow_windows import flow_window_index
from .number_parsing import finite, parse_float
from .windows import check_num_windows, window_index

MAX_CFG = 100.0


def check_cfg(value: float, what: str = "CFG scale") -> float:
    """A guidance scale: a finite number in [0, MAX_CFG]; ValueError otherwise."""
    value = finite(value, what)
    if not 0.0 <= value <= MAX_CFG:
        raise ValueError(f"{what} must lie in [0, {MAX_CFG:g}], got {value:g}")
    return value


def parse_cfg_list(text: str) -> list[float]:
    """'7,5,3,1' -> [7.0, 5.0, 3.0, 1.0] (',' or ';' between values, spaces around them allowed); one number is a
    constant schedule. Each value is plain ASCII decimal notation in [0, 100]; ValueError quotes the text."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"CFG list {text!r} is empty; give one number (constant) or one per window, e.g. '7,5,3,1'")
    items = [v.strip(" \t") for v in text.replace(";", ",").split(",")]
    if "" in items:
        raise ValueError(f"CFG list {text!r} has an empty entry (two commas in a row, or one at an end)")
    try:
        return [check_cfg(parse_float(v, "a CFG value")) for v in items]
    except ValueError as e:
        raise ValueError(f"CFG list {text!r}: {e}; write e.g. '7,5,3,1'") from None


def window_cfg_scales(values: list[float], num_windows: int) -> list[float]:
    """One scale per window, noisiest first; a shorter list repeats its last value, a longer one is an error."""
    values = [check_cfg(v) for v in values]
    if not values:
        raise ValueError("no CFG values; give one number (constant) or one per window, e.g. '7,5,3,1'")
    if len(values) > num_windows:
        raise ValueError(f"{len(values)} CFG values for {num_windows} windows; give at most one per window")
    return values + [values[-1]] * (num_windows - len(values))


def ramp_cfg_scales(start: float, end: float, num_windows: int) -> list[float]:
    """Linear ramp from `start` in the first (noisiest) window to `end` in the last; both finite, in [0, 100]."""
    start, end = check_cfg(start, "ramp_start"), check_cfg(end, "ramp_end")
    check_num_windows(num_windows)
    if num_windows == 1:
        return [start]
    return [start + (end - start) * i / (num_windows - 1) for i in range(num_windows)]


def cfg_at(scales: list[float], t: torch.Tensor, flow_shift: float | None = None) -> float:
    """The guidance scale for time t (the noisiest t of a batch), taken from the window that holds it; with
    flow_shift, t is a rectified-flow model's sigma and the windows are flow_window_sigmas(K, flow_shift)."""
    t = torch.as_tensor(t).max()
    if flow_shift is None:
        return scales[int(window_index(t, len(scales)))]
    return scales[int(flow_window_index(t, len(scales), flow_shift))]
