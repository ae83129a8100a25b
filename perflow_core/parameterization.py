"""The three PeRFlow parameterizations: how a network output becomes the straight-line velocity in a window."""

import torch

from .schedule import alphas_cumprod_at
from .windows import time_windows, window_index

PARAMETERIZATIONS = ("diff_eps", "ddim_eps", "velocity")


def check_parameterization(parameterization: str) -> None:
    """Raise a clear error for an unknown parameterization name."""
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(
            f"unknown PeRFlow parameterization {parameterization!r}; use one of {', '.join(PARAMETERIZATIONS)}"
        )


def window_table(parameterization: str, alphas_cumprod: torch.Tensor, num_windows: int) -> torch.Tensor:
    """Per window (noisiest first): [t_start, t_end, lambda_s, eta_s], where the window-end point predicted from
    the window start is x_e = lambda_s * x_s + eta_s * eps (SP step). Shape (K, 4), float32."""
    check_parameterization(parameterization)
    starts, ends = time_windows(num_windows)
    t_s, t_e = torch.tensor(starts), torch.tensor(ends)
    ac_s, ac_e = alphas_cumprod_at(alphas_cumprod.float(), t_s), alphas_cumprod_at(alphas_cumprod.float(), t_e)
    if parameterization == "ddim_eps":  # DDIM jump t_s -> t_e with eps held fixed
        lambda_s = (ac_e / ac_s) ** 0.5
        eta_s = (1 - ac_e) ** 0.5 - (ac_e / ac_s * (1 - ac_s)) ** 0.5
    elif parameterization == "diff_eps":  # gamma = sqrt(ac_s / ac_e); x_e = (x_s - sqrt(1 - gamma^2) eps) / gamma
        gamma = (ac_s / ac_e) ** 0.5
        lambda_s = 1 / gamma
        eta_s = -((1 - gamma**2) ** 0.5) / gamma
    else:  # velocity: the network predicts v itself; the table only carries the windows
        lambda_s, eta_s = torch.ones_like(t_s), torch.zeros_like(t_s)
    return torch.stack([t_s, t_e, lambda_s, eta_s], dim=1)


def _per_item(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a [B] (or scalar) tensor to broadcast against a [B, ...] tensor."""
    return values.reshape(values.shape[:1] + (1,) * (like.ndim - 1)) if values.ndim else values


def velocity_from_table(
    table: torch.Tensor, parameterization: str, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """Straight-line velocity at (x, t), one t per batch item (or one for all).

    SP step: x_e = lambda_t x + eta_t eps with lambda_t = lambda_s (t_e - t_s) / D, eta_t = eta_s (t_e - t) / D,
    D = lambda_s (t - t_s) + t_e - t, and v = (x_e - x) / (t_e - t); which simplifies to
    v = ((lambda_s - 1) x + eta_s eps) / D.
    """
    if parameterization == "velocity":  # SD 2.1 PeRFlow predicts the velocity itself
        return model_output
    t = _per_item(torch.as_tensor(t, device=x.device).float(), x)  # window math in float32, as published
    t_s, t_e, lambda_s, eta_s = table.to(x.device)[window_index(t, table.shape[0])].unbind(-1)
    inv_d = 1 / (lambda_s * (t - t_s) + (t_e - t))
    return torch.addcmul(x * ((lambda_s - 1) * inv_d).to(x.dtype), model_output, (eta_s * inv_d).to(x.dtype))


def velocity(
    parameterization: str,
    model_output: torch.Tensor,
    x: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    num_windows: int,
) -> torch.Tensor:
    """Straight-line velocity dx/dt of a PeRFlow model output at (x, t)."""
    table = window_table(parameterization, alphas_cumprod, num_windows)
    return velocity_from_table(table, parameterization, model_output, x, t)


def window_end_coefficients(
    parameterization: str, t: torch.Tensor, alphas_cumprod: torch.Tensor, num_windows: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lambda_t, eta_t, t_end): the window-end prediction from (x, t) is lambda_t x + eta_t eps (SP step)."""
    table = window_table(parameterization, alphas_cumprod, num_windows).to(t.device, t.dtype)
    t_s, t_e, lambda_s, eta_s = table[window_index(t, num_windows)].unbind(-1)
    d = lambda_s * (t - t_s) + (t_e - t)
    return lambda_s * (t_e - t_s) / d, eta_s * (t_e - t) / d, t_e


def epsilon_for_window_end(
    parameterization: str,
    window_end: torch.Tensor,
    x: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    num_windows: int,
) -> torch.Tensor:
    """The eps that makes one step from (x, t) land exactly on `window_end` (the eps-parameterized target)."""
    t = _per_item(torch.as_tensor(t, dtype=x.dtype, device=x.device), x)
    lambda_t, eta_t, _ = window_end_coefficients(parameterization, t, alphas_cumprod, num_windows)
    return (window_end - lambda_t * x) / eta_t
