"""SDXL plug-and-play in a real ComfyUI (skips without COMFYUI_PATH): a delta extracted from a "merged" PeRFlow
model (random-init tiny SDXL base + a small random dW), applied by the Delta Loader to a different "fine-tune",
gives fine-tune + (merged - base) on every UNet key; the merged model may be LDM- or diffusers-keyed."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import checkpoints
import comfy_env

UNET = "diffusion_model."
CKPT_UNET = "model.diffusion_model."


def base_unet() -> dict[str, torch.Tensor]:
    """The tiny SDXL checkpoint's UNet under model keys ('diffusion_model.*'), fp16 as stored."""
    with safe_open(str(checkpoints.checkpoint_path("sdxl")), "pt") as f:
        return {k.removeprefix("model."): f.get_tensor(k) for k in f.keys() if k.startswith(CKPT_UNET)}


def perturbed(unet: dict[str, torch.Tensor], seed: int, scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (t.float() + scale * torch.randn(t.shape, generator=g)).half() for k, t in sorted(unet.items())}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Paths of the base checkpoint, the merged UNet (LDM and diffusers keys) and the fine-tune UNet."""
    comfy_env.require_comfyui()
    comfy_env.setup_comfyui()
    comfy_env.load_pack()
    import comfy.utils

    tmp = tmp_path_factory.mktemp("extract")
    base = base_unet()
    merged = perturbed(base, 1, 0.01)
    to_diffusers = {UNET + v: k for k, v in comfy.utils.unet_to_diffusers(checkpoints.unet_config("sdxl")).items()}
    paths = {"base": checkpoints.checkpoint_path("sdxl"), "merged_ldm": tmp / "merged_ldm.safetensors"}
    save_file(merged, str(paths["merged_ldm"]))
    paths["merged_diffusers"] = tmp / "merged_diffusers.safetensors"
    save_file({to_diffusers[k]: t for k, t in merged.items()}, str(paths["merged_diffusers"]))
    del merged
    paths["finetune"] = comfy_env.model_dir("diffusion_models") / "finetune-sdxl.safetensors"
    save_file({"model." + k: t for k, t in perturbed(base, 2, 0.05).items()}, str(paths["finetune"]))  # UNETLoader keys
    return paths


def expected(paths) -> dict[str, torch.Tensor]:
    """fine-tune + (merged - base) per model key, fp32, computed from the files."""
    with (
        safe_open(str(paths["finetune"]), "pt") as ft,
        safe_open(str(paths["merged_ldm"]), "pt") as m,
        safe_open(str(paths["base"]), "pt") as b,
    ):
        return {
            k: ft.get_tensor("model." + k).float() + (m.get_tensor(k).float() - b.get_tensor("model." + k).float())
            for k in m.keys()
        }


@pytest.mark.parametrize("merged", ["merged_ldm", "merged_diffusers"])
def test_finetune_plus_extracted_delta_is_finetune_plus_merged_minus_base(files, merged):
    import folder_paths

    from training.extract_delta import main

    out = comfy_env.model_dir("perflow") / f"sdxl-delta-{merged}.safetensors"
    result = main(["--merged", str(files[merged]), "--base", str(files["base"]), "--out", str(out), "--dtype", "fp32"])
    assert (result["architecture"], result["parameterization"], result["num_windows"]) == ("sdxl", "ddim_eps", 4)
    folder_paths.filename_list_cache.clear()
    (finetune,) = comfy_env.call("UNETLoader", unet_name=files["finetune"].name, weight_dtype="default")
    patched, summary = comfy_env.call(
        "PeRFlowDeltaLoader", model=finetune, delta_name=out.name, strength=1.0, parameterization="auto", num_windows=0
    )
    assert "perflow_delta, SDXL file on SDXL model" in summary
    ms = patched.get_model_object("model_sampling")
    assert (ms.parameterization, ms.num_windows) == ("ddim_eps", 4)
    want = expected(files)
    patched.patch_model()
    try:
        got = {k: v for k, v in patched.model_state_dict().items() if k.startswith(UNET)}
        assert set(got) == set(want)
        off = {k: (got[k].float() - want[k]).abs().max().item() for k in want}
    finally:
        patched.unpatch_model()
    assert max(off.values()) <= 1e-6, sorted(off.items(), key=lambda kv: -kv[1])[:3]
