"""Model sampling and core objects refuse what cannot be right, with the reason."""

import pytest
import torch

from perflow_core.delta_format import DeltaMetadata
from perflow_core.model_sampling import PeRFlowModelSampling
from perflow_core.schedule import sd_alphas_cumprod
from perflow_core.windows import DEFAULT_NUM_WINDOWS, MAX_NUM_WINDOWS, check_num_windows, time_windows


@pytest.mark.parametrize("bad", [True, False, 0, -1, MAX_NUM_WINDOWS + 1, 1000, 4.0, "4", None])
def test_one_num_windows_check_everywhere(bad):
    with pytest.raises(ValueError, match=f"num_windows must be an integer from 1 to {MAX_NUM_WINDOWS}"):
        check_num_windows(bad)
    with pytest.raises(ValueError, match="num_windows"):
        PeRFlowModelSampling("diff_eps", bad)
    with pytest.raises(ValueError, match="num_windows"):
        time_windows(bad)
    with pytest.raises(ValueError, match="num_windows"):
        DeltaMetadata("diff_eps", bad, "sd15", "ab" * 32)


def test_default_windows_is_the_published_four():
    assert DEFAULT_NUM_WINDOWS == 4 and PeRFlowModelSampling("diff_eps").num_windows == 4
    assert all(check_num_windows(k) == k for k in range(1, MAX_NUM_WINDOWS + 1))


@pytest.mark.parametrize(
    "change",
    [
        lambda ac: ac.flip(0),  # increasing
        lambda ac: torch.cat([ac[:10], ac[9:10], ac[11:]]),  # one repeated value
        lambda ac: torch.where(torch.arange(1000) == 500, ac[400], ac),  # a bump
    ],
)
def test_a_noise_table_that_is_not_strictly_decreasing_is_refused(change):
    with pytest.raises(ValueError, match="strictly decreasing"):
        PeRFlowModelSampling("diff_eps", 4, change(sd_alphas_cumprod()))


@pytest.mark.parametrize("table", [torch.full((1000,), float("nan")), torch.ones(1000), torch.zeros(999)])
def test_a_noise_table_outside_0_1_or_of_the_wrong_length_is_refused(table):
    with pytest.raises(ValueError, match="alphas_cumprod"):
        PeRFlowModelSampling("diff_eps", 4, table)


def test_an_unknown_parameterization_is_refused_at_construction():
    with pytest.raises(ValueError, match="parameterization"):
        PeRFlowModelSampling("eps", 4)


@pytest.mark.parametrize("sigma", [1.5, -0.25, float("nan"), float("inf")])
def test_a_sigma_outside_0_1_or_nan_is_refused(sigma):
    ms = PeRFlowModelSampling("ddim_eps", 4)
    x = torch.zeros(2, 4, 2, 2)
    s = torch.tensor([0.5, sigma])
    with pytest.raises(ValueError, match=r"sigma must be a time t in \[0, 1\]"):
        ms.calculate_denoised(s, x, x)
    with pytest.raises(ValueError, match=r"sigma must be a time t in \[0, 1\]"):
        ms.noise_scaling(torch.tensor(sigma), x, x)
    with pytest.raises(ValueError, match="percent"):
        ms.percent_to_sigma(float("nan"))


def test_valid_sigmas_still_work_at_the_ends():
    ms = PeRFlowModelSampling("ddim_eps", 4)
    x = torch.randn(2, 4, 2, 2)
    assert torch.isfinite(ms.calculate_denoised(torch.tensor([1.0, 0.001]), x, x)).all()
    assert torch.equal(ms.noise_scaling(torch.tensor(0.0), x, x), x)
