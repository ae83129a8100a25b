"""The flow-model branches of the sampling core, without ComfyUI: the shift read from a model sampling's own
sigmas, the marked model sampling the guard accepts, the stock-scheduler schedule and the CFG window lookup."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from perflow_core.cfg_schedule import cfg_at
from perflow_core.flow_windows import flow_sigmas, flow_window_sigmas
from perflow_core.model_sampling import FLOW_WINDOWS_ATTR, flow_shift_of, flow_windows_of
from perflow_core.sampling_guard import check_perflow_sampling, perflow_windows
from perflow_core.schedule import stock_scheduler_sigmas

HINT = "add a PeRFlow node"


class DiscreteFlowLike:
    """percent_to_sigma as ComfyUI's ModelSamplingDiscreteFlow computes it (SD3: shift alpha)."""

    def __init__(self, shift):
        self.shift = shift

    def percent_to_sigma(self, p):
        t = 1.0 - p
        return self.shift * t / (1 + (self.shift - 1) * t)


class FluxLike:
    """percent_to_sigma as ComfyUI's ModelSamplingFlux computes it (mu = its shift, sigma exponent 1)."""

    def __init__(self, mu):
        self.shift = mu

    def percent_to_sigma(self, p):
        t = 1.0 - p
        return math.exp(self.shift) / (math.exp(self.shift) + (1 / t - 1))


class CosineLike:
    """A flow-like schedule that is not a time shift (sigma = sin(pi t / 2))."""

    def percent_to_sigma(self, p):
        return math.sin(math.pi * (1.0 - p) / 2)


@settings(max_examples=50, deadline=None)
@given(st.floats(0.05, 50.0))
def test_shift_is_read_from_an_sd3_model_sampling(shift):
    assert flow_shift_of(DiscreteFlowLike(shift)) == pytest.approx(shift, rel=1e-9)


@settings(max_examples=50, deadline=None)
@given(st.floats(-2.0, 3.5))
def test_flux_shift_is_exp_mu(mu):
    assert flow_shift_of(FluxLike(mu)) == pytest.approx(math.exp(mu), rel=1e-9)


def test_a_schedule_that_is_not_a_time_shift_is_refused():
    with pytest.raises(ValueError, match="not a shifted rectified-flow schedule"):
        flow_shift_of(CosineLike())


def marked(ms, k):
    setattr(ms, FLOW_WINDOWS_ATTR, k)
    return ms


def test_the_guard_accepts_a_marked_flow_model_sampling_and_reports_its_windows():
    ms = marked(DiscreteFlowLike(3.0), 4)
    assert check_perflow_sampling(ms, HINT) is ms
    k, shift = perflow_windows(ms, HINT)
    assert k == 4 and shift == pytest.approx(3.0)
    assert flow_windows_of(DiscreteFlowLike(3.0)) is None


def test_the_guard_refuses_an_unmarked_flow_model_sampling():
    with pytest.raises(ValueError, match=HINT):
        check_perflow_sampling(DiscreteFlowLike(3.0), HINT)


@pytest.mark.parametrize("steps", [4, 5, 8, 13])
def test_stock_scheduler_gives_the_flow_schedule_for_a_flow_model(steps):
    torch.testing.assert_close(stock_scheduler_sigmas(steps, 4, 3.0), flow_sigmas(steps, 4, 3.0))


def test_stock_scheduler_refuses_fewer_steps_than_windows_for_a_flow_model():
    with pytest.raises(ValueError, match="at least 4 steps"):
        stock_scheduler_sigmas(3, 4, 3.0)


@pytest.mark.parametrize("shift", [1.0, 3.0, math.exp(1.15)])
def test_cfg_window_of_a_flow_sigma_follows_the_shifted_boundaries(shift):
    scales = [7.0, 5.0, 3.0, 1.0]
    bounds = flow_window_sigmas(4, shift)
    for k in range(4):  # a boundary belongs to the window starting there; just below it, to that window too
        start, end = bounds[k], bounds[k + 1]
        assert cfg_at(scales, start, shift) == scales[k]
        assert cfg_at(scales, (start + end) / 2, shift) == scales[k]
    # Each schedule step (float32) gets the scale of the window it lies in.
    sig = flow_sigmas(8, 4, shift)[:-1]
    assert [cfg_at(scales, s, shift) for s in sig] == [7.0, 7.0, 5.0, 5.0, 3.0, 3.0, 1.0, 1.0]


def test_cfg_of_a_batch_uses_its_noisiest_sigma():
    bounds = flow_window_sigmas(4, 3.0)
    assert cfg_at([7.0, 1.0, 1.0, 1.0], torch.stack([bounds[2], bounds[0]]), 3.0) == 7.0
