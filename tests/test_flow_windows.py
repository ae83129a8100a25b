"""Flow-model windows and schedules (perflow_core.flow_windows) over every setting they accept.

Property tests (hypothesis) over steps 1..1000, K 1..16, shift 0.01..100 and denoise in (0, 1]."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from perflow_core.flow_windows import (
    MAX_FLOW_SHIFT,
    MAX_FLOW_STEPS,
    MIN_FLOW_SHIFT,
    flow_sigmas,
    flow_window_index,
    flow_window_sigmas,
    time_shift,
    time_unshift,
    window_of_sigma,
)
from perflow_core.windows import MAX_NUM_WINDOWS

PROPERTY = settings(max_examples=80, deadline=None)
steps_any = st.integers(1, MAX_FLOW_STEPS)
windows_any = st.integers(1, MAX_NUM_WINDOWS)
shift_any = st.floats(MIN_FLOW_SHIFT, MAX_FLOW_SHIFT, allow_nan=False)
denoise_any = st.floats(0.0, 1.0, exclude_min=True, allow_nan=False)


def strictly_decreasing_to_zero(s: torch.Tensor) -> bool:
    return bool(s.dtype == torch.float32 and torch.isfinite(s).all() and s[-1] == 0 and (s[1:] < s[:-1]).all())


@PROPERTY
@given(num_windows=windows_any, shift=shift_any)
def test_window_sigmas_are_equal_in_sigma_whatever_the_shift(num_windows, shift):
    b = flow_window_sigmas(num_windows, shift)
    assert len(b) == num_windows + 1 and b[0] == 1 and strictly_decreasing_to_zero(b)
    expected = 1 - torch.arange(num_windows + 1, dtype=torch.float64) / num_windows
    assert torch.equal(b, expected.float())


@PROPERTY
@given(steps=steps_any, num_windows=windows_any, shift=shift_any, denoise=denoise_any)
def test_every_schedule_is_strictly_decreasing_from_its_start_to_zero(steps, num_windows, shift, denoise):
    try:
        s = flow_sigmas(steps, num_windows, shift, denoise)
    except ValueError as e:  # the one refusal: int(steps/denoise) beyond a million steps
        assert steps / denoise > 10**6 and "denoise" in str(e), (steps, denoise, e)
        return
    assert strictly_decreasing_to_zero(s)
    assert len(s) == (max(steps, num_windows) if denoise > 0.9999 else steps) + 1
    if denoise > 0.9999:
        assert s[0] == 1.0
    else:  # ComfyUI's convention: the tail of the int(steps/denoise)-step schedule
        total = int(steps / denoise)
        full = flow_sigmas(total, num_windows, shift) if total <= MAX_FLOW_STEPS else None
        if full is not None:
            assert torch.equal(s, full[-(steps + 1) :])
        s0 = float(s[0])
        if total >= num_windows:  # the steps fill whole windows of floor or ceil(total / K) steps from sigma 0 up
            fewest, most = total // num_windows, -(-total // num_windows)
            low, high = steps // most, -(-steps // fewest)
            assert low / num_windows - 1e-6 <= s0 <= high / num_windows + 1e-6, (s0, denoise, total)
        else:  # the K-step schedule (one step per window) is the shortest there is
            assert s0 == pytest.approx(steps / num_windows, abs=1e-5)


@PROPERTY
@given(steps=steps_any, num_windows=windows_any, shift=shift_any)
def test_every_window_boundary_is_a_step_when_steps_reach_k(steps, num_windows, shift):
    s = flow_sigmas(steps, num_windows, shift)
    bounds = flow_window_sigmas(num_windows, shift)
    assert set(bounds.tolist()) <= set(s.tolist())
    # steps per window: the remainder goes to the noisiest windows (published set_timesteps)
    idx = flow_window_index(s[:-1], num_windows, shift)
    counts = torch.bincount(idx, minlength=num_windows).tolist()
    n = max(steps, num_windows)
    assert counts == [n // num_windows + (1 if i < n % num_windows else 0) for i in range(num_windows)]


@PROPERTY
@given(steps=steps_any, num_windows=windows_any, shift=shift_any)
def test_each_schedule_point_lies_in_the_window_the_lookup_names(steps, num_windows, shift):
    s = flow_sigmas(steps, num_windows, shift)[:-1]
    start, end = window_of_sigma(s, num_windows, shift)
    assert start.dtype == s.dtype and start.shape == s.shape
    assert ((end < s) & (s <= start)).all()
    bounds = flow_window_sigmas(num_windows, shift)
    on_boundary = torch.isin(s, bounds)
    assert torch.equal(start[on_boundary], s[on_boundary])  # a boundary belongs to the window starting there


def test_shift_is_sd3s_map_and_its_inverse():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.allclose(time_shift(t, 3.0), 3 * t / (1 + 2 * t))
    assert torch.allclose(time_unshift(time_shift(t, 3.0), 3.0), t)
    assert torch.equal(time_shift(t, 1.0), t)


@PROPERTY
@given(steps=steps_any, num_windows=windows_any, shift=shift_any)
def test_the_shift_spreads_the_steps_inside_each_window_evenly_in_time(steps, num_windows, shift):
    s = flow_sigmas(steps, num_windows, shift).double()
    idx = flow_window_index(s[:-1].float(), num_windows, shift)
    t = time_unshift(s, shift)
    for k in range(num_windows):  # within a window: equal steps in t, the last one ending at the next boundary
        window = torch.cat([t[:-1][idx == k], time_unshift(torch.tensor([1 - (k + 1) / num_windows]).double(), shift)])
        gaps = window[:-1] - window[1:]
        float32 = 1e-6 * max(shift, 1 / shift)  # the sigmas' float32 rounding, stretched by dt/dsigma <= this
        assert torch.allclose(gaps, gaps.mean().expand_as(gaps), rtol=1e-4, atol=float32), (k, gaps)


def test_windows_stay_put_and_the_steps_move_with_the_shift():
    assert flow_window_sigmas(4, 3.0).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert flow_sigmas(8, 4, 1.0).tolist() == [1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0]
    s = flow_sigmas(8, 4, 3.0).double()
    assert s[0::2].tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    # the second step of each window: midway between its ends in the unshifted time t = s / (3 - 2 s)
    for k, start in enumerate((1.0, 0.75, 0.5, 0.25)):
        mid_t = (start / (3 - 2 * start) + (start - 0.25) / (3 - 2 * (start - 0.25))) / 2
        assert s[2 * k + 1].item() == pytest.approx(3 * mid_t / (1 + 2 * mid_t), abs=1e-6)


def test_fewer_steps_than_windows_are_raised_and_logged(caplog):
    with caplog.at_level("WARNING", logger="perflow"):
        s = flow_sigmas(2, 4, 1.0)
    assert s.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0] and "fewer than the 4 time windows" in caplog.text


def test_denoise_zero_is_an_empty_schedule():
    assert flow_sigmas(4, 4, 3.0, 0.0).numel() == 0


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, 4, 1.0), "steps"),
        ((MAX_FLOW_STEPS + 1, 4, 1.0), "steps"),
        ((4.0, 4, 1.0), "steps"),
        ((True, 4, 1.0), "steps"),
        ((4, 0, 1.0), "num_windows"),
        ((4, MAX_NUM_WINDOWS + 1, 1.0), "num_windows"),
        ((4, 4, 0.0), "shift"),
        ((4, 4, -3.0), "shift"),
        ((4, 4, MAX_FLOW_SHIFT * 2), "shift"),
        ((4, 4, math.nan), "shift"),
        ((4, 4, math.inf), "shift"),
        ((4, 4, 1.0, 1.5), "denoise"),
        ((4, 4, 1.0, -0.1), "denoise"),
        ((4, 4, 1.0, math.nan), "denoise"),
        ((4, 4, 1.0, 1e-9), "denoise"),
    ],
)
def test_bad_settings_are_refused_naming_the_setting(args, match):
    with pytest.raises(ValueError, match=match):
        flow_sigmas(*args)


@pytest.mark.parametrize("shift", [0.0, math.nan, 1e3])
def test_window_sigmas_refuse_a_bad_shift(shift):
    with pytest.raises(ValueError, match="shift"):
        flow_window_sigmas(4, shift)
