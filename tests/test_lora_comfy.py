"""training/lora.py on ComfyUI's own UNet (skips without COMFYUI_PATH): the adapted layers are the published
script's, and a LoRA written by kohya_state_dict + write_lora is applied identically by the stock
LoraLoaderModelOnly and the PeRFlow Delta Loader, as base + merged_delta."""

import copy

import pytest
import torch

import checkpoints
import comfy_env
from training.export import write_lora
from training.lora import (
    COMFY_UNET_PREFIX,
    COMFY_UNET_TARGETS,
    add_adapters,
    base_state_dict,
    kohya_state_dict,
    lora_layers,
    merged_delta,
    target_names,
)

# target_modules of the published training script (scripts/perflow_accelerate_sd.py, --lora_rank), diffusers names
PUBLISHED_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
    "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)  # fmt: skip


ATOL = 1e-4  # the weights are patched in fp16 (about 3e-5 apart near 0.05), the LoRA factors are fp16


@pytest.fixture(scope="module")
def comfy():
    comfy_env.require_comfyui()
    comfy_env.setup_comfyui()
    comfy_env.load_pack()


@pytest.mark.parametrize("family", checkpoints.FAMILIES)
def test_adapted_layers_are_the_published_target_modules(comfy, family):
    """peft's suffix match of the published names on the diffusers UNet, carried to ComfyUI names by ComfyUI's own
    unet_to_diffusers table, picks exactly the layers COMFY_UNET_TARGETS picks."""
    import comfy.ops
    import comfy.utils
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    config = checkpoints.unet_config(family)
    unet = UNetModel(**config, operations=comfy.ops.disable_weight_init, device="meta")
    weights = unet.state_dict()
    published = {
        ldm.removesuffix(".weight")
        for diffusers, ldm in comfy.utils.unet_to_diffusers(config).items()
        if ldm in weights
        and diffusers.endswith(".weight")
        and any(("." + diffusers.removesuffix(".weight")).endswith("." + t) for t in PUBLISHED_TARGETS)
    }
    assert published and set(target_names(unet, COMFY_UNET_TARGETS)) == published


def test_stock_lora_loader_and_delta_loader_apply_our_lora_alike(comfy, tmp_path):
    """Random adapters on the tiny SD1.5 UNet, exported as a kohya LoRA with PeRFlow metadata: the stock
    LoraLoaderModelOnly and the PeRFlow Delta Loader give identical patched UNet weights, equal to base + dW."""
    import comfy.sd

    model = comfy.sd.load_checkpoint_guess_config(
        str(checkpoints.checkpoint_path("sd15")), output_vae=False, output_clip=False
    )[0]
    unet = copy.deepcopy(model.model.diffusion_model)
    add_adapters(unet, rank=4, alpha=2.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora_layers(unet).values():
            w = layer.lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.5)
    base = {COMFY_UNET_PREFIX + k: v.float() for k, v in base_state_dict(unet).items()}
    delta = merged_delta(unet, key_prefix=COMFY_UNET_PREFIX)
    lora = kohya_state_dict(unet, key_prefix=COMFY_UNET_PREFIX)
    meta = {"parameterization": "velocity", "num_windows": "6", "base_architecture": "sd15", "base_hash": "0" * 64}
    write_lora(tmp_path / "lora.safetensors", lora, meta)
    name = comfy_env.add_model_file("loras", tmp_path / "lora.safetensors", "perflow-test-trained-lora.safetensors")

    (stock,) = comfy_env.call("LoraLoaderModelOnly", model=model, lora_name=name, strength_model=1.0)
    ours, summary = comfy_env.call(
        "PeRFlowDeltaLoader", model=model, delta_name="loras/" + name, strength=1.0,
        parameterization="velocity", num_windows=6,
    )  # fmt: skip
    assert f"SD1.5 model; {len(delta)} weights patched" in summary
    patched = {}
    for label, patcher in (("stock", stock), ("ours", ours)):
        patcher.patch_model()
        patched[label] = {k: v.float().clone() for k, v in patcher.model.state_dict().items() if k in base}
        patcher.unpatch_model()
    assert len(delta) == 65  # every adapted layer of the tiny SD1.5 UNet is in the file
    assert min(d.abs().max().item() for d in delta.values()) > 100 * ATOL  # the check below can see a lost delta
    for k in base:
        torch.testing.assert_close(patched["ours"][k], patched["stock"][k], atol=0, rtol=0, msg=k)
        expected = base[k] + delta[k] if k in delta else base[k]
        torch.testing.assert_close(patched["stock"][k], expected, atol=ATOL, rtol=1e-3, msg=k)
