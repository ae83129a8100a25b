"""The 'perflow' scheduler inside a real ComfyUI (skips without COMFYUI_PATH): stock BasicScheduler and KSampler
keep only the last steps+1 values of what the handler returns, so every schedule they produce must still be
strictly decreasing, end in 0 and start at 1 for denoise 1 - or be refused with the fix."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import comfy_env
from perflow_core.schedule import perflow_sigmas


@pytest.fixture(scope="module")
def perflow_models():
    """{num_windows: model} of a random-initialised small SD1.5 checkpoint after PeRFlow Model Sampling."""
    comfy_env.require_comfyui()
    comfy_env.setup_comfyui()
    comfy_env.load_pack()
    from checkpoints import checkpoint_path

    name = comfy_env.add_model_file("checkpoints", checkpoint_path("sd15"))
    model = comfy_env.call("CheckpointLoaderSimple", ckpt_name=name)[0]
    return {
        k: comfy_env.call("PeRFlowModelSampling", model=model, parameterization="diff_eps", num_windows=k)[0]
        for k in (1, 2, 4, 7, 16)
    }


def basic_scheduler(model, steps, denoise):
    return comfy_env.call("BasicScheduler", model=model, scheduler="perflow", steps=steps, denoise=denoise)[0]


def ksampler_sigmas(model, steps, denoise):
    import comfy.samplers

    return comfy.samplers.KSampler(model, steps, "cpu", sampler="perflow", scheduler="perflow", denoise=denoise).sigmas


def assert_valid(sigmas, steps, denoise):
    s = sigmas.double()
    assert len(s) == steps + 1 and s[-1] == 0 and s.max() <= 1 and (s[1:] < s[:-1]).all(), sigmas
    if denoise == 1.0:
        assert s[0] == 1.0


def test_basic_scheduler_refuses_fewer_steps_than_windows(perflow_models):
    """Main gave [0.75, 0.5, 0.25, 0] here: a schedule that does not start at t = 1."""
    with pytest.raises(ValueError, match="at least 4 steps.*PeRFlow Scheduler node"):
        basic_scheduler(perflow_models[4], 3, 1.0)
    assert basic_scheduler(perflow_models[4], 4, 1.0).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_img2img_past_1000_steps_is_refused_by_stock_and_capped_by_the_perflow_node(perflow_models):
    """steps 11 at denoise 0.01: main scheduled 1100 steps with two trailing zeros (an all-NaN latent)."""
    for get in (basic_scheduler, ksampler_sigmas):
        with pytest.raises(ValueError, match="1100 steps.*steps/denoise at or below 1000"):
            get(perflow_models[4], 11, 0.01)
    sigmas = comfy_env.call("PeRFlowScheduler", model=perflow_models[4], steps=11, denoise=0.01)[0]
    assert sigmas[0].item() == pytest.approx(0.01) and sigmas[-1] == 0 and (sigmas.diff() < 0).all()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(
    steps=st.integers(1, 10000),
    windows=st.sampled_from([1, 2, 4, 7, 16]),
    denoise=st.floats(1e-300, 1.0),  # ComfyUI itself overflows in int(steps / 5e-324)
    stock=st.sampled_from(["BasicScheduler", "KSampler"]),
)
def test_every_stock_schedule_is_valid_or_refused_with_the_fix(perflow_models, steps, windows, denoise, stock):
    model = perflow_models[windows]
    get = basic_scheduler if stock == "BasicScheduler" else ksampler_sigmas
    comfy_denoise = 1.0 if (stock == "KSampler" and denoise > 0.9999) else denoise
    total = steps if comfy_denoise >= 1.0 else int(steps / comfy_denoise)
    try:
        sigmas = get(model, steps, denoise)
    except ValueError as e:
        assert total < windows or total > 1000, (total, windows)
        assert "PeRFlow Scheduler node" in str(e)
        return
    assert_valid(sigmas.cpu(), steps, comfy_denoise)
    if comfy_denoise >= 1.0:
        torch.testing.assert_close(sigmas.cpu(), perflow_sigmas(steps, windows))
