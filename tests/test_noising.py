"""img2img start latents: the point on PeRFlow's straight segment at the start time."""

import torch

from perflow_core.model_sampling import PeRFlowModelSampling
from perflow_core.noising import straight_line_latent
from perflow_core.schedule import sd_alphas_cumprod


def ddpm_marginal(x0, noise, t):
    ac = float(sd_alphas_cumprod()[max(round(t * 1000) - 1, 0)])
    return ac**0.5 * x0 + (1 - ac) ** 0.5 * noise


def test_window_start_is_the_noised_marginal():
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for t in (0.75, 0.5, 0.25):
        z = straight_line_latent(x0, noise, torch.tensor(t), sd_alphas_cumprod(), 4)
        torch.testing.assert_close(z, ddpm_marginal(x0, noise, t))


def test_inside_a_window_is_the_mix_of_its_end_marginals():
    x0, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    z = straight_line_latent(x0, noise, torch.tensor(0.4), sd_alphas_cumprod(), 4)  # window [0.5, 0.25], 40% in
    expected = 0.6 * ddpm_marginal(x0, noise, 0.5) + 0.4 * ddpm_marginal(x0, noise, 0.25)
    torch.testing.assert_close(z, expected)


def test_per_item_times_and_clean_end():
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0.5, 0.4, 0.0])
    z = straight_line_latent(x0, noise, t, sd_alphas_cumprod(), 4)
    for i in range(3):
        torch.testing.assert_close(
            z[i : i + 1], straight_line_latent(x0[i : i + 1], noise[i : i + 1], t[i], sd_alphas_cumprod(), 4)
        )
    torch.testing.assert_close(z[2], x0[2])


def test_noise_scaling_full_denoise_is_plain_noise_as_published():
    ms = PeRFlowModelSampling("diff_eps")
    noise, latent = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    assert torch.equal(ms.noise_scaling(ms.sigma_max, noise, latent, max_denoise=True), noise)
    torch.testing.assert_close(ms.noise_scaling(torch.tensor(0.5), noise, latent), ddpm_marginal(latent, noise, 0.5))
