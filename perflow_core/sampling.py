"""The PeRFlow sampler, written to k-diffusion's sampler contract so ComfyUI's KSAMPLER can drive it."""

import torch
from tqdm.auto import trange


@torch.no_grad()
def sample_perflow(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """One Euler step per schedule entry along PeRFlow's straight segments: x <- x + (t_next - t) v (SP step).

    `model(x, t)` returns the x0 estimate x - t*v of a PeRFlow model sampling; the callback gets it as `denoised`.
    With v = (x - denoised) / t the step is the interpolation x <- lerp(x, denoised, (t - t_next) / t).
    """
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = torch.lerp(x, denoised, (sigmas[i] - sigmas[i + 1]) / sigmas[i])
    return x
