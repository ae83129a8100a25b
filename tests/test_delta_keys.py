import pytest
import torch
from safetensors.torch import save_file

from perflow_core.delta_format import DeltaMetadata, save_delta
from perflow_core.delta_keys import (
    detect_format,
    diffusers_key_map,
    guess_architecture,
    keeps_key,
    key_style,
    ldm_key_map,
    mismatch_error,
    plan_keys,
    plan_kohya,
    read_weight_file,
    resolve_num_windows,
    resolve_parameterization,
)
from perflow_core.safetensors_file import DeltaFileError

CTX = {"sd15": 768, "sd21": 1024, "sdxl": 2048}
TB = "transformer_blocks.0"
# A few diffusers keys -> LDM keys, as comfy.utils.unet_to_diffusers gives them.
D2L = {
    "conv_in.weight": "input_blocks.0.0.weight",
    "down_blocks.0.resnets.0.norm1.weight": "input_blocks.1.0.in_layers.0.weight",
    "down_blocks.0.attentions.0.norm.weight": "input_blocks.1.1.norm.weight",
    "down_blocks.0.attentions.0.proj_in.weight": "input_blocks.1.1.proj_in.weight",
    f"down_blocks.0.attentions.0.{TB}.norm1.weight": f"input_blocks.1.1.{TB}.norm1.weight",
    f"down_blocks.0.attentions.0.{TB}.attn2.to_k.weight": f"input_blocks.1.1.{TB}.attn2.to_k.weight",
}


def diffusers_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Tiny diffusers-keyed UNet shapes: 8 channels, the family's real context width and proj_in kind."""
    shapes = {
        "conv_in.weight": (8, 4, 3, 3),
        "down_blocks.0.resnets.0.norm1.weight": (8,),
        "down_blocks.0.attentions.0.norm.weight": (8,),
        "down_blocks.0.attentions.0.proj_in.weight": (8, 8, 1, 1) if arch == "sd15" else (8, 8),
        f"down_blocks.0.attentions.0.{TB}.norm1.weight": (8,),
        f"down_blocks.0.attentions.0.{TB}.attn2.to_k.weight": (8, CTX[arch]),
    }
    if arch == "sdxl":
        shapes["add_embedding.linear_1.weight"] = (16, 2816)
    return shapes


def model_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    return {"diffusion_model." + D2L[k]: s for k, s in diffusers_shapes(arch).items() if k in D2L}


def tensors(shapes, merged: bool, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in shapes.items():
        t = torch.randn(s, generator=g) * 0.01
        out[k] = t + 1 if merged and len(s) == 1 else t
    return out


def test_key_style():
    assert key_style(["a"], {"perflow_format": "delta"}) == "perflow_delta"
    assert key_style(list(diffusers_shapes("sd15")), {}) == "diffusers"
    assert key_style(["unet.conv_in.weight", "unet.conv_out.bias"], {}) == "diffusers"
    assert key_style(["model.diffusion_model.out.2.weight", "first_stage_model.x"], {}) == "ldm"
    assert key_style(["diffusion_model.out.2.weight"], {}) == "ldm"
    assert key_style(["lora_unet_a.lora_down.weight", "lora_te_b.alpha"], {}) == "kohya_lora"
    with pytest.raises(ValueError, match="unrecognised key names"):
        key_style(["encoder.conv.weight", "decoder.x"], {})


@pytest.mark.parametrize("merged", [False, True])
def test_detect_diffusers_and_ldm_delta_vs_merged(merged):
    d = tensors(diffusers_shapes("sd15"), merged)
    assert detect_format("diffusers", d) == ("diffusers_merged" if merged else "diffusers_delta")
    ckpt = {"model.diffusion_model." + D2L[k]: t for k, t in d.items() if k in D2L}
    ckpt["first_stage_model.decoder.norm_out.weight"] = torch.ones(4)  # must not vote: filtered out
    ckpt["cond_stage_model.final_layer_norm.weight"] = torch.zeros(4)
    keep = keeps_key(key_style(list(ckpt), {}))
    unet = {k: t for k, t in ckpt.items() if keep(k)}
    assert len(unet) == len(D2L)
    assert detect_format("ldm", unet) == ("ldm_merged" if merged else "ldm_delta")
    assert detect_format("kohya_lora", {}) == "kohya_lora"
    assert detect_format("perflow_delta", {}) == "perflow_delta"


def test_guess_architecture():
    for arch in ("sd15", "sd21", "sdxl"):
        assert guess_architecture(diffusers_shapes(arch)) == arch
        assert guess_architecture(model_shapes(arch)) == arch
    kohya = {
        f"lora_unet_input_blocks_1_1_{TB.replace('.', '_')}_attn2_to_k.lora_up.weight": (8, 4),
        f"lora_unet_input_blocks_1_1_{TB.replace('.', '_')}_attn2_to_k.lora_down.weight": (4, 1024),
    }
    assert guess_architecture(kohya) == "sd21"
    assert guess_architecture({"x.attn2.to_k.weight": (8, 4096)}) == "unknown"
    assert guess_architecture({"conv_in.weight": (8, 4, 3, 3)}) == "unknown"


def test_key_maps():
    u2d = dict(D2L)
    got = diffusers_key_map(["conv_in.weight", "unet.conv_in.weight", "nope.weight"], u2d)
    assert got == {
        "conv_in.weight": "diffusion_model.input_blocks.0.0.weight",
        "unet.conv_in.weight": "diffusion_model.input_blocks.0.0.weight",
    }
    assert ldm_key_map(["model.diffusion_model.out.2.bias", "diffusion_model.out.0.weight"]) == {
        "model.diffusion_model.out.2.bias": "diffusion_model.out.2.bias",
        "diffusion_model.out.0.weight": "diffusion_model.out.0.weight",
    }


def test_plan_ok():
    shapes = diffusers_shapes("sd15")
    plan = plan_keys(shapes, diffusers_key_map(list(shapes), D2L), model_shapes("sd15"))
    assert plan.ok and len(plan.pairs) == len(D2L) and not plan.unmapped and not plan.mismatched
    assert plan.pairs["conv_in.weight"] == "diffusion_model.input_blocks.0.0.weight"


def test_plan_sd15_on_sd21_is_shape_mismatch():
    shapes = diffusers_shapes("sd15")
    plan = plan_keys(shapes, diffusers_key_map(list(shapes), D2L), model_shapes("sd21"))
    assert not plan.ok and not plan.unmapped
    assert sorted(k for k, _, _ in plan.mismatched) == [
        "down_blocks.0.attentions.0.proj_in.weight",
        f"down_blocks.0.attentions.0.{TB}.attn2.to_k.weight",
    ]
    msg = str(mismatch_error("/m/perflow/d.safetensors", plan, "sd15", "sd21"))
    assert msg.startswith("/m/perflow/d.safetensors: does not fit the connected model")
    assert "2 of 6 keys differ in shape" in msg and "file [8, 768] vs model [8, 1024]" in msg
    assert "looks like SD1.5, the model is SD2.1; nothing was applied" in msg
    assert "Fix: connect an SD1.5 checkpoint, or pick the PeRFlow file made for SD2.1" in msg


def test_plan_sdxl_on_sd15_is_unmapped_and_mismatched():
    shapes = diffusers_shapes("sdxl")
    plan = plan_keys(shapes, diffusers_key_map(list(shapes), D2L), model_shapes("sd15"))
    assert plan.unmapped == ["add_embedding.linear_1.weight"] and len(plan.mismatched) == 2
    msg = str(mismatch_error("d.safetensors", plan, "sdxl", "sd15"))
    assert "1 of 7 keys have no counterpart in the model (e.g. add_embedding.linear_1.weight)" in msg
    assert "looks like SDXL, the model is SD1.5" in msg


def test_plan_refuses_duplicates_and_empty():
    ms = {"diffusion_model.out.2.bias": (4,)}
    plan = plan_keys(
        {"model.diffusion_model.out.2.bias": (4,), "diffusion_model.out.2.bias": (4,)},
        ldm_key_map(["model.diffusion_model.out.2.bias", "diffusion_model.out.2.bias"]),
        ms,
    )
    assert len(plan.pairs) == 1 and len(plan.unmapped) == 1 and not plan.ok
    assert not plan_keys({}, {}, ms).ok
    assert "holds no UNet weights" in str(mismatch_error("d", plan_keys({}, {}, ms), "unknown", "sd15"))


def test_plan_kohya():
    key_map = {"lora_unet_a": "diffusion_model.a.weight", "lora_unet_c": "diffusion_model.c.weight"}
    ms = {"diffusion_model.a.weight": (8, 8, 3, 3), "diffusion_model.c.weight": (16, 32)}
    ok = {
        "lora_unet_a.lora_down.weight": (4, 8, 3, 3),
        "lora_unet_a.lora_up.weight": (8, 4, 1, 1),
        "lora_unet_a.alpha": (),
        "lora_unet_c.lora_down.weight": (2, 32),
        "lora_unet_c.lora_up.weight": (16, 2),
    }
    plan = plan_kohya(ok, key_map, ms)
    assert plan.ok and plan.pairs == {
        "lora_unet_a": "diffusion_model.a.weight",
        "lora_unet_c": "diffusion_model.c.weight",
    }
    bad = {
        **ok,
        "lora_unet_c.lora_down.weight": (2, 24),
        "lora_unet_b.lora_down.weight": (2, 2),
        "lora_unet_b.lora_up.weight": (2, 2),
        "lora_unet_a.hada_w1_a": (4, 4),
    }
    plan = plan_kohya(bad, key_map, ms)
    assert plan.unmapped == ["lora_unet_a", "lora_unet_b"] and [m[0] for m in plan.mismatched] == ["lora_unet_c"]


def test_plan_kohya_full_diffs_and_bias_diffs_as_the_lora_export_writes():
    key_map = {"lora_unet_a": "diffusion_model.a.weight", "lora_unet_n": "diffusion_model.n.weight"}
    ms = {"diffusion_model.a.weight": (8, 8, 3, 3), "diffusion_model.a.bias": (8,), "diffusion_model.n.weight": (8,)}
    ok = {
        "lora_unet_a.lora_down.weight": (4, 8, 3, 3),
        "lora_unet_a.lora_up.weight": (8, 4, 1, 1),
        "lora_unet_a.diff_b": (8,),
        "lora_unet_n.diff": (8,),
    }
    plan = plan_kohya(ok, key_map, ms)
    assert plan.ok and plan.pairs == {
        "lora_unet_a": "diffusion_model.a.weight",
        "lora_unet_a.diff_b": "diffusion_model.a.bias",
        "lora_unet_n": "diffusion_model.n.weight",
    }
    bad = {"lora_unet_n.diff": (4,), "lora_unet_n.diff_b": (8,), "lora_unet_a.diff": (8, 8, 3, 3)}
    bad["lora_unet_a.lora_down.weight"] = (4, 8, 3, 3)  # a LoRA and a full diff for one weight: ambiguous
    plan = plan_kohya(bad, key_map, ms)
    assert plan.unmapped == ["lora_unet_a", "lora_unet_n.diff_b"]
    assert [m[0] for m in plan.mismatched] == ["lora_unet_n"]


def test_resolve_parameterization_and_windows():
    md = DeltaMetadata("ddim_eps", 6, "sdxl", "0" * 64)
    assert resolve_parameterization("auto", "perflow_delta", "sdxl", md) == ("ddim_eps", "")
    p, note = resolve_parameterization("velocity", "perflow_delta", "sdxl", md)
    assert p == "ddim_eps" and "trained with ddim_eps" in note
    assert resolve_parameterization("auto", "diffusers_delta", "sd15", None)[0] == "diff_eps"
    assert resolve_parameterization("velocity", "diffusers_merged", "sd21", None) == ("velocity", "")
    with pytest.raises(ValueError, match="pick it on the node"):
        resolve_parameterization("auto", "diffusers_merged", "sdxl", None)
    with pytest.raises(ValueError, match="auto or one of"):
        resolve_parameterization("eps", "kohya_lora", "sd15", None)
    assert resolve_num_windows(0, md) == (6, "")
    assert resolve_num_windows(4, md)[0] == 6 and "6 windows" in resolve_num_windows(4, md)[1]
    assert resolve_num_windows(0, None) == (4, "") and resolve_num_windows(8, None) == (8, "")


def test_read_weight_file_each_format(tmp_path):
    sd15 = diffusers_shapes("sd15")
    delta = {"diffusion_model." + D2L[k]: t for k, t in tensors(sd15, merged=False).items()}
    save_delta(
        tmp_path / "ours.safetensors",
        delta,
        parameterization="diff_eps",
        num_windows=4,
        base_architecture="sd15",
        base_hash="1" * 64,
    )
    save_file(tensors(sd15, merged=False), str(tmp_path / "dd.safetensors"))
    save_file(tensors(sd15, merged=True), str(tmp_path / "dm.safetensors"))
    ckpt = {"model." + k: v + (1 if v.ndim == 1 else 0) for k, v in delta.items()}
    save_file({**ckpt, "first_stage_model.decoder.conv_in.weight": torch.ones(2)}, str(tmp_path / "lm.safetensors"))
    save_file(
        {
            "lora_unet_x.lora_down.weight": torch.ones(2, 8),
            "lora_unet_x.lora_up.weight": torch.ones(8, 2),
            "lora_te_y.alpha": torch.tensor(1.0),
        },
        str(tmp_path / "lora.safetensors"),
    )
    expect = {
        "ours": "perflow_delta",
        "dd": "diffusers_delta",
        "dm": "diffusers_merged",
        "lm": "ldm_merged",
        "lora": "kohya_lora",
    }
    for name, fmt in expect.items():
        wf = read_weight_file(tmp_path / f"{name}.safetensors")
        assert wf.format == fmt, name
    ours = read_weight_file(tmp_path / "ours.safetensors")
    assert ours.metadata.parameterization == "diff_eps" and ours.architecture == "sd15"
    assert read_weight_file(tmp_path / "dd.safetensors").architecture == "sd15"
    lm = read_weight_file(tmp_path / "lm.safetensors")
    assert set(lm.tensors) == set(ckpt)
    assert list(read_weight_file(tmp_path / "lora.safetensors").tensors) == [
        "lora_unet_x.lora_down.weight",
        "lora_unet_x.lora_up.weight",
    ]


def test_read_weight_file_refuses_bad_metadata_and_unknown_keys(tmp_path):
    meta = DeltaMetadata("diff_eps", 4, "sd15", "1" * 64).to_metadata()
    save_file({"diffusion_model.x": torch.ones(2)}, str(tmp_path / "a.safetensors"), {**meta, "num_windows": "x"})
    with pytest.raises(DeltaFileError, match=r"a\.safetensors: metadata num_windows must be a decimal integer"):
        read_weight_file(tmp_path / "a.safetensors")
    save_file({"encoder.conv.weight": torch.ones(2)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(DeltaFileError, match="unrecognised key names"):
        read_weight_file(tmp_path / "b.safetensors")
