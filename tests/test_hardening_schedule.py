"""Schedules over every setting a node allows: strictly decreasing, ending in 0, no zero-length step, no NaN.

Property tests (hypothesis) over steps 1..10000 (KSampler's maximum; the PeRFlow Scheduler node allows 1000),
num_windows 1..16 and denoise in (0, 1], with the sampler run on a small deterministic model."""

import logging

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from perflow_core.model_sampling import PeRFlowModelSampling
from perflow_core.sampling import sample_perflow
from perflow_core.schedule import perflow_sigmas, perflow_timesteps, stock_scheduler_sigmas
from perflow_core.windows import MAX_NUM_WINDOWS, NUM_TRAIN_TIMESTEPS, time_windows, window_index

PROPERTY = settings(max_examples=60, deadline=None)
steps_any = st.integers(1, 10000)
windows_any = st.integers(1, MAX_NUM_WINDOWS)
denoise_any = st.floats(0.0, 1.0, exclude_min=True, allow_nan=False)


def assert_valid_schedule(sigmas: torch.Tensor, denoise: float) -> None:
    s = sigmas.double()
    assert s.ndim == 1 and s.numel() >= 2, sigmas
    assert torch.isfinite(s).all() and s[-1] == 0 and s.max() <= 1
    assert (s[1:] < s[:-1]).all(), "a repeated value is a zero-length step"
    if denoise == 1.0:
        assert s[0] == 1.0


def deterministic_model(ms: PeRFlowModelSampling):
    """ComfyUI's model call around a fixed smooth network (PeRFlow's sampler contract: returns x - t v)."""

    def model(x, sigma):
        out = torch.tanh(x) * 0.7 + 0.05 * ms.timestep(sigma).reshape(-1, 1, 1, 1) / NUM_TRAIN_TIMESTEPS
        return ms.calculate_denoised(sigma, out, x)

    return model


def denoise_is_too_small(denoise: float) -> bool:
    return denoise * NUM_TRAIN_TIMESTEPS + 1e-6 < 1


@PROPERTY
@given(steps=steps_any, num_windows=windows_any, denoise=denoise_any)
def test_every_schedule_is_strictly_decreasing_and_ends_in_zero(steps, num_windows, denoise):
    try:
        sigmas = perflow_sigmas(steps, num_windows, denoise)
    except ValueError as e:  # the one refusal: more steps below denoise than timesteps exist, none at all
        assert denoise_is_too_small(denoise) and "denoise" in str(e), (steps, num_windows, denoise, e)
        return
    assert_valid_schedule(sigmas, denoise)
    assert len(sigmas) <= min(max(steps, num_windows), NUM_TRAIN_TIMESTEPS) + 1


@PROPERTY
@given(
    steps=st.integers(1, 1000),
    num_windows=windows_any,
    denoise=denoise_any,
    parameterization=st.sampled_from(["diff_eps", "ddim_eps", "velocity"]),
)
def test_sampler_output_is_finite_on_every_node_setting(steps, num_windows, denoise, parameterization):
    if denoise_is_too_small(denoise) and steps / denoise > NUM_TRAIN_TIMESTEPS:
        return  # refused above, with the reason
    ms = PeRFlowModelSampling(parameterization, num_windows)
    sigmas = perflow_sigmas(steps, num_windows, denoise)
    noise = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(steps))
    x = ms.noise_scaling(sigmas[0], noise, torch.zeros_like(noise), max_denoise=denoise == 1.0)
    seen = []
    out = sample_perflow(deterministic_model(ms), x, sigmas, callback=seen.append, disable=True)
    assert torch.isfinite(out).all() and len(seen) == len(sigmas) - 1
    assert all(torch.isfinite(d["denoised"]).all() for d in seen)


@PROPERTY
@given(steps=steps_any, num_windows=windows_any)
def test_timesteps_are_distinct_and_keep_their_windows(steps, num_windows):
    ts = perflow_timesteps(steps, num_windows)
    assert len(ts) == min(max(steps, num_windows), NUM_TRAIN_TIMESTEPS)
    assert np.all(np.diff(ts) < 0) and ts[-1] >= 1 and ts[0] == NUM_TRAIN_TIMESTEPS
    # every window keeps its start, as in the published schedule
    starts = [int(s * NUM_TRAIN_TIMESTEPS) for s in time_windows(num_windows)[0]]
    assert set(starts) <= set(ts.tolist())
    per_window = window_index(torch.from_numpy(ts).double() / NUM_TRAIN_TIMESTEPS, num_windows).bincount()
    assert per_window.numel() == num_windows and (per_window > 0).all()


@pytest.mark.parametrize("steps, num_windows", [(1000, 1), (999, 2), (1000, 2), (997, 4), (993, 8), (1000, 16)])
def test_published_repeats_become_distinct_steps_and_are_logged(steps, num_windows, caplog):
    with caplog.at_level(logging.WARNING, logger="perflow"):
        ts = perflow_timesteps(steps, num_windows)
    assert len(ts) == steps and len(set(ts.tolist())) == steps
    assert "distinct timesteps" in caplog.text


def test_more_steps_than_timesteps_are_capped_and_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="perflow"):
        sigmas = perflow_sigmas(5000, 4)
    assert len(sigmas) == NUM_TRAIN_TIMESTEPS + 1 and "5000 steps" in caplog.text and "1000 distinct" in caplog.text


def test_img2img_beyond_1000_scheduled_steps_keeps_denoise(caplog):
    """steps 11 at denoise 0.01 schedules 1100 steps: today two trailing zeros and an all-NaN latent."""
    with caplog.at_level(logging.WARNING, logger="perflow"):
        sigmas = perflow_sigmas(11, 4, 0.01)
    assert_valid_schedule(sigmas, 0.01)
    assert sigmas[0].item() == pytest.approx(0.01) and len(sigmas) == 11  # the 10 timesteps at or below 0.01
    assert "1100 steps" in caplog.text
    with caplog.at_level(logging.WARNING, logger="perflow"):
        sigmas = perflow_sigmas(2000, 4, 0.5)
    assert sigmas[0].item() == pytest.approx(0.5) and len(sigmas) == 501


def test_denoise_below_the_finest_timestep_is_refused():
    with pytest.raises(ValueError, match="denoise 0.0005 is below PeRFlow's finest timestep"):
        perflow_sigmas(1, 4, 0.0005)


@pytest.mark.parametrize("bad", [True, 0, -3, 2.5, "4", None])
def test_steps_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="steps"):
        perflow_sigmas(bad, 4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.1, 1.01])
def test_denoise_must_be_a_finite_number_in_0_1(bad):
    with pytest.raises(ValueError, match="denoise"):
        perflow_sigmas(4, 4, bad)


@pytest.mark.parametrize("bad", [True, 0, 17, 4.0, "4"])
def test_num_windows_must_be_an_integer_in_range(bad):
    with pytest.raises(ValueError, match="num_windows"):
        perflow_sigmas(4, bad)


def basic_scheduler(num_windows: int, steps: int, denoise: float) -> torch.Tensor:
    """ComfyUI's BasicScheduler.get_sigmas (comfy_extras/nodes_custom_sampler.py) around the stock handler, with a
    fake model sampling that carries only num_windows."""
    total = steps if denoise >= 1.0 else int(steps / denoise)
    return stock_scheduler_sigmas(total, num_windows)[-(steps + 1) :]


@PROPERTY
@given(steps=steps_any, num_windows=windows_any, denoise=st.floats(1e-300, 1.0))  # int(steps/5e-324) overflows
def test_stock_handler_never_gives_a_cut_schedule(steps, num_windows, denoise):
    total = steps if denoise >= 1.0 else int(steps / denoise)
    try:
        sigmas = basic_scheduler(num_windows, steps, denoise)
    except ValueError as e:
        assert total < num_windows or total > NUM_TRAIN_TIMESTEPS, (steps, num_windows, denoise)
        assert "PeRFlow Scheduler node" in str(e)
        return
    assert_valid_schedule(sigmas, denoise)
    assert len(sigmas) == steps + 1  # never shorter: the handler returned at least steps+1 values


def test_stock_handler_refuses_fewer_steps_than_windows_with_the_fix():
    """BasicScheduler, steps 3 on K=4, gave [0.75, 0.5, 0.25, 0] (not starting at 1) on main."""
    with pytest.raises(ValueError, match=r"at least 4 steps .* Set steps to 4 or more"):
        basic_scheduler(4, 3, 1.0)
    assert basic_scheduler(4, 4, 1.0).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_stock_handler_refuses_more_steps_than_timesteps():
    with pytest.raises(ValueError, match="1100 steps .* steps/denoise at or below 1000"):
        basic_scheduler(4, 11, 0.01)


@pytest.mark.parametrize(
    "sigmas, match",
    [
        ([1.0, 0.5, 0.5, 0.0], "strictly decreasing"),
        ([0.5, 0.75, 0.0], "strictly decreasing"),
        ([1.5, 0.5, 0.0], r"in \[0, 1\]"),
        ([1.0, 0.5, -0.1], r"in \[0, 1\]"),
        ([1.0, float("nan"), 0.0], r"in \[0, 1\]"),
        ([[1.0, 0.0]], "1-D"),
    ],
)
def test_sample_perflow_refuses_bad_sigmas(sigmas, match):
    ms = PeRFlowModelSampling("diff_eps", 4)
    with pytest.raises(ValueError, match=match):
        sample_perflow(deterministic_model(ms), torch.zeros(1, 2, 3, 3), torch.tensor(sigmas), disable=True)


@PROPERTY
@given(st.lists(st.floats(-2, 2) | st.sampled_from([float("nan"), float("inf")]), min_size=2, max_size=8))
def test_sample_perflow_refuses_or_stays_finite(values):
    ms = PeRFlowModelSampling("ddim_eps", 4)
    sigmas = torch.tensor(values, dtype=torch.float32)
    try:
        out = sample_perflow(deterministic_model(ms), torch.ones(1, 2, 3, 3), sigmas, disable=True)
    except ValueError:
        ok = torch.isfinite(sigmas).all() and sigmas.min() >= 0 and sigmas.max() <= 1 and (sigmas.diff() < 0).all()
        assert not ok, values
        return
    assert torch.isfinite(out).all()
