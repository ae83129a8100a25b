"""perflow_core.architecture: SD3 (MMDiT) and Flux told from the shapes of ComfyUI's diffusion-model keys."""

import pytest

from perflow_core.architecture import guess_architecture


def mmdit_shapes(hidden: int = 64, prefix: str = "diffusion_model.", context: int = 4096) -> dict:
    """A small SD3-style MMDiT under ComfyUI's names: patch-embedding conv over 16 latent channels, joint blocks."""
    return {
        prefix + "x_embedder.proj.weight": (hidden, 16, 2, 2),
        prefix + "context_embedder.weight": (hidden, context),
        prefix + "joint_blocks.0.context_block.attn.qkv.weight": (3 * hidden, hidden),
        prefix + "joint_blocks.0.x_block.attn.qkv.weight": (3 * hidden, hidden),
        prefix + "final_layer.linear.weight": (64, hidden),
    }


def flux_shapes(hidden: int = 96, prefix: str = "diffusion_model.", in_dim: int = 64) -> dict:
    """A small Flux under ComfyUI's names: linear img_in / txt_in, double and single blocks, the time_in MLP."""
    return {
        prefix + "img_in.weight": (hidden, in_dim),
        prefix + "txt_in.weight": (hidden, 4096),
        prefix + "time_in.in_layer.weight": (hidden, 256),
        prefix + "double_blocks.0.img_attn.qkv.weight": (3 * hidden, hidden),
        prefix + "double_blocks.0.img_mod.lin.weight": (6 * hidden, hidden),
        prefix + "single_blocks.0.linear1.weight": (7 * hidden, hidden),
    }


@pytest.mark.parametrize("prefix", ["", "diffusion_model.", "model.diffusion_model."])
@pytest.mark.parametrize("hidden", [64, 1536, 2432])  # tiny, SD3(.5) Medium, SD3.5 Large
def test_mmdit_is_sd3(prefix, hidden):
    assert guess_architecture(mmdit_shapes(hidden, prefix)) == "sd3"


@pytest.mark.parametrize("prefix", ["", "diffusion_model.", "model.diffusion_model."])
@pytest.mark.parametrize(("hidden", "in_dim"), [(96, 64), (3072, 64), (3072, 384)])  # tiny, dev/schnell, fill
def test_flux_is_flux(prefix, hidden, in_dim):
    assert guess_architecture(flux_shapes(hidden, prefix, in_dim)) == "flux"


def without(shapes: dict, word: str) -> dict:
    return {k: v for k, v in shapes.items() if word not in k}


@pytest.mark.parametrize(
    "shapes",
    [
        pytest.param(without(mmdit_shapes(), "x_embedder"), id="mmdit without patch embedding"),
        pytest.param({**mmdit_shapes(), "diffusion_model.x_embedder.proj.weight": (64, 4, 2, 2)}, id="mmdit 4ch"),
        pytest.param({**mmdit_shapes(), "diffusion_model.x_embedder.proj.weight": (32, 16, 2, 2)}, id="mmdit width"),
        pytest.param(
            {**mmdit_shapes(), "diffusion_model.joint_blocks.0.context_block.attn.qkv.weight": (64, 64)}, id="qkv"
        ),
        pytest.param({"xjoint_blocks.0.context_block.attn.qkv.weight": (192, 64)}, id="name glued to prefix"),
        pytest.param(without(flux_shapes(), "time_in"), id="chroma: no time_in"),
        pytest.param(
            {**without(flux_shapes(), "img_in"), "diffusion_model.img_in.proj.weight": (96, 16, 1, 2, 2)},
            id="hunyuan video: conv img_in",
        ),
        pytest.param(without(flux_shapes(), "single_blocks"), id="flux without single blocks"),
        pytest.param({**flux_shapes(), "diffusion_model.txt_in.weight": (48, 4096)}, id="flux width mismatch"),
        pytest.param({"diffusion_model.double_blocks.0.img_attn.qkv.weight": (288, 96)}, id="double block alone"),
        pytest.param({"diffusion_model.transformer_blocks.0.attn.to_q.weight": (96, 96)}, id="diffusers names"),
    ],
)
def test_other_transformers_are_unknown(shapes):
    assert guess_architecture(shapes) == "unknown"
