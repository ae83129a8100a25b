"""The PeRFlow Delta Loader on rectified-flow models inside a real ComfyUI (skips without COMFYUI_PATH): PeRFlow
deltas and kohya LoRAs with time_kind flow for the small SD3 / Flux models of tests/flow_checkpoints.py change the
weights as written (the LoRA exactly as stock LoraLoaderModelOnly), keep the model's own model sampling with the
file's windows, report a shift that differs from the trained one, and a flow file on an SD model (and the reverse)
is refused with nothing applied."""

import math
import re
import sys
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import save_file

import comfy_env
from perflow_core.delta_format import DeltaMetadata, save_delta
from perflow_core.flow_windows import flow_sigmas

UNET = "diffusion_model."
SHIFT = {"sd3": 3.0, "flux": math.exp(1.15)}  # the shift of each model's own model sampling
NAMES = {"sd3": "SD3 (MMDiT)", "flux": "Flux"}


@pytest.fixture(scope="module")
def loader():
    comfy_env.require_comfyui()
    comfy_env.setup_comfyui()
    comfy_env.load_pack()
    import nodes

    module = sys.modules[nodes.NODE_CLASS_MAPPINGS["PeRFlowDeltaLoader"].__module__]
    module.register_folder()
    return module


@pytest.fixture(scope="module", params=["sd3", "flux"])
def flow(request, loader):
    """(family, model loaded by UNETLoader, a copy of its transformer weights)."""
    import flow_checkpoints as fc

    model = fc.load_model(request.param)
    return request.param, model, {k: v.detach().clone() for k, v in weights(model).items()}


def weights(patcher) -> dict[str, torch.Tensor]:
    return {k: v for k, v in patcher.model_state_dict().items() if k.startswith(UNET)}


@contextmanager
def weights_as_run(patcher):
    """The transformer weights ComfyUI actually runs: patch the shared model, yield a copy, restore."""
    patcher.patch_model()
    try:
        yield {k: v.detach().clone() for k, v in weights(patcher).items()}
    finally:
        patcher.unpatch_model()


def flow_metadata(family: str, fmt: str = "delta", shift: float | None = None) -> DeltaMetadata:
    return DeltaMetadata(
        "velocity", 4, family, "0" * 64, time_kind="flow", flow_shift=shift or SHIFT[family], format=fmt
    )


def buffers(model) -> set[str]:
    """Model keys of the transformer's buffers (SD3's pos_embed), which a trained delta leaves at zero."""
    return {UNET + k for k, _ in model.model.diffusion_model.named_buffers()}


def delta_file(family: str, w: dict, model, shift: float | None = None, buffer_dw: float = 0.0) -> tuple[str, dict]:
    """A PeRFlow delta (time_kind flow) for every transformer key, in models/perflow, as the trainer writes it
    (zero for buffers unless buffer_dw): (name, dW by model key)."""
    g = torch.Generator().manual_seed(5)
    fixed = buffers(model)
    dw = {k: (buffer_dw if k in fixed else 0.01) * torch.randn(v.shape, generator=g) for k, v in w.items()}
    name = f"flow-{family}-delta-{shift or SHIFT[family]:g}-{buffer_dw:g}.safetensors"
    meta = flow_metadata(family, shift=shift)
    save_delta(
        comfy_env.model_dir("perflow") / name,
        {k.removeprefix(UNET): t for k, t in dw.items()},
        parameterization="velocity",
        num_windows=4,
        base_architecture=family,
        base_hash=meta.base_hash,
        extra={"time_kind": "flow", "flow_shift": str(meta.flow_shift)},
    )
    return name, dw


def kohya_lora(w: dict, seed: int = 3) -> dict:
    """A rank-4 kohya LoRA (lora_unet_<key>) for every matrix and conv weight."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for k, v in w.items():
        if v.ndim < 2 or not k.endswith(".weight"):
            continue
        name = "lora_unet_" + k.removeprefix(UNET).removesuffix(".weight").replace(".", "_")
        tail = (1,) * (v.ndim - 2)
        lora[f"{name}.lora_down.weight"] = 0.1 * torch.randn((4, *v.shape[1:]), generator=g)
        lora[f"{name}.lora_up.weight"] = 0.1 * torch.randn((v.shape[0], 4, *tail), generator=g)
        lora[f"{name}.alpha"] = torch.tensor(2.0)
    return lora


def diffusers_lora(model, seed: int = 7) -> dict:
    """A rank-4 diffusers/peft LoRA (transformer.<diffusers module>.lora_A/lora_B) for every matrix ComfyUI's own
    key map reaches from a diffusers name, q/k/v slices of the fused qkv weights included."""
    import comfy.lora

    shapes = {k: tuple(v.shape) for k, v in model.model_state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for name, target in comfy.lora.model_lora_keys_unet(model.model, {}).items():
        key, offset = (target, None) if isinstance(target, str) else target[:2]
        if not name.startswith("transformer.") or len(shapes.get(key, ())) != 2:
            continue  # (the map also names layers this small model lacks, e.g. SD3.5's attn2 of every block)
        out, inp = shapes[key]
        out = offset[2] if offset is not None else out
        lora[f"{name}.lora_A.weight"] = 0.1 * torch.randn(4, inp, generator=g)
        lora[f"{name}.lora_B.weight"] = 0.1 * torch.randn(out, 4, generator=g)
    return lora


def load(model, name, strength=1.0, parameterization="auto"):
    return comfy_env.call(
        "PeRFlowDeltaLoader", model=model, delta_name=name, strength=strength, parameterization=parameterization,
        num_windows=0,
    )  # fmt: skip


def test_perflow_delta_patches_w_plus_s_dw_and_keeps_the_models_sampling(flow):
    import comfy.model_sampling

    family, model, w = flow
    name, dw = delta_file(family, w, model)
    out, summary = load(model, name, 0.5)
    n = len(w) - len(buffers(model))
    assert f"perflow_delta, {NAMES[family]} file on {NAMES[family]} model; {n} weights patched" in summary
    assert "parameterization velocity, 4 windows" in summary and "flow model sampling at shift" in summary
    assert "trained at flow shift" not in summary  # same shift: nothing to report
    with weights_as_run(out) as got:
        off = [k for k in w if not torch.allclose(got[k], w[k] + 0.5 * dw[k], atol=1e-6, rtol=0)]
    assert not off, off[:3]
    ms = out.get_model_object("model_sampling")
    assert isinstance(ms, comfy.model_sampling.CONST) and ms.perflow_num_windows == 4
    sigmas = comfy_env.call("PeRFlowScheduler", model=out, steps=4, denoise=1.0)[0]
    torch.testing.assert_close(sigmas, flow_sigmas(4, 4, SHIFT[family]), atol=1e-6, rtol=0)
    assert not model.patches and all(torch.equal(v, w[k]) for k, v in weights(model).items())


def test_kohya_lora_matches_stock_lora_loader(flow, tmp_path):
    family, model, w = flow
    lora = kohya_lora(w)
    path = tmp_path / f"perflow-{family}-lora.safetensors"
    save_file(lora, str(path), metadata=flow_metadata(family, "lora").to_metadata())
    name = comfy_env.add_model_file("loras", path)
    ours, summary = load(model, "loras/" + name, 0.7)
    (stock,) = comfy_env.call("LoraLoaderModelOnly", model=model, lora_name=name, strength_model=0.7)
    n = len(lora) // 3
    assert f"kohya_lora, {NAMES[family]} file on {NAMES[family]} model; {n} weights patched" in summary
    with weights_as_run(ours) as got, weights_as_run(stock) as want:
        differ = [k for k in w if not torch.equal(got[k], want[k])]
    assert not differ, differ[:3]
    assert sum(not torch.equal(got[k], w[k]) for k in w) == n
    assert ours.get_model_object("model_sampling").perflow_num_windows == 4


def test_diffusers_lora_matches_stock_lora_loader(flow, tmp_path):
    family, model, w = flow
    lora = diffusers_lora(model)
    path = tmp_path / f"perflow-{family}-diffusers-lora.safetensors"
    save_file(lora, str(path), metadata=flow_metadata(family, "lora").to_metadata())
    name = comfy_env.add_model_file("loras", path)
    ours, summary = load(model, "loras/" + name, 0.7)
    (stock,) = comfy_env.call("LoraLoaderModelOnly", model=model, lora_name=name, strength_model=0.7)
    assert f"diffusers_lora, {NAMES[family]} file on {NAMES[family]} model; {len(lora) // 2} weights patched" in summary
    with weights_as_run(ours) as got, weights_as_run(stock) as want:
        differ = [k for k in w if not torch.equal(got[k], want[k])]
        changed = [k for k in w if not torch.equal(got[k], w[k])]
    assert not differ, differ[:3]
    assert any(k.endswith("qkv.weight") for k in changed) and len(changed) > 10
    assert ours.get_model_object("model_sampling").perflow_num_windows == 4


@pytest.mark.parametrize("flow", ["sd3"], indirect=True)
def test_a_diffusers_lora_for_another_model_is_refused(loader, flow, tmp_path):
    family, model, _ = flow
    lora = diffusers_lora(model)
    lora = {k: torch.cat([t, t]) if k.endswith("lora_B.weight") else t for k, t in lora.items()}  # twice as wide
    path = tmp_path / "perflow-wide-diffusers-lora.safetensors"
    save_file(lora, str(path), metadata=flow_metadata(family, "lora").to_metadata())
    name = comfy_env.add_model_file("loras", path)
    with pytest.raises(loader.DeltaFileError, match="differ in shape"):
        load(model, "loras/" + name)
    assert not model.patches


@pytest.mark.parametrize("flow", ["sd3"], indirect=True)
def test_a_shift_other_than_the_trained_one_is_reported_with_the_fix(flow):
    family, model, w = flow
    name, _ = delta_file(family, w, model)
    shifted = comfy_env.call("ModelSamplingSD3", model=model, shift=2.0)[0]
    out, summary = load(shifted, name)
    assert "trained at flow shift 3 but this model samples at shift 2" in summary
    assert "ModelSamplingSD3 with shift 3" in summary
    sigmas = comfy_env.call("PeRFlowScheduler", model=out, steps=4, denoise=1.0)[0]
    torch.testing.assert_close(sigmas, flow_sigmas(4, 4, 2.0), atol=1e-6, rtol=0)


@pytest.mark.parametrize("flow", ["sd3"], indirect=True)
def test_a_change_to_a_buffer_comfyui_cannot_patch_is_refused(loader, flow):
    family, model, w = flow
    name, _ = delta_file(family, w, model, buffer_dw=0.01)
    with pytest.raises(loader.DeltaFileError, match="pos_embed, a fixed buffer"):
        load(model, name)
    assert not model.patches


@pytest.mark.parametrize("flow", ["sd3"], indirect=True)
def test_an_sd_family_file_on_a_flow_model_is_refused(loader, flow):
    family, model, w = flow
    dw = {"input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 768)}
    save_delta(
        comfy_env.model_dir("perflow") / "sd15-on-flow.safetensors", dw, parameterization="diff_eps", num_windows=4,
        base_architecture="sd15", base_hash="0" * 64,
    )  # fmt: skip
    with pytest.raises(loader.DeltaFileError, match="Stable Diffusion family .*SD1.5.* rectified-flow") as e:
        load(model, "sd15-on-flow.safetensors")
    assert "train a PeRFlow LoRA for this model (python -m training.train --backend comfy" in str(e.value)
    assert not model.patches


def test_a_flow_file_on_an_sd_model_is_refused(loader, flow):
    family, model, w = flow
    import checkpoints

    name, _ = delta_file(family, w, model)
    ckpt = comfy_env.add_model_file("checkpoints", checkpoints.checkpoint_path("sd15"))
    sd15 = comfy_env.call("CheckpointLoaderSimple", ckpt_name=ckpt)[0]
    with pytest.raises(
        loader.DeltaFileError, match=f"rectified-flow .*{re.escape(NAMES[family])}.*SD1.5, a diffusion model"
    ):
        load(sd15, name)
    with pytest.raises(loader.DeltaFileError, match=re.escape(f"connect the {NAMES[family]} model it was trained for")):
        load(sd15, name, parameterization="velocity")
    assert not sd15.patches


@pytest.mark.parametrize("flow", ["sd3"], indirect=True)
def test_four_step_sampling_through_the_loader_with_real_cfg(flow):
    import flow_checkpoints as fc

    family, model, w = flow
    name, _ = delta_file(family, w, model)
    out = load(model, name)[0]
    latent = comfy_env.call("EmptySD3LatentImage", width=64, height=64, batch_size=1)[0]
    samples = comfy_env.call(
        "KSampler", model=out, seed=0, steps=4, cfg=3.0, sampler_name="perflow", scheduler="perflow",
        positive=fc.conditioning(family, seed=1), negative=fc.conditioning(family, seed=2), latent_image=latent,
        denoise=1.0,
    )[0]["samples"]  # fmt: skip
    assert samples.shape == (1, 16, 8, 8) and torch.isfinite(samples).all()
