"""Delta -> kohya LoRA: error falls with rank, full rank reconstructs, keys and shapes as ComfyUI reads them."""

import torch
from safetensors.torch import load_file

from perflow_core.delta_format import save_delta, state_dict_hash
from training.extract_lora import extract_lora, lora_name, main


def fake_delta() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {
        "diffusion_model.input_blocks.0.0.weight": (32, 4, 3, 3),
        "diffusion_model.input_blocks.0.0.bias": (32,),
        "diffusion_model.input_blocks.1.1.proj_in.weight": (32, 32, 1, 1),
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (32, 32),
        "diffusion_model.input_blocks.1.1.norm.weight": (32,),
        "diffusion_model.time_embed.0.weight": (128, 32),
    }
    return {k: torch.randn(s, generator=g) * 1e-3 for k, s in shapes.items()}


def comfy_apply(lora: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's LoRA arithmetic: alpha / rank * up.flatten(1) @ down.flatten(1), reshaped; diff, diff_b as is."""
    out = {}
    for key, d in delta.items():
        n = lora_name(key)
        if key.endswith(".bias"):
            out[key] = lora[f"{n}.diff_b"].float()
        elif f"{n}.diff" in lora:
            out[key] = lora[f"{n}.diff"].float()
        else:
            up, down = lora[f"{n}.lora_up.weight"].float(), lora[f"{n}.lora_down.weight"].float()
            scale = lora[f"{n}.alpha"].item() / down.shape[0]
            out[key] = scale * (up.flatten(1) @ down.flatten(1)).reshape(d.shape)
    return out


def test_error_falls_with_rank_and_full_rank_reconstructs():
    delta = fake_delta()
    errors = [extract_lora(delta, r, torch.float32)[1] for r in (1, 2, 4, 8, 16, 36)]
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False))
    lora, err = extract_lora(delta, 128, torch.float32)
    assert err < 1e-6
    for k, v in comfy_apply(lora, delta).items():
        torch.testing.assert_close(v, delta[k], atol=1e-8, rtol=1e-4)


def test_kohya_keys_and_conv_shapes():
    lora, _ = extract_lora(fake_delta(), 4)
    n = "lora_unet_input_blocks_0_0"
    assert lora[f"{n}.lora_down.weight"].shape == (4, 4, 3, 3)
    assert lora[f"{n}.lora_up.weight"].shape == (32, 4, 1, 1)
    assert lora[f"{n}.alpha"].item() == 4 and lora[f"{n}.diff_b"].shape == (32,)
    assert lora["lora_unet_input_blocks_1_1_proj_in.lora_down.weight"].shape == (4, 32, 1, 1)
    assert lora["lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_up.weight"].shape == (32, 4)
    assert lora["lora_unet_input_blocks_1_1_norm.diff"].shape == (32,)
    assert all(v.dtype == torch.float16 for v in lora.values())


def test_cli_writes_one_file_per_rank(tmp_path, capsys):
    delta = fake_delta()
    path = tmp_path / "delta.safetensors"
    save_delta(
        path,
        delta,
        parameterization="diff_eps",
        num_windows=4,
        base_architecture="sd15",
        base_hash=state_dict_hash(delta),
    )
    rows = main([str(path), "--rank", "2", "8", "--out", str(tmp_path / "lora.safetensors"), "--dtype", "fp32"])
    assert [r["rank"] for r in rows] == [2, 8] and rows[0]["relative_error"] > rows[1]["relative_error"]
    assert (tmp_path / "lora_r8.safetensors").is_file()
    assert "relative error" in capsys.readouterr().out
    assert load_file(tmp_path / "lora_r2.safetensors")["lora_unet_time_embed_0.alpha"].item() == 2


def test_stock_lora_loader_and_our_loader_apply_the_export_alike(tmp_path):
    """With COMFYUI_PATH: a full-rank export of a delta for a tiny SD1.5 checkpoint, loaded by the stock
    LoraLoaderModelOnly node and by the PeRFlow Delta Loader, moves every UNet weight by the delta, identically."""
    import comfy_env

    comfy_env.require_comfyui()
    comfy_env.setup_comfyui()
    comfy_env.load_pack()
    import comfy.sd

    from checkpoints import checkpoint_path
    from training.extract_lora import save_lora

    ckpt = checkpoint_path("sd15")
    model = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=False, output_clip=False)[0]
    base = {k: v.float().clone() for k, v in model.model.state_dict().items() if k.startswith("diffusion_model.")}
    g = torch.Generator().manual_seed(0)
    ends = ("input_blocks.0.0.weight", "input_blocks.0.0.bias", "proj_in.weight", "to_q.weight", "out.2.weight")
    picked = [k for k in base if k.endswith(ends)]
    picked += [k for k in base if k.endswith("norm.weight")][:1]
    delta = {k: torch.randn(base[k].shape, generator=g) * 1e-2 for k in picked}
    lora, err = extract_lora(delta, 4096, torch.float32)
    assert err < 1e-5
    save_lora(tmp_path / "perflow_lora.safetensors", lora, {})
    assert {k.rsplit(".", 1)[-1] for k in lora} == {"weight", "alpha", "diff", "diff_b"}
    name = comfy_env.add_model_file("loras", tmp_path / "perflow_lora.safetensors", "perflow-test-export.safetensors")
    (stock,) = comfy_env.call("LoraLoaderModelOnly", model=model, lora_name=name, strength_model=1.0)
    ours, summary = comfy_env.call(
        "PeRFlowDeltaLoader", model=model, delta_name="loras/" + name, strength=1.0,
        parameterization="diff_eps", num_windows=4,
    )  # fmt: skip
    assert "kohya_lora," in summary and f"SD1.5 model; {len(picked)} weights patched" in summary
    weights = {}
    for label, patcher in (("stock", stock), ("ours", ours)):
        patcher.patch_model()
        weights[label] = {k: v.float().clone() for k, v in patcher.model.state_dict().items() if k in base}
        patcher.unpatch_model()
    for k in base:
        expected = base[k] + delta[k] if k in delta else base[k]
        tol = 2e-3 * max(1.0, base[k].abs().max().item())  # the checkpoint's weights are fp16
        torch.testing.assert_close(weights["stock"][k], expected, atol=tol, rtol=0, msg=k)
        torch.testing.assert_close(weights["ours"][k], weights["stock"][k], atol=0, rtol=0, msg=k)
