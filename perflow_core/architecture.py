"""Which model family a set of UNet weights belongs to, read from the tensor shapes (never from a file's claims)."""

ARCHITECTURES = ("sd15", "sd21", "sdxl", "toy")
# attn2.to_k input width = the text-encoder context size of each family.
CONTEXT_DIM_ARCH = {768: "sd15", 1024: "sd21", 2048: "sdxl"}
ARCH_NAMES = {"sd15": "SD1.5", "sd21": "SD2.1", "sdxl": "SDXL", "toy": "toy", "unknown": "an unknown architecture"}


def guess_architecture(shapes: dict[str, tuple[int, ...]]) -> str:
    """'sd15', 'sd21' or 'sdxl' from the attn2.to_k input width (768/1024/2048); 'unknown' otherwise."""
    for key, shape in shapes.items():
        flat = key.replace("_", ".")
        if "attn2.to.k." in flat and "lora.up" not in flat and key.endswith("weight") and len(shape) == 2:
            return CONTEXT_DIM_ARCH.get(shape[1], "unknown")
    return "unknown"
