"""Random-weight SD1.5 / SD2.1 / SDXL checkpoints built with ComfyUI's own modules, for integration tests.

Needs ComfyUI importable (see tests/comfy_env.py); comfy is imported inside functions only.
The UNets are shrunk as far as ComfyUI's model detection allows; the VAE and text encoders are full size,
because their configs are fixed at detection time. Every key is written: ComfyUI loads with strict=False and
leaves missing parameters as uninitialised memory.
"""

import copy
import hashlib
import json
import os
import tempfile
from pathlib import Path

BUILD_VERSION = 1
CACHE_DIR = Path(os.environ.get("PERFLOW_TEST_CKPT_DIR", os.path.join(tempfile.gettempdir(), "perflow-test-ckpts")))

# Keys as comfy.model_detection.detect_unet_config reports them for the small UNets below.
_COMMON = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}
_SD_TINY = dict(
    _COMMON,
    num_res_blocks=[1],
    channel_mult=[1],
    transformer_depth=[1],
    transformer_depth_output=[1, 1],
    transformer_depth_middle=1,
    adm_in_channels=None,
)
DETECTED_UNET = {
    # SD15 and SD20 constrain only context_dim, model_channels, use_linear_in_transformer and adm_in_channels.
    "sd15": dict(_SD_TINY, context_dim=768, use_linear_in_transformer=False),
    "sd21": dict(_SD_TINY, context_dim=1024, use_linear_in_transformer=True),
    # SDXL pins transformer_depth=[0,0,2,2,10,10] (one entry per input res block): six input res blocks and
    # 24 transformer blocks are unavoidable. Channels stay at 320 and the output/middle depths are cut.
    "sdxl": dict(
        _COMMON,
        num_res_blocks=[2, 2, 2],
        channel_mult=[1, 1, 1],
        transformer_depth=[0, 0, 2, 2, 10, 10],
        transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1],
        transformer_depth_middle=1,
        context_dim=2048,
        use_linear_in_transformer=True,
        adm_in_channels=2816,
        num_classes="sequential",
    ),
}
# Full-size layouts, built only on request (not in FAMILIES): AnimateDiff motion modules need SD1.5's real blocks.
FULL_SIZE_UNET = {
    "sd15_full": dict(
        _COMMON,
        num_res_blocks=[2, 2, 2, 2],
        channel_mult=[1, 2, 4, 4],
        transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
        transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1],
        transformer_depth_middle=1,
        adm_in_channels=None,
        context_dim=768,
        use_linear_in_transformer=False,
    ),
}
MODEL_CONFIG_CLASS = {"sd15": "SD15", "sd21": "SD20", "sdxl": "SDXL", "sd15_full": "SD15"}
FAMILIES = tuple(DETECTED_UNET)
_UNETS = DETECTED_UNET | FULL_SIZE_UNET
_VAE_DDCONFIG = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}


def model_config(family: str):
    """ComfyUI's supported_models config object for a family, built from the small UNet config."""
    import comfy.supported_models

    return getattr(comfy.supported_models, MODEL_CONFIG_CLASS[family])(copy.deepcopy(_UNETS[family]))


def unet_config(family: str) -> dict:
    """The unet_config ComfyUI derives for the family's checkpoint (as in model.model.model_config.unet_config)."""
    return model_config(family).unet_config


def _fill(module, gen) -> None:
    """Seeded randn*0.02 for weights, ones for norm weights, zeros for biases."""
    import torch

    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for mod in module.modules():
            for name, p in mod.named_parameters(recurse=False):
                if name == "bias":
                    p.zero_()
                elif isinstance(mod, norms):
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def build_state_dict(family: str, seed: int = 0, dtype: str = "float16") -> dict:
    """Full checkpoint state dict (UNet, VAE, text encoders) in the key layout ComfyUI saves for the family."""
    import comfy.ops
    import torch
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    ops = comfy.ops.disable_weight_init
    cfg = model_config(family)
    gen = torch.Generator().manual_seed(seed)
    unet = UNetModel(**cfg.unet_config, operations=ops)
    vae = AutoencoderKL(ddconfig=_VAE_DDCONFIG, embed_dim=4)
    clip = cfg.clip_target().clip(device="cpu", dtype=torch.float32, model_options={"custom_operations": ops})
    for m in (unet, vae, clip):
        _fill(m, gen)
    sd = cfg.process_unet_state_dict_for_saving(unet.state_dict())
    sd.update(cfg.process_vae_state_dict_for_saving(vae.state_dict()))
    sd.update(cfg.process_clip_state_dict_for_saving(clip.state_dict()))
    target = getattr(torch, dtype)
    return {k: (v.to(target) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}


def checkpoint_path(family: str, seed: int = 0, dtype: str = "float16") -> Path:
    """Path of the cached checkpoint file, building it on first use."""
    from safetensors.torch import save_file

    key = json.dumps([BUILD_VERSION, family, _UNETS[family], seed, dtype], sort_keys=True)
    path = CACHE_DIR / f"tiny-{family}-{dtype}-s{seed}-{hashlib.sha1(key.encode()).hexdigest()[:10]}.safetensors"
    if path.exists():
        return path
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    sd = build_state_dict(family, seed, dtype)
    fd, tmp = tempfile.mkstemp(dir=CACHE_DIR, suffix=".partial")
    os.close(fd)
    save_file(sd, tmp, metadata={"perflow_test": key})
    os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is shared between sessions
    os.replace(tmp, path)
    return path
