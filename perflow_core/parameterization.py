"""The three PeRFlow parameterizations: how a network output becomes the straight-line velocity in a window."""

import torch

from .schedule import alphas_cumprod_at
from .windows import window_of

PARAMETERIZATIONS = ("diff_eps", "ddim_eps", "velocity")


def check_parameterization(parameterization: str) -> None:
    """Raise a clear error for an unknown parameterization name."""
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(
            f"unknown PeRFlow parameterization {parameterization!r}; use one of {', '.join(PARAMETERIZATIONS)}"
        )


def window_end_coefficients(
    parameterization: str, t: torch.Tensor, alphas_cumprod: torch.Tensor, num_windows: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lambda_t, eta_t, t_end) such that the window-end prediction is lambda_t * x_t + eta_t * eps (SP step)."""
    t_s, t_e = window_of(t, num_windows)
    ac_s, ac_e = alphas_cumprod_at(alphas_cumprod, t_s), alphas_cumprod_at(alphas_cumprod, t_e)
    if parameterization == "ddim_eps":  # DDIM jump from t_s to t_e: x_e = lambda_s x_s + eta_s eps
        lambda_s = (ac_e / ac_s) ** 0.5
        eta_s = (1 - ac_e) ** 0.5 - (ac_e / ac_s * (1 - ac_s)) ** 0.5
    elif parameterization == "diff_eps":  # gamma = sqrt(ac_s / ac_e); x_e = (x_s - sqrt(1 - gamma^2) eps) / gamma
        gamma = (ac_s / ac_e) ** 0.5
        lambda_s = 1 / gamma
        eta_s = -((1 - gamma**2) ** 0.5) / gamma
    else:
        raise ValueError(f"{parameterization!r} has no window-end coefficients; use diff_eps or ddim_eps")
    # Move the start-point coefficients to time t on the straight segment (SP step: lambda_t, eta_t).
    denom = lambda_s * (t - t_s) + (t_e - t)
    return lambda_s * (t_e - t_s) / denom, eta_s * (t_e - t) / denom, t_e


def velocity(
    parameterization: str,
    model_output: torch.Tensor,
    x: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    num_windows: int,
) -> torch.Tensor:
    """Straight-line velocity dx/dt at (x, t); t has one value per batch item (or one for all)."""
    if parameterization == "velocity":  # SD 2.1 PeRFlow predicts the velocity itself
        return model_output
    t = t.reshape(t.shape[:1] + (1,) * (x.ndim - 1)) if t.ndim else t
    lambda_t, eta_t, t_e = window_end_coefficients(parameterization, t, alphas_cumprod, num_windows)
    window_end = lambda_t * x + eta_t * model_output
    return (window_end - x) / (t_e - t)  # v = (x_{t_e} - x_t) / (t_e - t)


def epsilon_for_window_end(
    parameterization: str,
    window_end: torch.Tensor,
    x: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    num_windows: int,
) -> torch.Tensor:
    """The eps that `velocity` turns into a step landing exactly on `window_end` (the training target)."""
    t = t.reshape(t.shape[:1] + (1,) * (x.ndim - 1)) if t.ndim else t
    lambda_t, eta_t, _ = window_end_coefficients(parameterization, t, alphas_cumprod, num_windows)
    return (window_end - lambda_t * x) / eta_t
