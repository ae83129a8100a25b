"""Random-weight small SD3 (MMDiT) and Flux diffusion models built with ComfyUI's own model classes, saved in the
key layout of a ComfyUI diffusion_models file, so that ComfyUI's own loader (UNETLoader ->
comfy.sd.load_diffusion_model_state_dict -> comfy.model_detection) detects them as SD3 / Flux.

Needs ComfyUI importable (tests/comfy_env.py); comfy is imported inside functions only.

- SD3: ComfyUI derives the MMDiT width from x_embedder (64 per block), so depth 2 gives a 128-wide, 2-block
  model with the SD3.5 Medium features (RMS q/k norm, a self-attention x-block); context 4096 (T5) and pooled
  2048 (CLIP-L + CLIP-G) as the real one. Detection works unchanged.
- Flux: ComfyUI's detection hard-codes Flux's width (hidden_size 3072, 24 heads), so a model of any other width
  cannot be detected as it is. `small_flux_detection()` reads the width from the file (img_in, the q/k norm) while
  it is active; everything else (the depth counts, guidance_embed, Flux's model class, its ModelSamplingFlux with
  the shift 1.15) is ComfyUI's own. The model has one double and one single block, 128 wide, 2 heads.
"""

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

from checkpoints import CACHE_DIR

BUILD_VERSION = 1
# What comfy.model_detection.detect_unet_config reports for the small MMDiT file below.
SD3_SMALL = {
    "in_channels": 16,
    "patch_size": 2,
    "out_channels": 16,
    "depth": 2,
    "input_size": None,
    "adm_in_channels": 2048,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
    "num_patches": 1024,
    "pos_embed_max_size": 32,
    "qk_norm": "rms",
    "pos_embed_scaling_factor": None,
    "x_block_self_attn_layers": [0],
}
FLUX_SMALL = {
    "image_model": "flux",
    "in_channels": 16,
    "patch_size": 2,
    "out_channels": 16,
    "vec_in_dim": 768,
    "context_in_dim": 4096,
    "hidden_size": 128,
    "mlp_ratio": 4.0,
    "num_heads": 2,
    "depth": 1,
    "depth_single_blocks": 1,
    "axes_dim": [8, 28, 28],
    "theta": 10000,
    "qkv_bias": True,
    "guidance_embed": True,
}
FAMILIES = {"sd3": SD3_SMALL, "flux": FLUX_SMALL}
CONFIG_CLASS = {"sd3": "SD3", "flux": "Flux"}
# Conditioning shapes of the real text encoders: (tokens, context width), pooled width.
COND_SHAPES = {"sd3": ((154, 4096), 2048), "flux": ((256, 4096), 768)}


def _fill(module, gen) -> None:
    """Seeded randn*0.02 for weights and buffers, ones for norm weights/scales, zeros for biases."""
    import torch

    with torch.no_grad():
        for mod in module.modules():
            norm = "norm" in type(mod).__name__.lower()
            for name, p in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
                if not p.is_floating_point():
                    continue
                if name == "bias":
                    p.zero_()
                elif norm or name == "scale":
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def build_state_dict(family: str, seed: int = 0) -> dict:
    """The diffusion model's state dict, keys as in a ComfyUI diffusion_models file (no prefix), float32."""
    import comfy.ldm.flux.model
    import comfy.ops
    import torch
    from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper

    ops = comfy.ops.disable_weight_init
    gen = torch.Generator().manual_seed(seed)
    if family == "sd3":
        net = OpenAISignatureMMDITWrapper(**SD3_SMALL, operations=ops)
    else:
        net = comfy.ldm.flux.model.Flux(**FLUX_SMALL, operations=ops)
    _fill(net, gen)
    return {k: v.contiguous() for k, v in net.state_dict().items()}


def model_path(family: str, seed: int = 0) -> Path:
    """Path of the cached diffusion-model file, built on first use (a few MB)."""
    from safetensors.torch import save_file

    key = json.dumps([BUILD_VERSION, family, FAMILIES[family], seed], sort_keys=True)
    path = CACHE_DIR / f"small-{family}-s{seed}-{hashlib.sha1(key.encode()).hexdigest()[:10]}.safetensors"
    if path.exists():
        return path
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    sd = build_state_dict(family, seed)
    fd, tmp = tempfile.mkstemp(dir=CACHE_DIR, suffix=".partial")
    os.close(fd)
    save_file(sd, tmp, metadata={"perflow_test": key})
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


@contextlib.contextmanager
def small_flux_detection():
    """While active, ComfyUI's Flux detection takes width, heads and rotary axes from the file instead of the
    full-size constants (hidden 3072, 24 heads); the only deviation from stock loading (see the module doc)."""
    import comfy.model_detection as md

    original = md.detect_unet_config

    def detect(state_dict, key_prefix, metadata=None):
        cfg = original(state_dict, key_prefix, metadata=metadata)
        img_in = state_dict.get(f"{key_prefix}img_in.weight")
        if cfg is not None and cfg.get("image_model") == "flux" and img_in is not None:
            head = state_dict[f"{key_prefix}double_blocks.0.img_attn.norm.key_norm.scale"].shape[0]
            hidden = img_in.shape[0]
            rope = head // 8  # Flux: [16, 56, 56] for 128-wide heads; [8, 28, 28] for 64
            cfg.update(
                hidden_size=hidden,
                num_heads=hidden // head,
                axes_dim=[rope, (head - rope) // 2, (head - rope) // 2],
                context_in_dim=state_dict[f"{key_prefix}txt_in.weight"].shape[1],
            )
        return cfg

    md.detect_unet_config = detect
    try:
        yield
    finally:
        md.detect_unet_config = original


def conditioning(family: str, batch: int = 1, seed: int = 0, guidance: float | None = None) -> list:
    """A CONDITIONING of the real text encoders' shapes (random values): (context, pooled_output[, guidance])."""
    import torch

    (tokens, width), pooled = COND_SHAPES[family]
    gen = torch.Generator().manual_seed(seed)
    extra = {"pooled_output": torch.randn(batch, pooled, generator=gen)}
    if guidance is not None:
        extra["guidance"] = guidance
    return [[torch.randn(batch, tokens, width, generator=gen), extra]]


def load_model(family: str, seed: int = 0):
    """The family's small model as ComfyUI's UNETLoader node loads it (ComfyUI set up by comfy_env)."""
    import comfy_env

    name = comfy_env.add_model_file("diffusion_models", model_path(family, seed))
    with small_flux_detection():
        model = comfy_env.call("UNETLoader", unet_name=name, weight_dtype="default")[0]
    if type(model.model.model_config).__name__ != CONFIG_CLASS[family]:
        raise RuntimeError(f"ComfyUI detected {type(model.model.model_config).__name__}, not {CONFIG_CLASS[family]}")
    return model
