"""Start latents: the point on PeRFlow's straight segment at time t, for text-to-image, img2img and inpainting."""

import torch

from .schedule import alphas_cumprod_at
from .windows import window_of


def marginal(latent: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """DDPM marginal sqrt(ac) x0 + sqrt(1 - ac) eps at t, with ac = alphas_cumprod[t*1000 - 1] (SP add_noise)."""
    ac = alphas_cumprod_at(alphas_cumprod, t)
    return ac**0.5 * latent + (1 - ac) ** 0.5 * noise


def straight_line_latent(
    latent: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, num_windows: int
) -> torch.Tensor:
    """x_t on the window's straight segment: the marginal at a window start, and strictly inside a window
    the linear mix of the marginals at its two ends with the same noise (PeRFlow, Sec. 3: z_t interpolates z_s, z_e).
    t has one value for all or one per batch item; t = 0 returns the latent itself."""
    t = torch.as_tensor(t, dtype=latent.dtype, device=latent.device)
    t = t.reshape(t.shape[:1] + (1,) * (latent.ndim - 1)) if t.ndim else t
    t_s, t_e = window_of(t, num_windows)
    z_s = marginal(latent, noise, t_s, alphas_cumprod)
    z_e = marginal(latent, noise, t_e, alphas_cumprod)
    z_t = z_s + (t - t_s) / (t_e - t_s) * (z_e - z_s)
    return torch.where(t > 0, z_t, latent)
