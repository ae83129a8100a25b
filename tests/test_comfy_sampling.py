"""PeRFlow sampling inside a real ComfyUI (skips without COMFYUI_PATH): stock KSampler, SamplerCustomAdvanced,
the CFG schedule's evaluation counts, progress/cancel, img2img, refusals."""

import pytest
import torch

import comfy_env
from perflow_core.noising import straight_line_latent
from perflow_core.parameterization import velocity
from perflow_core.schedule import perflow_sigmas

SEED, STEPS, CFG = 1234, 4, 4.5


@pytest.fixture(scope="module")
def sd15():
    """(model, clip, vae) of a random-initialised small SD1.5 checkpoint, loaded by CheckpointLoaderSimple."""
    comfy_env.require_comfyui()
    comfy_env.setup_comfyui()
    comfy_env.load_pack()
    from checkpoints import checkpoint_path

    name = comfy_env.add_model_file("checkpoints", checkpoint_path("sd15"))
    model, clip, vae = comfy_env.call("CheckpointLoaderSimple", ckpt_name=name)[:3]
    return model, clip, vae


@pytest.fixture(scope="module")
def conds(sd15):
    _, clip, _ = sd15
    positive = comfy_env.call("CLIPTextEncode", clip=clip, text="a photo of a cat")[0]
    negative = comfy_env.call("CLIPTextEncode", clip=clip, text="blurry")[0]
    return positive, negative


def empty_latent(size=64):
    return comfy_env.call("EmptyLatentImage", width=size, height=size, batch_size=1)[0]


def recording(model):
    """A clone of `model` that records (timesteps, batch size) of every UNet call."""
    import comfy.patcher_extension

    calls = []

    def record(executor, x, timesteps, *args, **kwargs):
        calls.append((timesteps.tolist(), x.shape[0]))
        return executor(x, timesteps, *args, **kwargs)

    m = model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "perflow_test_record", record)
    return m, calls


def perflow(model, parameterization="diff_eps", windows=4):
    return comfy_env.call("PeRFlowModelSampling", model=model, parameterization=parameterization, num_windows=windows)[
        0
    ]


def ksampler(model, conds, latent, sampler="perflow", scheduler="perflow", steps=STEPS, cfg=CFG, denoise=1.0):
    positive, negative = conds
    out = comfy_env.call(
        "KSampler", model=model, seed=SEED, steps=steps, cfg=cfg, sampler_name=sampler, scheduler=scheduler,
        positive=positive, negative=negative, latent_image=latent, denoise=denoise,
    )  # fmt: skip
    return out[0]["samples"]


def core_loop(model, conds, latent, parameterization="diff_eps", steps=STEPS, cfg=CFG, denoise=1.0):
    """perflow_core's own loop on the same UNet: CFG on eps (diffusers style), then the published step."""
    import comfy.model_management
    import comfy.sample

    comfy.model_management.load_models_gpu([model])
    base = model.model
    unet = base.diffusion_model
    ac = 1 / (1 + base.model_sampling.sigmas.float() ** 2)
    sigmas = perflow_sigmas(steps, 4, denoise)
    noise = comfy.sample.prepare_noise(latent["samples"], SEED)
    x0 = base.process_latent_in(latent["samples"]) if latent["samples"].abs().sum() > 0 else latent["samples"]
    x = noise if denoise == 1.0 else straight_line_latent(x0, noise, sigmas[0], ac, 4)
    context = torch.cat([c[0][0] for c in conds])  # cond and uncond in one batch, as ComfyUI runs them
    with torch.no_grad():
        for t, t_next in zip(sigmas[:-1], sigmas[1:], strict=True):
            eps_c, eps_u = unet(torch.cat([x, x]), (t * 1000).repeat(2), context=context).float().chunk(2)
            v = velocity(parameterization, eps_u + cfg * (eps_c - eps_u), x, t.reshape(1), ac, 4)
            x = x + (t_next - t) * v
    return base.process_latent_out(x)


def test_stock_ksampler_feeds_perflow_timesteps_and_matches_core_loop(sd15, conds):
    model, _, _ = sd15
    m, calls = recording(perflow(model))
    out = ksampler(m, conds, empty_latent())
    assert [ts for ts, _ in calls] == [[1000.0, 1000.0], [750.0, 750.0], [500.0, 500.0], [250.0, 250.0]]
    torch.testing.assert_close(out, core_loop(model, conds, empty_latent()), atol=1e-4, rtol=1e-4)


def test_stock_euler_equals_perflow_sampler(sd15, conds):
    model, _, _ = sd15
    m = perflow(model)
    a, b = ksampler(m, conds, empty_latent(), sampler="euler"), ksampler(m, conds, empty_latent())
    # Same step in exact arithmetic: euler does x + (x - d)/t * (t_next - t), perflow lerp(x, d, (t - t_next)/t).
    # In float32 each step's formula rounds differently by a few units of eps * |x| (about 4 roundings on values
    # no larger than max|x|), and the next UNet call passes that on, so the gap grows with the step count. Allow
    # 16 eps per step relative to the largest value (CPU, torch 2.14: the gap is ~5 eps * max|x| after 4 steps,
    # 1.8e-4 at max|x| = 326). An error in the step itself (a wrong dt or sign) changes the result by O(|x|).
    tol = 16 * torch.finfo(torch.float32).eps * STEPS * max(a.abs().max().item(), b.abs().max().item())
    torch.testing.assert_close(a, b, atol=tol, rtol=0)


def test_sampler_custom_advanced_with_perflow_nodes(sd15, conds):
    model, _, _ = sd15
    m, calls = recording(perflow(model))
    positive, negative = conds
    noise = comfy_env.call("RandomNoise", noise_seed=SEED)[0]
    guider = comfy_env.call("CFGGuider", model=m, positive=positive, negative=negative, cfg=CFG)[0]
    sampler = comfy_env.call("PeRFlowSampler")[0]
    sigmas = comfy_env.call("PeRFlowScheduler", model=m, steps=STEPS, denoise=1.0)[0]
    out = comfy_env.call(
        "SamplerCustomAdvanced", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas, latent_image=empty_latent()
    )[0]["samples"]
    assert [ts[0] for ts, _ in calls] == [1000.0, 750.0, 500.0, 250.0]
    torch.testing.assert_close(out, core_loop(model, conds, empty_latent()), atol=1e-4, rtol=1e-4)


def test_img2img_denoise_half_starts_on_the_straight_segment(sd15, conds):
    model, _, _ = sd15
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))}
    m, calls = recording(perflow(model))
    out = ksampler(m, conds, latent, denoise=0.5)
    assert [ts[0] for ts, _ in calls] == [500.0, 375.0, 250.0, 125.0]
    torch.testing.assert_close(out, core_loop(model, conds, latent, denoise=0.5), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("schedule,batches", [("7,1,1,1", [2, 1, 1, 1]), ("7", [2, 2, 2, 2]), ("1,3", [1, 2, 2, 2])])
def test_cfg_schedule_skips_uncond_where_scale_is_one(sd15, conds, schedule, batches):
    model, _, _ = sd15
    scheduled = comfy_env.call(
        "PeRFlowCFGSchedule", model=perflow(model), mode="list", cfg_list=schedule, ramp_start=7.0, ramp_end=1.0
    )[0]
    m, calls = recording(scheduled)
    ksampler(m, conds, empty_latent(), cfg=3.0)
    assert [b for _, b in calls] == batches
    positive, negative = conds  # the same counts through SamplerCustom (a plain CFGGuider)
    m, calls = recording(scheduled)
    comfy_env.call(
        "SamplerCustom", model=m, add_noise=True, noise_seed=SEED, cfg=3.0, positive=positive, negative=negative,
        sampler=comfy_env.call("PeRFlowSampler")[0], sigmas=perflow_sigmas(STEPS, 4), latent_image=empty_latent(),
    )  # fmt: skip
    assert [b for _, b in calls] == batches


def test_cfg_schedule_values_reach_the_guidance(sd15, conds):
    model, _, _ = sd15
    scheduled = comfy_env.call(
        "PeRFlowCFGSchedule", model=perflow(model), mode="list", cfg_list="4.5", ramp_start=0, ramp_end=0
    )[0]
    torch.testing.assert_close(
        ksampler(scheduled, conds, empty_latent(), cfg=1.0), ksampler(perflow(model), conds, empty_latent())
    )


def test_progress_reports_every_step_and_cancel_stops_the_run(sd15, conds):
    import comfy.model_management
    import comfy.utils

    model, _, _ = sd15
    seen = []

    def hook(value, total, preview, node_id=None):
        seen.append((value, total))
        if value == 2:
            raise comfy.model_management.InterruptProcessingException()

    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            ksampler(perflow(model), conds, empty_latent())
    finally:
        comfy.utils.set_progress_bar_global_hook(old)
    assert seen == [(1, 4), (2, 4)]


def test_perflow_scheduler_refuses_a_plain_model(sd15, conds):
    model, _, _ = sd15
    with pytest.raises(ValueError, match="PeRFlow Model Sampling"):
        ksampler(model, conds, empty_latent(), sampler="euler")
    with pytest.raises(ValueError, match="PeRFlow Model Sampling"):
        comfy_env.call("PeRFlowScheduler", model=model, steps=4, denoise=1.0)


def test_registration_is_idempotent(sd15):
    import sys

    import comfy.samplers

    sampler_module = next(m for n, m in list(sys.modules.items()) if n.endswith("PeRFlow.nodes.sampler"))
    sampler_module.register_sampler_and_scheduler()
    assert comfy.samplers.SAMPLER_NAMES.count("perflow") == 1
    assert comfy.samplers.SCHEDULER_NAMES.count("perflow") == 1
    assert "perflow" in comfy_env.node("KSampler").INPUT_TYPES()["required"]["sampler_name"][0]


def test_model_sampling_node_leaves_the_input_model_untouched(sd15):
    model, _, _ = sd15
    before = type(model.get_model_object("model_sampling")).__name__
    patched = perflow(model, "velocity", 2)
    assert type(model.get_model_object("model_sampling")).__name__ == before
    ms = patched.get_model_object("model_sampling")
    assert (ms.parameterization, ms.num_windows) == ("velocity", 2)
