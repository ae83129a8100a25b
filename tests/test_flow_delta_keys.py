"""The flow-model branches of the weight-file reader, without ComfyUI: which files may go on which model, the
trained-shift note, the parameterization of a flow file without metadata, merged flow models told from deltas."""

import pytest
import torch

from perflow_core.delta_format import DeltaMetadata
from perflow_core.delta_keys import (
    WeightFile,
    check_time_kind,
    flow_shift_note,
    looks_merged,
    resolve_parameterization,
)
from perflow_core.safetensors_file import DeltaFileError


def weight_file(arch: str, metadata: DeltaMetadata | None) -> WeightFile:
    return WeightFile("/x/file.safetensors", "perflow_delta", arch, {}, metadata)


def flow_meta(arch="sd3", shift=3.0):
    return DeltaMetadata("velocity", 4, arch, "0" * 64, time_kind="flow", flow_shift=shift)


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_flow_files_go_on_flow_models_only(arch):
    for wf in (weight_file(arch, flow_meta(arch)), weight_file(arch, None)):
        check_time_kind(wf, True, "SD3 (MMDiT)")
        with pytest.raises(DeltaFileError, match="rectified-flow .* but the connected model is SD1.5, a diffusion"):
            check_time_kind(wf, False, "SD1.5")


@pytest.mark.parametrize("arch", ["sd15", "sd21", "sdxl", "unknown"])
def test_sd_family_files_go_on_sd_models_only(arch):
    meta = DeltaMetadata("diff_eps", 4, "sd15" if arch == "unknown" else arch, "0" * 64)
    for wf in (weight_file(arch, meta), weight_file(arch, None)):
        check_time_kind(wf, False, "SD1.5")
        with pytest.raises(DeltaFileError, match="Stable Diffusion family .* Flux, a rectified-flow"):
            check_time_kind(wf, True, "Flux")


def test_the_shift_note_names_the_trained_shift_and_the_fix():
    wf = weight_file("sd3", flow_meta(shift=3.0))
    assert flow_shift_note(wf, 3.0) == "" and flow_shift_note(wf, 3.002) == ""
    note = flow_shift_note(wf, 2.0)
    assert "trained at flow shift 3 but this model samples at shift 2" in note
    assert "ModelSamplingSD3 with shift 3" in note
    assert flow_shift_note(weight_file("sd3", None), 2.0) == ""  # no metadata: nothing to compare


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_a_flow_file_without_metadata_is_velocity(arch):
    assert resolve_parameterization("auto", "ldm_delta", arch, None)[0] == "velocity"


def test_merged_flow_transformers_are_told_from_deltas_by_their_norms():
    flux_norms = {f"double_blocks.{i}.img_attn.norm.query_norm.scale": torch.ones(64) for i in range(3)}
    mmdit_norms = {f"joint_blocks.{i}.x_block.attn.ln_q.weight": torch.ones(64) for i in range(3)}
    for norms in (flux_norms, mmdit_norms):
        assert looks_merged(norms)
        assert not looks_merged({k: torch.zeros_like(v) for k, v in norms.items()})


def test_diffusers_transformer_loras_are_their_own_style_and_split_into_modules():
    from perflow_core.delta_keys import detect_format, diffusers_lora_module, key_style

    keys = ["transformer.transformer_blocks.0.attn.to_q.lora_A.weight", "text_encoder.x.lora_A.weight"]
    assert key_style(keys, {}) == "diffusers_lora" and detect_format("diffusers_lora", {}) == "diffusers_lora"
    assert diffusers_lora_module(keys[0]) == ("transformer.transformer_blocks.0.attn.to_q", "lora_down.weight")
    assert diffusers_lora_module("transformer.a.lora_B.weight") == ("transformer.a", "lora_up.weight")
    assert diffusers_lora_module("transformer.a.weird") == ("transformer.a.weird", "")
    wf = weight_file("unknown", None)
    wf.format = "diffusers_lora"
    check_time_kind(wf, True, "Flux")  # a transformer LoRA without metadata goes on a flow model
    with pytest.raises(DeltaFileError, match="rectified-flow"):
        check_time_kind(wf, False, "SD1.5")


def test_a_slice_target_of_a_fused_weight_is_checked_against_the_slice():
    from perflow_core.delta_keys import diffusers_lora_module, plan_kohya

    qkv = "diffusion_model.b.qkv.weight"
    key_map = {
        "transformer.b.to_q": (qkv, (0, 0, 8)),
        "transformer.b.to_k": (qkv, (0, 8, 8)),
        "transformer.n": (qkv, None, abs),
    }
    model = {qkv: (24, 8)}
    good = {"transformer.b.to_q.lora_A.weight": (2, 8), "transformer.b.to_q.lora_B.weight": (8, 2)}
    plan = plan_kohya(good, key_map, model, diffusers_lora_module)
    assert plan.ok and plan.pairs == {"transformer.b.to_q": key_map["transformer.b.to_q"]}
    wide = {"transformer.b.to_k.lora_A.weight": (2, 8), "transformer.b.to_k.lora_B.weight": (24, 2)}
    assert plan_kohya(wide, key_map, model, diffusers_lora_module).mismatched  # 24 rows for an 8-row slice
    whole = {"transformer.n.lora_A.weight": (2, 8), "transformer.n.lora_B.weight": (24, 2)}
    assert plan_kohya(whole, key_map, model, diffusers_lora_module).ok  # (key, None, function): the whole weight
