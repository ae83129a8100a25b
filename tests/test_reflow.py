"""Reflow targets and teacher solver: golden windows, a hand-written DDIM reference, one-step landing on z_e."""

import pytest
import torch

from perflow_core.parameterization import velocity
from perflow_core.schedule import alphas_cumprod_at, sd_alphas_cumprod
from perflow_core.windows import window_of
from training.reflow import (
    ReflowConfig,
    draw_reflow_noise,
    make_reflow_batch,
    reflow_loss,
    reflow_target,
    sample_timepoints,
    select_cond,
)
from training.solvers import solve_teacher

AC = sd_alphas_cumprod()


def stand_in_eps(x, t, cond):
    """A smooth deterministic 'teacher': depends on x, t and a per-item conditioning scalar."""
    return torch.tanh(x) * 0.7 + 0.05 * t.reshape(-1, 1, 1, 1) + 0.1 * cond.reshape(-1, 1, 1, 1).to(x.dtype)


def published_target(parameterization, z_s, z_e, t_s, t_e, gamma, ac_s, ac_e):
    """The published script's target formulas (6.4), from the recorded window quantities."""
    b = lambda v: v.reshape(-1, 1, 1, 1)  # noqa: E731
    if parameterization == "velocity":
        return (z_e - z_s) / (b(t_e) - b(t_s))
    if parameterization == "diff_eps":
        lam, eta = 1 / b(gamma), -((1 - b(gamma) ** 2) ** 0.5) / b(gamma)
    else:
        lam = (b(ac_e) / b(ac_s)) ** 0.5
        eta = (1 - b(ac_e)) ** 0.5 - (b(ac_e) / b(ac_s) * (1 - b(ac_s))) ** 0.5
    return (z_e - lam * z_s) / eta


@pytest.mark.parametrize("parameterization", ["diff_eps", "ddim_eps", "velocity"])
def test_targets_match_golden_windows(golden, parameterization):
    meta, tensors = golden
    ac = tensors["alphas_cumprod"]
    for rec in meta["windows"]:
        k, n = rec["key"], rec["windows"]
        t = tensors[f"{k}.timepoints"]
        t_s, t_e = window_of(t, n)
        torch.testing.assert_close(t_s, tensors[f"{k}.t_start"], atol=1e-6, rtol=0)
        torch.testing.assert_close(t_e, tensors[f"{k}.t_end"], atol=1e-6, rtol=0)
        torch.testing.assert_close(alphas_cumprod_at(ac, t_s), tensors[f"{k}.alphas_cumprod_start"])
        torch.testing.assert_close(alphas_cumprod_at(ac, t_e), tensors[f"{k}.alphas_cumprod_end"])
        g = torch.Generator().manual_seed(n)
        z_s, z_e = torch.randn(2, len(t), 4, 8, 8, generator=g)
        _, target = reflow_target(parameterization, z_s, z_e, t, ac, n)
        expected = published_target(
            parameterization,
            z_s,
            z_e,
            tensors[f"{k}.t_start"],
            tensors[f"{k}.t_end"],
            tensors[f"{k}.gamma_s_e"],
            tensors[f"{k}.alphas_cumprod_start"],
            tensors[f"{k}.alphas_cumprod_end"],
        )
        torch.testing.assert_close(target, expected, atol=1e-4, rtol=1e-4, msg=f"{k} {parameterization}")


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_teacher_solver_equals_reference_ddim(cfg):
    """Item by item, the published PFODESolver's index arithmetic: round(t*1000 - 1), prev = idx - 1000//(K N)."""
    windows, steps = 4, 2
    g = torch.Generator().manual_seed(0)
    t_s, t_e = window_of(torch.tensor([1.0, 0.75, 0.5, 0.25, 0.6]), windows)
    z_s = torch.randn(5, 2, 4, 4, generator=g)
    cond, null = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), torch.zeros(5)
    ours = solve_teacher(stand_in_eps, z_s, t_s, t_e, steps, AC, cond, cfg, null)
    for i in range(5):
        x = z_s[i : i + 1].double()
        for j in range(steps):
            tau = t_s[i].item() + (t_e[i].item() - t_s[i].item()) * j / steps
            idx = round(999 + (tau - 1) * 1000)
            prev = idx - 1000 // (windows * steps)
            a, a_prev = AC[idx].double(), AC[prev].double() if prev >= 0 else AC[0].double()
            tt = torch.tensor([(idx + 1) / 1000])
            eps = stand_in_eps(x, tt, cond[i : i + 1]).double()
            if cfg != 1.0:
                eps_u = stand_in_eps(x, tt, null[i : i + 1]).double()
                eps = eps_u + cfg * (eps - eps_u)
            x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
            x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
        torch.testing.assert_close(ours[i : i + 1].double(), x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("windows", [4, 8])
@pytest.mark.parametrize("parameterization", ["diff_eps", "ddim_eps", "velocity"])
def test_one_sampler_step_lands_on_window_end(parameterization, windows):
    g = torch.Generator().manual_seed(1)
    t = sample_timepoints(64, 1000, g)
    z_s, z_e = torch.randn(2, 64, 4, 8, 8, generator=g)
    z_t, target = reflow_target(parameterization, z_s, z_e, t, AC, windows)
    _, t_e = window_of(t, windows)
    v = velocity(parameterization, target, z_t, t, AC, windows)
    landed = z_t + (t_e - t).reshape(-1, 1, 1, 1) * v
    torch.testing.assert_close(landed, z_e, atol=1e-5, rtol=1e-5)


def test_timepoints_on_published_grid():
    t = sample_timepoints(20000, 1000, torch.Generator().manual_seed(0))
    assert t.min() >= 0.001 - 1e-7 and t.max() == 1.0
    torch.testing.assert_close(t * 1000, torch.round(t * 1000), atol=1e-4, rtol=0)
    coarse = sample_timepoints(2000, 40, torch.Generator().manual_seed(0))
    assert set(torch.round(coarse * 40).long().tolist()) == set(range(1, 41))


def test_reflow_batch_dropout_and_window_start_noise_level():
    cfg = ReflowConfig(parameterization="velocity", num_windows=4, solver_steps=1, cond_dropout=0.5)
    latents = torch.zeros(256, 1, 8, 8)
    cond, null = torch.ones(256), torch.zeros(256)
    t, noise, keep = draw_reflow_noise(cfg, 256, (1, 8, 8), torch.Generator().manual_seed(0))
    batch = make_reflow_batch(cfg, stand_in_eps, latents, cond, null, AC, t, noise, keep)
    dropped = (batch.cond == 0).float().mean().item()
    assert 0.35 < dropped < 0.65
    assert batch.z_t.shape == latents.shape and batch.target.shape == latents.shape
    # z_s at t_s = 1 is the marginal at alphas_cumprod[999] (published add_noise), not plain noise
    z_s = batch.z_t - batch.target * (batch.t - window_of(batch.t, 4)[0]).reshape(-1, 1, 1, 1)
    first = window_of(batch.t, 4)[0] == 1.0
    assert first.any()
    std = z_s[first].std().item()
    assert abs(std - (1 - AC[999]).sqrt().item()) < 0.05


def test_select_cond_handles_dicts():
    keep = torch.tensor([True, False])
    out = select_cond(
        keep, {"c": torch.ones(2, 3), "y": torch.ones(2, 5)}, {"c": torch.zeros(1, 3), "y": torch.zeros(2, 5)}
    )
    assert out["c"][0].eq(1).all() and out["c"][1].eq(0).all() and out["y"][1].eq(0).all()


def test_reweighting_and_config_validation():
    pred, target = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    assert reflow_loss(pred, target, torch.tensor([0.5, 0.5])).item() == 1.0
    assert reflow_loss(pred, target, torch.tensor([1.0, 1.0]), "reciprocal").item() == pytest.approx(1 / 0.1 / 2.3)
    with pytest.raises(ValueError, match=r"cond_dropout must be a float in \[0, 1\)"):
        ReflowConfig(cond_dropout=1.5).validate()
    with pytest.raises(ValueError, match="one of diff_eps, ddim_eps, velocity"):
        ReflowConfig(parameterization="eps").validate()
    with pytest.raises(ValueError, match="divisor of 1000"):
        ReflowConfig(timestep_grid=30).validate()


def test_cfg_fixed_solves_with_guidance_and_sync_without():
    calls = []

    def counting_eps(x, t, cond):
        calls.append(cond.clone())
        return stand_in_eps(x, t, cond)

    latents, cond, null = torch.zeros(4, 1, 2, 2), torch.ones(4), torch.zeros(4)
    t, noise, keep = draw_reflow_noise(ReflowConfig(cond_dropout=0.0), 4, (1, 2, 2), torch.Generator().manual_seed(0))
    for mode, per_step in (("sync", 1), ("fixed", 2)):
        calls.clear()
        cfg = ReflowConfig(cfg_mode=mode, cfg_scale=3.0, solver_steps=2, cond_dropout=0.0)
        make_reflow_batch(cfg, counting_eps, latents, cond, null, AC, t, noise, keep)
        assert len(calls) == 2 * per_step
        assert any((c == 0).all() for c in calls) == (mode == "fixed")
