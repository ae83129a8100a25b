"""PeRFlow with AnimateDiff-Evolved in a real ComfyUI (skips without COMFYUI_PATH or ANIMATEDIFF_PATH).

A random-initialised motion module of the real mm_sd_v15_v2 shape (built with AnimateDiff-Evolved's own classes)
runs 16 frames in context windows of 8 on a random full-layout SD1.5 with a PeRFlow delta: every window's UNet call
gets PeRFlow's timesteps with the motion module injected, whichever side of PeRFlow "Use Evolved Sampling" sits on
with beta_schedule 'use existing'. Its default 'autoselect' is refused on either side, naming that setting.
"""

import hashlib
import itertools
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import checkpoints
import comfy_env
from perflow_core.delta_format import save_delta
from perflow_core.sampling_guard import table_name

FRAMES, WINDOW, OVERLAP, STEPS, CFG, SEED = 16, 8, 4, 4, 2.0, 7
PERFLOW_T = [1000.0, 750.0, 500.0, 250.0]
MM_NAME = "mm_sd_v15_v2-random.safetensors"


def ade_module(suffix: str):
    """An AnimateDiff-Evolved module as ComfyUI imported it (custom_nodes/ComfyUI-AnimateDiff-Evolved/...)."""
    return next(m for n, m in list(sys.modules.items()) if n.endswith("AnimateDiff-Evolved.animatediff." + suffix))


def motion_module_file() -> Path:
    """A random-initialised AnimateDiff v2 motion module for SD1.5 (mm_sd_v15_v2's keys and shapes), cached.

    AnimateDiffModel derives its layout from a few keys: down_blocks 0-3 (SD1.5), up_blocks, a mid_block (v2), two
    temporal self-attention blocks per transformer and a positional encoding of length 32 (v2)."""
    mm = ade_module("motion_module_ad")
    path = checkpoints.CACHE_DIR / "random-mm_sd_v15_v2-s0.safetensors"
    if path.exists():
        return path
    from safetensors.torch import save_file

    block = "motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks"
    layout = {
        f"down_blocks.3.{block}.1.pos_encoder.pe": torch.zeros(1, 32, 1280),
        f"up_blocks.0.{block}.0.to_q.weight": torch.zeros(1),
        f"mid_block.{block}.0.to_q.weight": torch.zeros(1),
    }
    info = mm.AnimateDiffInfo(sd_type="SD1.5", mm_format="AnimateDiff", mm_version="v2", mm_name=MM_NAME)
    model = mm.AnimateDiffModel(layout, info)
    checkpoints._fill(model, torch.Generator().manual_seed(0))
    sd = {k: v.half().contiguous() for k, v in model.state_dict().items()}
    assert len([k for k in sd if k.endswith("pos_encoder.pe")]) == 21 * 2 and sd[
        f"down_blocks.0.{block}.0.pos_encoder.pe"
    ].shape == (1, 32, 320)
    checkpoints.CACHE_DIR.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=checkpoints.CACHE_DIR, suffix=".partial")
    os.close(fd)
    save_file(sd, tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def partial_delta(ckpt: Path) -> str:
    """A PeRFlow delta (diff_eps, 4 windows) over every cross-attention key/value weight, in models/perflow."""
    g = torch.Generator().manual_seed(3)
    with safe_open(str(ckpt), "pt") as f:
        keys = [k for k in f.keys() if k.startswith("model.diffusion_model.") and ".attn2.to_" in k]
        dw = {k.removeprefix("model."): 0.01 * torch.randn(f.get_slice(k).get_shape(), generator=g) for k in keys}
    name = "perflow-sd15-partial.safetensors"
    save_delta(
        comfy_env.model_dir("perflow") / name, dw, parameterization="diff_eps", num_windows=4,
        base_architecture="sd15", base_hash=hashlib.sha256(b"random").hexdigest(),
    )  # fmt: skip
    return name


@pytest.fixture(scope="module")
def setup():
    """(model, clip, motion model, context options, delta name): ComfyUI with this pack and AnimateDiff-Evolved."""
    comfy_env.require_comfyui()
    comfy_env.require_animatediff()
    comfy_env.setup_comfyui()
    comfy_env.load_pack()
    comfy_env.load_animatediff()
    import folder_paths

    ckpt = checkpoints.checkpoint_path("sd15_full")
    ade_dir = comfy_env.model_dir("animatediff_models")  # the temporary one, not AnimateDiff-Evolved's own folder
    if not (ade_dir / MM_NAME).exists():
        (ade_dir / MM_NAME).symlink_to(motion_module_file())
    sys.modules[comfy_env.node("PeRFlowDeltaLoader").__module__].register_folder()
    delta = partial_delta(ckpt)
    folder_paths.filename_list_cache.clear()
    model, clip = comfy_env.call("CheckpointLoaderSimple", ckpt_name=comfy_env.add_model_file("checkpoints", ckpt))[:2]
    (motion,) = comfy_env.call("ADE_LoadAnimateDiffModel", model_name=MM_NAME)
    (context,) = comfy_env.call(
        "ADE_StandardUniformContextOptions", context_length=WINDOW, context_stride=1, context_overlap=OVERLAP
    )
    return model, clip, motion, context, delta


def evolved(model, setup, beta_schedule: str):
    _, _, motion, context, _ = setup
    (m_models,) = comfy_env.call("ADE_ApplyAnimateDiffModelSimple", motion_model=motion)
    (out,) = comfy_env.call(
        "ADE_UseEvolvedSampling", model=model, beta_schedule=beta_schedule, m_models=m_models, context_options=context
    )
    return out


def perflow_delta(model, setup):
    return comfy_env.call(
        "PeRFlowDeltaLoader", model=model, delta_name=setup[4], strength=1.0, parameterization="auto", num_windows=0
    )[0]


def build(setup, order: str, beta_schedule: str):
    """The model a video workflow samples with: the Delta Loader and Use Evolved Sampling in the given order."""
    model = setup[0]
    if order == "perflow_first":
        return evolved(perflow_delta(model, setup), setup, beta_schedule)
    return perflow_delta(evolved(model, setup, beta_schedule), setup)


def recording(model):
    """A clone that records, per UNet call: timesteps, batch, the context window's frames, motion module injected."""
    import comfy.patcher_extension

    calls = []

    def record(executor, x, timesteps, *args, **kwargs):
        opts = kwargs.get("transformer_options", args[3] if len(args) > 3 else {})  # (context, y, control, opts)
        unet = executor.class_obj
        injected = any(type(m).__name__ == "VanillaTemporalModule" for m in unet.input_blocks.modules())
        sub_idxs = opts.get("ad_params", {}).get("sub_idxs")
        calls.append({"t": timesteps.tolist(), "batch": x.shape[0], "frames": sub_idxs, "motion": injected})
        return executor(x, timesteps, *args, **kwargs)

    m = model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "perflow_test_record", record)
    return m, calls


def ksampler(model, clip, sampler="perflow", scheduler="perflow"):
    positive = comfy_env.call("CLIPTextEncode", clip=clip, text="a bird flapping its wings")[0]
    negative = comfy_env.call("CLIPTextEncode", clip=clip, text="blurry")[0]
    latent = comfy_env.call("EmptyLatentImage", width=64, height=64, batch_size=FRAMES)[0]
    return comfy_env.call(
        "KSampler", model=model, seed=SEED, steps=STEPS, cfg=CFG, sampler_name=sampler, scheduler=scheduler,
        positive=positive, negative=negative, latent_image=latent, denoise=1.0,
    )[0]["samples"]  # fmt: skip


def test_animatediff_tables_are_the_ones_the_guard_names(setup):
    """The guard's AnimateDiff tables equal AnimateDiff-Evolved's own model samplings (and its SD one is SD's)."""
    from comfy.model_base import ModelType

    beta = ade_module("utils_model").BetaSchedules
    for alias, want in [
        ("sqrt_linear (AnimateDiff)", "sqrt_linear (AnimateDiff)"),
        ("linear (AnimateDiff-SDXL)", "linear (AnimateDiff-SDXL)"),
        ("linear (HotshotXL/default)", "sd"),
    ]:
        ms = beta._to_model_sampling(alias, ModelType.EPS)
        assert table_name(1 / (1 + ms.sigmas.double() ** 2)) == want, alias


@pytest.mark.parametrize("order", ["perflow_first", "evolved_first"])
def test_every_context_window_gets_perflow_timesteps(setup, order):
    model, calls = recording(build(setup, order, "use existing"))
    out = ksampler(model, setup[1])
    assert out.shape == (FRAMES, 4, 8, 8) and torch.isfinite(out).all()
    steps = [list(g) for _, g in itertools.groupby(calls, key=lambda c: c["t"][0])]  # consecutive calls per step
    assert [s[0]["t"][0] for s in steps] == PERFLOW_T, [(c["t"][0], c["frames"]) for c in calls]
    for step in steps:  # the uniform schedule moves its windows from step to step; together they cover every frame
        assert sorted({f for call in step for f in call["frames"]}) == list(range(FRAMES))
        assert len(step) >= FRAMES // WINDOW
    for call in calls:
        assert len(call["frames"]) == WINDOW
        assert call["t"] == [call["t"][0]] * 2 * WINDOW  # cond and uncond of the window's frames, one PeRFlow t*1000
        assert call["motion"], "the motion module was not injected"


@pytest.mark.parametrize("order", ["perflow_first", "evolved_first"])
def test_autoselect_is_refused_by_the_perflow_scheduler(setup, order):
    model = build(setup, order, "autoselect")
    match = "was replaced" if order == "perflow_first" else "sits on AnimateDiff-Evolved's 'sqrt_linear"
    with pytest.raises(ValueError, match=match) as e:
        ksampler(model, setup[1])
    assert "'use existing'" in str(e.value)


def test_autoselect_after_perflow_is_refused_by_the_perflow_sampler(setup):
    """With a stock scheduler the PeRFlow sampler itself sees that the model sampling in use is not PeRFlow's."""
    model, calls = recording(build(setup, "perflow_first", "autoselect"))
    with pytest.raises(ValueError, match="was replaced.*'use existing'"):
        ksampler(model, setup[1], scheduler="simple")
    assert calls == []  # refused before any UNet call
