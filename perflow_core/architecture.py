"""Which model family a set of diffusion-model weights belongs to, read from the tensor shapes (never from a file's
claims): the SD UNets by their cross-attention width, SD3's MMDiT and Flux by their transformer's own layers."""

ARCHITECTURES = ("sd15", "sd21", "sdxl", "sd3", "flux", "toy")
FLOW_ARCHITECTURES = ("sd3", "flux")  # rectified-flow bases: x_s = (1 - s) x0 + s eps, velocity prediction
# attn2.to_k input width = the text-encoder context size of each family.
CONTEXT_DIM_ARCH = {768: "sd15", 1024: "sd21", 2048: "sdxl"}
ARCH_NAMES = {
    "sd15": "SD1.5",
    "sd21": "SD2.1",
    "sdxl": "SDXL",
    "sd3": "SD3 (MMDiT)",
    "flux": "Flux",
    "toy": "toy",
    "unknown": "an unknown architecture",
}
# The key whose presence marks each transformer in ComfyUI's diffusion-model names (as comfy/model_detection.py).
_MMDIT_MARK = "joint_blocks.0.context_block.attn.qkv.weight"
_FLUX_MARK = "double_blocks.0.img_attn.qkv.weight"


def guess_architecture(shapes: dict[str, tuple[int, ...]]) -> str:
    """'sd15', 'sd21' or 'sdxl' from the attn2.to_k input width (768/1024/2048), 'sd3' or 'flux' from the shapes
    of ComfyUI's MMDiT / Flux keys (any prefix, e.g. diffusion_model.); 'unknown' otherwise."""
    for key, shape in shapes.items():
        if key.endswith(_MMDIT_MARK):
            return "sd3" if _is_mmdit(shapes, key.removesuffix(_MMDIT_MARK), shape) else "unknown"
        if key.endswith(_FLUX_MARK):
            return "flux" if _is_flux(shapes, key.removesuffix(_FLUX_MARK), shape) else "unknown"
        flat = key.replace("_", ".")
        if "attn2.to.k." in flat and "lora.up" not in flat and key.endswith("weight") and len(shape) == 2:
            return CONTEXT_DIM_ARCH.get(shape[1], "unknown")
    return "unknown"


def _is_mmdit(shapes: dict[str, tuple[int, ...]], prefix: str, qkv: tuple[int, ...]) -> bool:
    """SD3 / SD3.5: joint-block qkv [3h, h] and a patch-embedding conv x_embedder.proj [h, 16, p, p] (16 latent
    channels), as ComfyUI's MMDiT names them."""
    if prefix and not prefix.endswith("."):
        return False
    x_embed = shapes.get(prefix + "x_embedder.proj.weight")
    return (
        len(qkv) == 2
        and qkv[0] == 3 * qkv[1]
        and x_embed is not None
        and len(x_embed) == 4
        and (x_embed[0] == qkv[1] and x_embed[1] == 16)
    )


def _is_flux(shapes: dict[str, tuple[int, ...]], prefix: str, qkv: tuple[int, ...]) -> bool:
    """Flux (dev, schnell and their fill/depth/Kontext variants): double-block qkv [3h, h], linear img_in [h, 4c]
    and txt_in [h, context], single blocks and the time_in MLP; Chroma (no time_in), HunyuanVideo (conv img_in) and
    Hunyuan3D (no img_in) share the double blocks but are not Flux."""
    if prefix and not prefix.endswith("."):
        return False
    img_in, txt_in = shapes.get(prefix + "img_in.weight"), shapes.get(prefix + "txt_in.weight")
    hidden = qkv[1] if len(qkv) == 2 and qkv[0] == 3 * qkv[1] else None
    return (
        hidden is not None
        and img_in is not None
        and txt_in is not None
        and len(img_in) == 2
        and len(txt_in) == 2
        and img_in[0] == hidden == txt_in[0]
        and img_in[1] % 4 == 0
        and prefix + "time_in.in_layer.weight" in shapes
        and any(k.startswith(prefix + "single_blocks.") for k in shapes)
    )
