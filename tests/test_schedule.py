"""Window lookup and step schedules, checked against properties stated by the published scheduler."""

import logging

import numpy as np
import pytest
import torch

from perflow_core.schedule import perflow_sigmas, perflow_timesteps
from perflow_core.windows import time_windows, window_index, window_of


def test_boundary_belongs_to_window_that_starts_there():
    t_s, t_e = window_of(torch.tensor([1.0, 0.75, 0.7500001, 0.7499, 0.5, 0.25, 0.001]), 4)
    assert t_s.tolist() == [1.0, 0.75, 0.75, 0.75, 0.5, 0.25, 0.25]
    assert t_e.tolist() == [0.75, 0.5, 0.5, 0.5, 0.25, 0.0, 0.0]


def test_window_index_for_every_grid_time():
    for k in range(1, 9):
        t = torch.arange(1, 1001, dtype=torch.float32) / 1000
        idx = window_index(t, k)
        starts, ends = time_windows(k)
        s = torch.tensor(starts)[idx]
        e = torch.tensor(ends)[idx]
        assert bool(((t <= s + 1e-6) & (t > e + 1e-6)).all()), k  # t in (end, start]


@pytest.mark.parametrize("k", range(1, 9))
def test_schedules_spread_steps_over_windows(k, caplog):
    starts, _ = time_windows(k)
    for steps in range(1, 26):
        with caplog.at_level(logging.WARNING, logger="perflow"):
            caplog.clear()
            ts = perflow_timesteps(steps, k)
        n = max(steps, k)
        assert ("fewer than" in caplog.text) == (steps < k)
        assert len(ts) == n and ts[0] == 1000 and np.all(np.diff(ts) < 0)
        # every window start is hit, and window i holds n//k steps plus one for the first n%k windows
        per_window = window_index(torch.from_numpy(ts).float() / 1000 + 1e-6, k).bincount(minlength=k).tolist()
        assert per_window == [n // k + (i < n % k) for i in range(k)]
        assert all(int(s * 1000) in ts.tolist() for s in starts)
        sigmas = perflow_sigmas(steps, k)
        assert sigmas.shape == (n + 1,) and sigmas[-1] == 0 and sigmas.dtype == torch.float32


def test_truncation_quirk_is_kept():
    assert perflow_timesteps(12, 4).tolist()[:3] == [1000, 916, 833]  # 916.67 -> 916, as published


@pytest.mark.parametrize("steps,denoise", [(4, 0.5), (4, 0.75), (8, 0.5), (3, 0.3), (6, 0.8)])
def test_denoise_keeps_the_tail_of_a_longer_schedule(steps, denoise):
    full = perflow_sigmas(int(steps / denoise), 4)
    tail = perflow_sigmas(steps, 4, denoise)
    assert tail.shape == (steps + 1,) and torch.equal(tail, full[-(steps + 1) :])
    assert tail[0] < 1.0 and tail[-1] == 0


def test_denoise_zero_is_an_empty_schedule_and_bad_values_are_refused():
    assert perflow_sigmas(4, 4, 0.0).numel() == 0
    with pytest.raises(ValueError, match="denoise"):
        perflow_sigmas(4, 4, 1.5)
    with pytest.raises(ValueError, match="steps"):
        perflow_sigmas(0, 4)
    with pytest.raises(ValueError, match="num_windows"):
        time_windows(0)
