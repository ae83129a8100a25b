"""Timepoint sampling with a share on the sampler's own evaluation points (issue 13): the distribution it draws,
its support for any windows / step counts, and that the draws depend only on the generator (multi-process, resume)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from perflow_core.schedule import perflow_timesteps
from training.engine import lr_lambda
from training.reflow import ReflowConfig, draw_reflow_noise, sample_timepoints, sampler_points
from training.train import build_parser, validate_args


@settings(max_examples=40, deadline=None)
@given(
    num_windows=st.integers(1, 8),
    extra=st.lists(st.integers(0, 40), min_size=1, max_size=6),
)
def test_sampler_points_are_the_schedules_evaluation_points(num_windows, extra):
    steps = tuple(num_windows + e for e in extra)
    t, p = sampler_points(num_windows, steps)
    expected = set().union(*(perflow_timesteps(n, num_windows).tolist() for n in steps))
    assert set(torch.round(t * 1000).long().tolist()) == expected
    assert torch.all(p > 0) and p.sum().item() == pytest.approx(1.0)
    # every schedule evaluates at every window start, so no point carries more than a window start
    starts = torch.from_numpy(perflow_timesteps(num_windows, num_windows))  # as the sampler rounds them
    start_mass = p[torch.isin(torch.round(t * 1000).long(), starts)]
    assert len(start_mass) == num_windows
    assert start_mass.min() >= p.max() - 1e-12


def test_published_sampling_is_unchanged_at_share_zero():
    a = sample_timepoints(500, 1000, torch.Generator().manual_seed(3))
    u = torch.rand(500, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, 1 - torch.floor(u * 1000) / 1000)


def test_mixture_distribution_matches_its_definition():
    share, n = 0.5, 400_000
    points = sampler_points(4, (4, 5, 6, 7, 8))
    t = sample_timepoints(n, 1000, torch.Generator().manual_seed(0), point_share=share, points=points)
    k = torch.round(t.double() * 1000).long()
    counts = torch.bincount(k, minlength=1001)[1:].double()
    expected = torch.full((1000,), (1 - share) * n / 1000, dtype=torch.float64)
    expected[torch.round(points[0] * 1000).long() - 1] += share * n * points[1]
    # every timestep of the grid stays covered, and the frequencies match (chi-square per degree of freedom ~ 1)
    assert counts.min() > 0
    chi2 = (((counts - expected) ** 2) / expected).sum().item() / 999
    assert chi2 < 1.3
    # K = 4, 4..8 steps: the points are the 1/8 grid; the window starts carry more than half the point share
    assert set(k.unique().tolist()) == set(range(1, 1001))
    assert set(torch.round(points[0] * 8).long().tolist()) == set(range(1, 9))
    assert points[1][::2].sum().item() > 0.5


def test_draws_depend_only_on_the_generator():
    """Multi-process training draws the global batch from one per-step generator and each rank keeps its shard;
    resume re-creates that generator. Neither works if a draw touches the global RNG."""
    cfg = ReflowConfig(sampler_point_share=0.5)
    torch.manual_seed(1)
    t1, n1, k1 = draw_reflow_noise(cfg, 64, (1, 4, 4), torch.Generator().manual_seed(7))
    torch.manual_seed(2)
    t2, n2, k2 = draw_reflow_noise(cfg, 64, (1, 4, 4), torch.Generator().manual_seed(7))
    assert torch.equal(t1, t2) and torch.equal(n1, n2) and torch.equal(k1, k2)
    on_eighths = (t1 * 8 - torch.round(t1 * 8)).abs() < 1e-6  # the points (1/8 grid) and the uniform rest
    assert on_eighths.any() and not on_eighths.all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sampler_point_share": 1.5}, r"sampler_point_share must be a float in \[0, 1\]"),
        ({"sampler_point_share": -0.1}, r"sampler_point_share must be a float in \[0, 1\]"),
        ({"sampler_point_share": 0.5, "sampler_point_steps": (2, 4)}, r"sampler_point_steps must be .* 4\.\.1000"),
        ({"sampler_point_share": 0.5, "sampler_point_steps": ()}, "sampler_point_steps must be one or more"),
        ({"sampler_point_share": 0.5, "sampler_point_steps": (1001,)}, "sampler_point_steps"),
    ],
)
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReflowConfig(**kwargs).validate()


def test_cli_options_reach_the_config(capsys, tmp_path):
    out = ["--out", str(tmp_path)]
    args = build_parser().parse_args([*out, "--sampler-point-share", "0.25", "--sampler-point-steps", "4,6,8"])
    cfg = validate_args(args)
    assert cfg.sampler_point_share == 0.25 and cfg.sampler_point_steps == (4, 6, 8)
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*out, "--sampler-point-steps", "4,x"])
    assert e.value.code == 2 and "comma-separated step counts" in capsys.readouterr().err


def test_cosine_schedule_warms_up_then_decays_to_zero_and_constant_stays():
    cos, const = lr_lambda(10, "cosine", 110), lr_lambda(10, "constant", 110)
    assert cos(0) == pytest.approx(0.1, abs=1e-3) and 0.95 < cos(9) < 1.0
    assert cos(55) == pytest.approx(0.5) and cos(110) == pytest.approx(0.0, abs=1e-12) and cos(500) == cos(110)
    values = [cos(s) for s in range(9, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert [const(s) for s in (0, 9, 60, 110)] == pytest.approx([0.1, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="one of constant, cosine"):
        lr_lambda(10, "linear", 110)
