"""PeRFlow sampling on rectified-flow models inside a real ComfyUI (skips without COMFYUI_PATH): small random SD3
(MMDiT) and Flux models loaded by ComfyUI's UNETLoader keep their own model sampling; the PeRFlow nodes give the
windowed flow schedule at the model's shift, the transformer receives those timesteps, the step is Euler,
img2img starts on the straight segment, the CFG schedule drives SD3's real CFG and leaves Flux's distilled
guidance alone; wrong set-ups are refused."""

import contextlib
import math

import pytest
import torch

import comfy_env
from perflow_core.flow_windows import flow_sigmas

SEED, STEPS = 1234, 4
MULTIPLIER = {"sd3": 1000.0, "flux": 1.0}  # what ComfyUI's model sampling hands the transformer: sigma * this
SHIFT = {"sd3": 3.0, "flux": math.exp(1.15)}  # SD3's shift 3; Flux's ModelSamplingFlux default mu 1.15 = exp(1.15)


@pytest.fixture(scope="module")
def models():
    """{'sd3': MODEL, 'flux': MODEL}, loaded by ComfyUI's UNETLoader from small random files."""
    comfy_env.require_comfyui()
    comfy_env.setup_comfyui()
    comfy_env.load_pack()
    import flow_checkpoints as fc

    return {family: fc.load_model(family) for family in ("sd3", "flux")}


def conds(family, guidance=None):
    import flow_checkpoints as fc

    return fc.conditioning(family, seed=1, guidance=guidance), fc.conditioning(family, seed=2, guidance=guidance)


def empty_latent(size=64):
    return comfy_env.call("EmptySD3LatentImage", width=size, height=size, batch_size=1)[0]


def perflow(model, windows=4):
    return comfy_env.call("PeRFlowModelSampling", model=model, parameterization="velocity", num_windows=windows)[0]


@contextlib.contextmanager
def recording(model):
    """Records (timesteps, batch size, guidance, x) of every call of the model's transformer (a forward pre-hook:
    MMDiT has no DIFFUSION_MODEL wrapper point), removed on exit."""
    calls = []

    def record(module, args, kwargs):
        x, timesteps = args[:2]
        g = kwargs.get("guidance")
        calls.append((timesteps.tolist(), x.shape[0], None if g is None else g.tolist(), x.clone()))

    handle = model.model.diffusion_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def ksampler(model, family, latent, sampler="perflow", scheduler="perflow", cfg=1.0, denoise=1.0, guidance=None):
    positive, negative = conds(family, guidance)
    out = comfy_env.call(
        "KSampler", model=model, seed=SEED, steps=STEPS, cfg=cfg, sampler_name=sampler, scheduler=scheduler,
        positive=positive, negative=negative, latent_image=latent, denoise=denoise,
    )  # fmt: skip
    return out[0]["samples"]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_model_sampling_node_keeps_the_models_own_noise_definition(models, family):
    import comfy.model_sampling

    model = models[family]
    before = model.get_model_object("model_sampling")
    ms = perflow(model).get_model_object("model_sampling")
    assert type(ms) is type(before) and isinstance(ms, comfy.model_sampling.CONST)
    assert ms.shift == before.shift and torch.equal(ms.sigmas, before.sigmas)
    assert ms.perflow_num_windows == 4 and not hasattr(before, "perflow_num_windows")
    assert model.get_model_object("model_sampling") is before  # the input model is untouched


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_scheduler_node_gives_the_windowed_flow_schedule_at_the_models_shift(models, family):
    sigmas = comfy_env.call("PeRFlowScheduler", model=perflow(models[family]), steps=6, denoise=1.0)[0]
    torch.testing.assert_close(sigmas, flow_sigmas(6, 4, SHIFT[family]), atol=1e-6, rtol=0)


def test_windows_follow_a_shift_set_before_the_perflow_node(models):
    sd3 = comfy_env.call("ModelSamplingSD3", model=models["sd3"], shift=2.0)[0]
    got = comfy_env.call("PeRFlowScheduler", model=perflow(sd3), steps=4, denoise=1.0)[0]
    torch.testing.assert_close(got, flow_sigmas(4, 4, 2.0), atol=1e-6, rtol=0)
    flux = comfy_env.call(
        "ModelSamplingFlux", model=models["flux"], max_shift=1.15, base_shift=0.5, width=512, height=512
    )[0]
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (512 * 512 / 256 - 256)  # ModelSamplingFlux's resolution rule
    got = comfy_env.call("PeRFlowScheduler", model=perflow(flux), steps=4, denoise=1.0)[0]
    torch.testing.assert_close(got, flow_sigmas(4, 4, math.exp(mu)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_stock_ksampler_feeds_the_transformer_the_windowed_timesteps(models, family):
    m = perflow(models[family])
    with recording(m) as calls:
        out = ksampler(m, family, empty_latent())
    expected = flow_sigmas(STEPS, 4, SHIFT[family])[:-1] * MULTIPLIER[family]
    torch.testing.assert_close(torch.tensor([c[0][0] for c in calls]), expected, atol=1e-3, rtol=1e-5)
    assert [c[1] for c in calls] == [1] * STEPS  # cfg 1: one pass per step
    assert out.shape == (1, 16, 8, 8) and torch.isfinite(out).all() and out.abs().sum() > 0


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_perflow_sampler_is_the_models_own_euler_step(models, family):
    m = perflow(models[family])
    a, b = ksampler(m, family, empty_latent(), sampler="euler"), ksampler(m, family, empty_latent())
    torch.testing.assert_close(a, b, atol=1e-5 * max(1.0, a.abs().max().item()), rtol=0)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_sampler_custom_advanced_with_the_perflow_nodes(models, family):
    m = perflow(models[family])
    positive, _ = conds(family)
    with recording(m) as calls:
        out = comfy_env.call(
            "SamplerCustomAdvanced",
            noise=comfy_env.call("RandomNoise", noise_seed=SEED)[0],
            guider=comfy_env.call("BasicGuider", model=m, conditioning=positive)[0],
            sampler=comfy_env.call("PeRFlowSampler")[0],
            sigmas=comfy_env.call("PeRFlowScheduler", model=m, steps=STEPS, denoise=1.0)[0],
            latent_image=empty_latent(),
        )[0]["samples"]
    expected = flow_sigmas(STEPS, 4, SHIFT[family])[:-1] * MULTIPLIER[family]
    torch.testing.assert_close(torch.tensor([c[0][0] for c in calls]), expected, atol=1e-3, rtol=1e-5)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_img2img_starts_on_the_straight_segment_of_the_flow_schedule(models, family):
    import comfy.sample

    base = models[family].model
    latent = {"samples": torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(7))}
    m = perflow(models[family])
    with recording(m) as calls:
        out = ksampler(m, family, latent, denoise=0.5)
    sigmas = flow_sigmas(STEPS, 4, SHIFT[family], denoise=0.5)
    expected = sigmas[:-1] * MULTIPLIER[family]
    torch.testing.assert_close(torch.tensor([c[0][0] for c in calls]), expected, atol=1e-3, rtol=1e-5)
    s = sigmas[0]
    noise = comfy.sample.prepare_noise(latent["samples"], SEED)
    start = s * noise + (1 - s) * base.process_latent_in(latent["samples"])  # x_s = (1 - s) x0 + s eps
    torch.testing.assert_close(calls[0][3], start, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("schedule,batches", [("4,1,1,1", [2, 1, 1, 1]), ("3", [2, 2, 2, 2]), ("1,2", [1, 2, 2, 2])])
def test_cfg_schedule_drives_sd3s_real_cfg_per_window(models, schedule, batches):
    scheduled = comfy_env.call(
        "PeRFlowCFGSchedule", model=perflow(models["sd3"]), mode="list", cfg_list=schedule, ramp_start=1.0,
        ramp_end=1.0,
    )[0]  # fmt: skip
    with recording(scheduled) as calls:
        out = ksampler(scheduled, "sd3", empty_latent(), cfg=5.0)
    assert [c[1] for c in calls] == batches
    expected = flow_sigmas(STEPS, 4, SHIFT["sd3"])[:-1] * 1000
    torch.testing.assert_close(torch.tensor([c[0][0] for c in calls]), expected, atol=1e-3, rtol=1e-5)
    assert torch.isfinite(out).all()


def test_flux_distilled_guidance_is_kept_in_every_window(models):
    scheduled = comfy_env.call(
        "PeRFlowCFGSchedule", model=perflow(models["flux"]), mode="list", cfg_list="1", ramp_start=1.0, ramp_end=1.0
    )[0]
    positive, negative = conds("flux")
    positive = comfy_env.call("FluxGuidance", conditioning=positive, guidance=2.5)[0]
    with recording(scheduled) as calls:
        out = comfy_env.call(
            "KSampler", model=scheduled, seed=SEED, steps=STEPS, cfg=6.0, sampler_name="perflow",
            scheduler="perflow", positive=positive, negative=negative, latent_image=empty_latent(), denoise=1.0,
        )[0]["samples"]  # fmt: skip
    assert [c[1] for c in calls] == [1] * STEPS  # the schedule's 1.0 overrides cfg 6: one pass, no negative
    assert [c[2] for c in calls] == [[2.5]] * STEPS
    assert torch.isfinite(out).all()


def test_velocity_is_required_on_a_flow_model(models):
    with pytest.raises(ValueError, match="parameterization to velocity"):
        comfy_env.call("PeRFlowModelSampling", model=models["sd3"], parameterization="diff_eps", num_windows=4)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_scheduler_refuses_a_flow_model_without_perflow(models, family):
    with pytest.raises(ValueError, match="PeRFlow Model Sampling"):
        comfy_env.call("PeRFlowScheduler", model=models[family], steps=4, denoise=1.0)
    with pytest.raises(Exception, match="PeRFlow Model Sampling"):
        ksampler(models[family], family, empty_latent())


def test_a_model_sampling_node_after_perflow_is_refused_naming_the_order(models):
    after = comfy_env.call("ModelSamplingSD3", model=perflow(models["sd3"]), shift=3.0)[0]
    with pytest.raises(ValueError, match="ModelSamplingSD3, ModelSamplingFlux, ...\\) before the PeRFlow node"):
        comfy_env.call("PeRFlowScheduler", model=after, steps=4, denoise=1.0)
