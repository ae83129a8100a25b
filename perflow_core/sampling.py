"""The PeRFlow sampler, written to k-diffusion's sampler contract so ComfyUI's KSAMPLER can drive it."""

import torch
from tqdm.auto import trange


def check_sigmas(sigmas: torch.Tensor) -> None:
    """A PeRFlow schedule is a 1-D list of times t in [0, 1], strictly decreasing (every step moves): else
    ValueError, since a repeated t divides by zero and a t outside [0, 1] leaves the model's time range."""
    s = torch.as_tensor(sigmas).detach().to("cpu", torch.float64)
    if s.ndim != 1:
        raise ValueError(f"sigmas must be a 1-D schedule, got shape {tuple(s.shape)}")
    if s.numel() and not (torch.isfinite(s).all() and s.min() >= 0 and s.max() <= 1):
        raise ValueError(f"PeRFlow sigmas are times t in [0, 1] (1 = noise); got {_shown(s)}")
    if s.numel() > 1 and not (s[1:] < s[:-1]).all():
        raise ValueError(
            f"PeRFlow sigmas must be strictly decreasing (a repeated value is a zero-length step); got {_shown(s)}. "
            "Use the PeRFlow Scheduler node or the 'perflow' scheduler"
        )


def _shown(s: torch.Tensor) -> str:
    values = ", ".join(f"{v:g}" for v in s[:8].tolist())
    return f"[{values}{', ...' if s.numel() > 8 else ''}] ({s.numel()} values)"


@torch.no_grad()
def sample_perflow(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """One Euler step per schedule entry along PeRFlow's straight segments: x <- x + (t_next - t) v (SP step).

    `model(x, t)` returns the x0 estimate x - t*v of a PeRFlow model sampling; the callback gets it as `denoised`.
    With v = (x - denoised) / t the step is the interpolation x <- lerp(x, denoised, (t - t_next) / t).
    """
    check_sigmas(sigmas)
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = torch.lerp(x, denoised, (sigmas[i] - sigmas[i + 1]) / sigmas[i])
    return x
