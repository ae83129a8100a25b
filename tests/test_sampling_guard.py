"""The sampling-time guard: PeRFlow's model sampling replaced, or built on AnimateDiff's noise table, is refused."""

import logging

import pytest
import torch

from perflow_core.model_sampling import PeRFlowModelSampling
from perflow_core.sampling_guard import check_perflow_sampling, table_name

HINT = "add a 'PeRFlow Model Sampling' node"


def betas_table(kind: str, start: float, end: float) -> torch.Tensor:
    """alphas_cumprod as ComfyUI's make_beta_schedule builds it ('linear' = scaled-linear, 'sqrt_linear' = linear)."""
    if kind == "linear":
        betas = torch.linspace(start**0.5, end**0.5, 1000, dtype=torch.float64) ** 2
    else:
        betas = torch.linspace(start, end, 1000, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


class StockSampling(torch.nn.Module):
    """A ComfyUI discrete model sampling: only its float32 sigma table, sigma = sqrt((1 - ac) / ac)."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.register_buffer("sigmas", ((1 - alphas_cumprod) / alphas_cumprod).sqrt().float())


def via_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The table as the PeRFlow nodes rebuild it from a stock model sampling (float32 sigmas)."""
    return 1 / (1 + StockSampling(alphas_cumprod).sigmas.double() ** 2)


SD = betas_table("linear", 0.00085, 0.012)
ANIMATEDIFF = {
    "sqrt_linear (AnimateDiff)": betas_table("sqrt_linear", 0.00085, 0.012),
    "linear (AnimateDiff-SDXL)": betas_table("linear", 0.00085, 0.020),
}


def zsnr(ac: torch.Tensor) -> torch.Tensor:
    """Zero-terminal-SNR rescaling (as ComfyUI's ModelSamplingDiscrete zsnr option), kept inside (0, 1)."""
    s = ac.sqrt()
    s0, s1 = s[0].clone(), s[-1].clone()
    s = (s - s1) * s0 / (s0 - s1)
    return (s**2).clamp(min=4.8973451890853435e-08)


def test_tables_are_told_apart_after_a_float32_sigma_round_trip():
    assert table_name(via_sigmas(SD)) == "sd"
    for name, ac in ANIMATEDIFF.items():
        assert table_name(via_sigmas(ac)) == name
    assert table_name(via_sigmas(zsnr(SD))) == "unknown"
    assert table_name(via_sigmas(betas_table("linear", 0.00085, 0.013))) == "unknown"


def test_perflow_on_the_sd_table_passes_silently(caplog):
    ms = PeRFlowModelSampling("diff_eps", 4, via_sigmas(SD))
    with caplog.at_level(logging.WARNING, logger="perflow"):
        assert check_perflow_sampling(ms, HINT) is ms
    assert caplog.records == []


@pytest.mark.parametrize("name", sorted(ANIMATEDIFF))
def test_perflow_on_an_animatediff_table_is_refused_with_the_setting_to_pick(name):
    ms = PeRFlowModelSampling("ddim_eps", 4, via_sigmas(ANIMATEDIFF[name]))
    with pytest.raises(ValueError, match="'use existing'") as e:
        check_perflow_sampling(ms, HINT)
    assert name in str(e.value) and "beta_schedule" in str(e.value)


def test_perflow_on_another_foreign_table_warns_and_names_the_fix(caplog):
    ms = PeRFlowModelSampling("diff_eps", 4, via_sigmas(zsnr(SD)))
    with caplog.at_level(logging.WARNING, logger="perflow"):
        assert check_perflow_sampling(ms, HINT) is ms
    assert len(caplog.records) == 1 and "'use existing'" in caplog.records[0].getMessage()


@pytest.mark.parametrize("name", sorted(ANIMATEDIFF))
def test_a_model_sampling_replaced_by_animatediff_is_refused(name):
    with pytest.raises(ValueError, match="was replaced") as e:
        check_perflow_sampling(StockSampling(ANIMATEDIFF[name]), HINT)
    assert name in str(e.value) and "'use existing'" in str(e.value)


@pytest.mark.parametrize("stock", [StockSampling(SD), StockSampling(zsnr(SD)), object()])
def test_a_model_without_perflow_sampling_names_both_fixes(stock):
    with pytest.raises(ValueError, match="not set up for PeRFlow") as e:
        check_perflow_sampling(stock, HINT)
    assert HINT in str(e.value) and "'use existing'" in str(e.value)
