"""LoRA training with peft: adapters on the layers the published script adapts (SP training script, --lora_rank),
the teacher as the same network with its adapters switched off (one UNet in memory), and the adapters as a kohya
LoRA (`lora_unet_*` keys, as ComfyUI's LoraLoaderModelOnly reads them) or as a merged delta dW.

    names = add_adapters(unet, rank=8, targets=COMFY_UNET_TARGETS)   # in place; base frozen, adapters trainable
    with adapters_disabled(unet):
        teacher_eps = unet(x, ...)                                   # the frozen base
    lora = kohya_state_dict(unet, key_prefix="diffusion_model.")     # lora_unet_<key>.lora_down/lora_up/alpha
    delta = merged_delta(unet, key_prefix="diffusion_model.")        # {"diffusion_model.<key>.weight": dW}

Both conversions take `weights` (an adapter state dict such as an EMA copy) in place of the live adapter tensors.
"""

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

ADAPTER = "default"
KOHYA_PREFIX = "lora_unet_"
KOHYA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")
COMFY_UNET_PREFIX = "diffusion_model."

# The published target_modules (diffusers names, left) as module names of ComfyUI's openaimodel UNet
# (comfy/ldm/modules/diffusionmodules/openaimodel.py, attention.py). Only Linear and Conv2d modules are adapted,
# so an Identity skip_connection or an average-pool Downsample.op is passed over, as diffusers has no layer there.
COMFY_UNET_TARGETS = (
    r"\.attn[12]\.to_[qkv]$",  # to_q, to_k, to_v
    r"\.attn[12]\.to_out\.0$",  # to_out.0
    r"\.proj_(in|out)$",  # proj_in, proj_out (SpatialTransformer)
    r"\.ff\.net\.0\.proj$",  # ff.net.0.proj (GEGLU)
    r"\.ff\.net\.2$",  # ff.net.2
    r"\.in_layers\.2$",  # conv1 (ResBlock)
    r"\.out_layers\.3$",  # conv2
    r"\.skip_connection$",  # conv_shortcut
    r"\.emb_layers\.1$",  # time_emb_proj
    r"\.op$",  # downsamplers.0.conv
    r"\.conv$",  # upsamplers.0.conv
)
# Flow-matching transformers in ComfyUI's names: attention projections and MLPs of every block (the usual SD3 / Flux
# LoRA targets). SD3 / SD3.5 MMDiT: joint blocks' context and x streams (attn2: SD3.5 Medium's extra self-attention).
MMDIT_TARGETS = (
    r"^joint_blocks\.\d+\.(context|x)_block\.attn2?\.(qkv|proj)$",
    r"^joint_blocks\.\d+\.(context|x)_block\.mlp\.fc[12]$",
)
# Flux: double blocks' image and text streams, single blocks' fused qkv+mlp (linear1) and output (linear2).
FLUX_TARGETS = (
    r"^double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)$",
    r"^double_blocks\.\d+\.(img|txt)_mlp\.[02]$",
    r"^single_blocks\.\d+\.linear[12]$",
)
# The same roles in training/toy_model.py's ToyUNet: ResBlock conv1/conv2/skip/emb (time_emb_proj) and the strided
# pool convs (its downsamplers; it upsamples by interpolation and has no attention).
TOY_UNET_TARGETS = (r"\.conv[12]$", r"\.skip$", r"\.emb$", r"^pool[12]$")


def target_names(module: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Names of the Linear / Conv2d submodules whose name matches one of the `targets` regular expressions."""
    patterns = [re.compile(t) for t in targets]
    return [
        name
        for name, m in module.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and any(p.search(name) for p in patterns)
    ]


def add_adapters(
    module: nn.Module,
    rank: int,
    alpha: float | None = None,
    targets: tuple[str, ...] = COMFY_UNET_TARGETS,
    dtype: torch.dtype = torch.float32,
) -> list[str]:
    """Wrap the target layers of `module` in place with peft LoRA adapters of `rank` (scale alpha / rank; alpha
    defaults to rank), freeze every base parameter and leave only the adapters trainable. The adapters start with
    lora_up = 0 (peft's default), so the adapted module computes exactly what the base does. Returns the adapted
    module names. Adapter tensors are kept in `dtype` (float32) whatever the base's dtype."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    alpha = float(rank if alpha is None else alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"LoRA alpha must be a finite positive number, got {alpha!r}")
    if lora_layers(module):
        raise ValueError("the module already holds LoRA adapters")
    names = target_names(module, targets)
    if not names:
        raise ValueError(f"no Linear or Conv2d layer of the {type(module).__name__} matches the LoRA targets {targets}")
    module.requires_grad_(False)
    pattern = "|".join(re.escape(n) for n in names)  # peft full-matches a string target against each module name
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=pattern), module, ADAPTER)
    for layer in lora_layers(module).values():
        for part in (layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]):
            part.to(dtype).requires_grad_(True)
    return names


def lora_layers(module: nn.Module) -> dict[str, LoraLayer]:
    """{module name: peft LoRA layer} of every adapted layer."""
    return {name: m for name, m in module.named_modules() if isinstance(m, LoraLayer)}


@contextmanager
def adapters_disabled(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block the module computes its frozen base (the teacher); afterwards the adapters are back on
    with their requires_grad flags as they were (peft's switch clears them)."""
    layers = list(lora_layers(module).values())
    flags = [(p, p.requires_grad) for layer in layers for p in _adapter_parameters(layer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield module
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, flag in flags:
            p.requires_grad_(flag)


def _adapter_parameters(layer: LoraLayer) -> list[nn.Parameter]:
    return [*layer.lora_A[ADAPTER].parameters(), *layer.lora_B[ADAPTER].parameters()]


def adapter_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under their keys in module.state_dict() (what a checkpoint or an EMA keeps)."""
    return {k: v for k, v in module.state_dict().items() if _is_adapter_key(k)}


def base_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen base weights under their key names before adapters were added (for base_hash and deltas)."""
    return {k.replace(".base_layer.", "."): v for k, v in module.state_dict().items() if not _is_adapter_key(k)}


def _is_adapter_key(key: str) -> bool:
    return ".lora_" in key


def lora_factors(
    module: nn.Module, weights: dict[str, torch.Tensor] | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{base weight key: (up, down, alpha)} of every adapted layer, from `weights` (keys as adapter_state_dict)
    where given, else from the module. Shapes are kohya's: Linear up [out, r], down [r, in]; Conv2d up
    [out, r, 1, 1], down [r, in, k, k]."""
    weights = weights or {}
    out = {}
    for name, layer in lora_layers(module).items():
        up_key, down_key = f"{name}.lora_B.{ADAPTER}.weight", f"{name}.lora_A.{ADAPTER}.weight"
        up = weights.get(up_key, layer.lora_B[ADAPTER].weight).detach()
        down = weights.get(down_key, layer.lora_A[ADAPTER].weight).detach()
        out[f"{name}.weight"] = (up, down, float(layer.lora_alpha[ADAPTER]))
    return out


def lora_product(up: torch.Tensor, down: torch.Tensor, alpha: float, shape: torch.Size) -> torch.Tensor:
    """dW = alpha / rank * up @ down in float32, reshaped to the weight's shape (ComfyUI's and peft's LoRA merge)."""
    rank = down.shape[0]
    return (alpha / rank) * (up.float().flatten(1) @ down.float().flatten(1)).reshape(shape)


def merged_delta(
    module: nn.Module,
    weights: dict[str, torch.Tensor] | None = None,
    key_prefix: str = "",
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """{key_prefix + weight key: dW} in `dtype` for every adapted weight, on the CPU: what --export-delta writes.
    Each dW is computed in float32 and cast at once, so the peak is the result plus one layer."""
    base = base_state_dict(module)
    return {
        key_prefix + key: lora_product(up, down, alpha, base[key].shape).to("cpu", dtype)
        for key, (up, down, alpha) in lora_factors(module, weights).items()
    }


def kohya_name(key: str) -> str:
    """'diffusion_model.input_blocks.1.1.proj_in.weight' -> 'lora_unet_input_blocks_1_1_proj_in' (kohya naming,
    ComfyUI comfy/lora.py model_lora_keys_unet)."""
    stem = key.removeprefix(COMFY_UNET_PREFIX).rsplit(".", 1)[0]
    return KOHYA_PREFIX + stem.replace(".", "_")


def kohya_tensors(
    key: str, up: torch.Tensor, down: torch.Tensor, alpha: float, shape: torch.Size, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """One kohya module for weight `key` of `shape`: up / down (2-D, or already in conv layout) reshaped to kohya's
    layout (conv: up [out, r, 1, 1], down [r, in, k, k]) and cast to `dtype`; alpha as a float32 scalar."""
    rank = down.shape[0]
    if len(shape) == 4:
        up, down = up.reshape(shape[0], rank, 1, 1), down.reshape(rank, *shape[1:])
    name = kohya_name(key)
    return {
        f"{name}.lora_up.weight": up.detach().to(dtype).contiguous(),
        f"{name}.lora_down.weight": down.detach().to(dtype).contiguous(),
        f"{name}.alpha": torch.tensor(float(alpha), dtype=torch.float32),
    }


def kohya_state_dict(
    module: nn.Module,
    weights: dict[str, torch.Tensor] | None = None,
    key_prefix: str = "",
    dtype: torch.dtype = torch.float16,
) -> dict[str, torch.Tensor]:
    """The adapters as a kohya LoRA state dict: `lora_unet_<key_prefix + layer name without 'diffusion_model.',
    dots as underscores>` with .lora_down.weight, .lora_up.weight (in `dtype`) and .alpha (ComfyUI applies
    alpha / rank * up @ down, which is peft's scaling)."""
    base = base_state_dict(module)
    out = {}
    for key, (up, down, alpha) in lora_factors(module, weights).items():
        out |= kohya_tensors(key_prefix + key, up, down, alpha, base[key].shape, dtype)
    return out
