"""PeRFlow as a ComfyUI model-sampling object, with sigma := t in [0, 1] (t = 1 is pure noise)."""

import torch

from .flow_windows import time_shift
from .noising import straight_line_latent
from .number_parsing import finite
from .parameterization import check_parameterization, velocity_from_table, window_table
from .schedule import sd_alphas_cumprod
from .windows import DEFAULT_NUM_WINDOWS, NUM_TRAIN_TIMESTEPS, check_num_windows


def check_sigma(sigma: torch.Tensor) -> None:
    """PeRFlow's sigma is the time t in [0, 1]: NaN, below 0 or above 1 is refused (it has no window)."""
    s = torch.as_tensor(sigma).detach()
    lo, hi = (s.item(), s.item()) if s.numel() == 1 else [v.item() for v in torch.aminmax(s.reshape(-1))]
    if not (0.0 <= lo and hi <= 1.0):  # NaN fails every comparison
        raise ValueError(
            f"PeRFlow sigma must be a time t in [0, 1] (1 = noise), got {s.reshape(-1)[:4].tolist()}; use the "
            "'perflow' scheduler or the PeRFlow Scheduler node, not a schedule made for another model"
        )


class PeRFlowModelSampling(torch.nn.Module):
    """ComfyUI's model-sampling protocol for a PeRFlow model.

    The network gets the raw latent and timestep t*1000 (SP scale_model_input is the identity); "denoised" is
    x - t*v, so that (x - denoised)/t is PeRFlow's velocity v and a plain Euler step is the published step.
    Deliberately not ComfyUI's CONST class: samplers branch on that for rectified-flow SDE behaviour.

    Args:
        parameterization: "diff_eps", "ddim_eps" or "velocity".
        num_windows: K, the number of equal time windows.
        alphas_cumprod: the base model's 1000-entry noise table; None means Stable Diffusion's.
    """

    def __init__(
        self, parameterization: str, num_windows: int = DEFAULT_NUM_WINDOWS, alphas_cumprod: torch.Tensor | None = None
    ):
        super().__init__()
        check_parameterization(parameterization)
        check_num_windows(num_windows)
        ac = sd_alphas_cumprod() if alphas_cumprod is None else torch.as_tensor(alphas_cumprod, dtype=torch.float32)
        if ac.shape != (NUM_TRAIN_TIMESTEPS,) or not torch.isfinite(ac).all() or not ((ac > 0) & (ac < 1)).all():
            raise ValueError(
                f"alphas_cumprod must hold {NUM_TRAIN_TIMESTEPS} finite values in (0, 1), got shape {tuple(ac.shape)}"
            )
        if not (ac[1:] < ac[:-1]).all():
            raise ValueError(
                "alphas_cumprod must be strictly decreasing (noise grows with every timestep); this noise table is "
                "not a DDPM schedule PeRFlow can use"
            )
        self.parameterization = parameterization
        self.num_windows = num_windows
        self.sigma_data = 1.0
        self.register_buffer("alphas_cumprod", ac.clone())
        self.register_buffer("window_table", window_table(parameterization, ac, num_windows))
        self.register_buffer(
            "sigmas", torch.arange(1, NUM_TRAIN_TIMESTEPS + 1, dtype=torch.float32) / NUM_TRAIN_TIMESTEPS
        )

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma * NUM_TRAIN_TIMESTEPS  # the network sees t*1000, 1000 at t = 1

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.as_tensor(timestep, dtype=torch.float32) / NUM_TRAIN_TIMESTEPS, 0.0, 1.0)

    def percent_to_sigma(self, percent: float) -> float:
        percent = finite(percent, "percent")
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return 1.0 - percent

    def calculate_input(self, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise

    def calculate_denoised(
        self, sigma: torch.Tensor, model_output: torch.Tensor, model_input: torch.Tensor
    ) -> torch.Tensor:
        check_sigma(sigma)
        v = velocity_from_table(self.window_table, self.parameterization, model_output, model_input, sigma)
        s = sigma.reshape(sigma.shape[:1] + (1,) * (model_input.ndim - 1)) if sigma.ndim else sigma
        return torch.addcmul(model_input, v, -s.to(v.dtype))  # x - t v: straight-line extrapolation to t = 0

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False) -> torch.Tensor:
        check_sigma(sigma)
        if max_denoise:  # text-to-image: the published pipelines start from plain randn (init_noise_sigma = 1)
            return noise
        return straight_line_latent(latent_image, noise, sigma, self.alphas_cumprod, self.num_windows)

    def inverse_noise_scaling(self, sigma, latent) -> torch.Tensor:
        return latent

    def extra_repr(self) -> str:
        return f"parameterization={self.parameterization}, num_windows={self.num_windows}"


# Rectified-flow models (SD3, Flux, ...) keep their own model sampling: x_s = (1 - s) x0 + s eps, the network predicts
# v = eps - x0 at the shifted sigma s, and ComfyUI's Euler step is already PeRFlow's straight step. A PeRFlow flow
# model is that model sampling, copied, with this attribute holding K (the noise definition is untouched).
FLOW_WINDOWS_ATTR = "perflow_num_windows"
_SHIFT_PROBES = (0.1, 0.25, 0.75, 0.9)  # percents at which the shift form is checked
_SHIFT_RTOL = 1e-4


def flow_shift_of(model_sampling) -> float:
    """The time shift of a rectified-flow model sampling in SD3's convention, read from its own percent_to_sigma:
    sigma at unshifted time 0.5 is shift / (1 + shift). ComfyUI's ModelSamplingDiscreteFlow (SD3: its `shift`) and
    ModelSamplingFlux (Flux: exp of its `shift`, which ModelSamplingFlux sets from the resolution) both have this
    form; a model sampling of another form is refused (its windows could not be placed)."""
    half = float(model_sampling.percent_to_sigma(0.5))
    if not 0.0 < half < 1.0:
        raise ValueError(f"{type(model_sampling).__name__} is not a rectified-flow time schedule (sigma(0.5) = {half})")
    shift = half / (1.0 - half)
    for p in _SHIFT_PROBES:
        got, want = float(model_sampling.percent_to_sigma(p)), time_shift(1.0 - p, shift)
        if abs(got - want) > _SHIFT_RTOL * want:
            raise ValueError(
                f"{type(model_sampling).__name__}'s sigmas are not a shifted rectified-flow schedule (at {p:g} of the "
                f"way: {got:g}, the shift form gives {want:g}); PeRFlow supports the SD3 / Flux time shift only"
            )
    return shift


def flow_windows_of(model_sampling) -> int | None:
    """K of a PeRFlow flow model sampling, None for any other model sampling."""
    return getattr(model_sampling, FLOW_WINDOWS_ATTR, None)
