"""The PeRFlow Delta Loader inside a real ComfyUI (set COMFYUI_PATH), on tiny random SD1.5 / SD2.1 / SDXL UNets."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from perflow_core.delta_format import save_delta

COMFY = os.environ.get("COMFYUI_PATH")
if not COMFY:
    pytest.skip("set COMFYUI_PATH to a ComfyUI checkout to run the ComfyUI tests", allow_module_level=True)
REPO = Path(__file__).resolve().parents[1]
ARCHS = ("sd15", "sd21", "sdxl")


@pytest.fixture(scope="module")
def comfy():
    """ComfyUI (CPU) and this pack imported in-process; returns (comfy modules, pack loader module, nodes)."""
    sys.path.insert(0, COMFY)  # ComfyUI's own `nodes` must win over this repo's `nodes` package
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.lora
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils
    import folder_paths

    import nodes

    spec = importlib.util.spec_from_file_location(
        "perflow_pack", REPO / "__init__.py", submodule_search_locations=[str(REPO)]
    )
    pack = importlib.util.module_from_spec(spec)
    sys.modules["perflow_pack"] = pack
    spec.loader.exec_module(pack)
    return comfy, sys.modules["perflow_pack.nodes.delta_loader"], nodes, folder_paths


def tiny_model(comfy, arch: str, seed: int = 0):
    """A ModelPatcher around a small random UNet of the family's class and context width (fp32, CPU)."""
    cfg = dict(
        use_checkpoint=False,
        image_size=32,
        use_spatial_transformer=True,
        legacy=False,
        in_channels=4,
        out_channels=4,
        model_channels=64,
        num_res_blocks=[1, 1],
        channel_mult=[1, 2],
        transformer_depth=[1, 1],
        transformer_depth_output=[1, 1, 1, 1],
        transformer_depth_middle=1,
        use_temporal_resblock=False,
        use_temporal_attention=False,
        adm_in_channels=None,
        context_dim=768,
        use_linear_in_transformer=False,
    )
    sm = comfy.supported_models
    if arch == "sd21":
        cfg.update(context_dim=1024, use_linear_in_transformer=True)
    if arch == "sdxl":
        cfg.update(
            context_dim=2048,
            use_linear_in_transformer=True,
            adm_in_channels=2816,
            num_classes="sequential",
            transformer_depth=[0, 1],
            transformer_depth_output=[0, 0, 1, 1],
        )
    model = {"sd15": sm.SD15, "sd21": sm.SD20, "sdxl": sm.SDXL}[arch](cfg).get_model({}, device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            is_norm = p.ndim == 1 and "norm" in name or ".in_layers.0." in name or ".out_layers.0." in name
            p.copy_((1 if is_norm and name.endswith("weight") else 0) + 0.02 * torch.randn(p.shape, generator=g))
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def unet_weights(patcher) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in patcher.model_state_dict().items() if k.startswith("diffusion_model.")}


def weights_as_run(patcher) -> dict[str, torch.Tensor]:
    """The weights ComfyUI actually runs: patch the shared model, read, restore."""
    patcher.patch_model()
    try:
        return unet_weights(patcher)
    finally:
        patcher.unpatch_model()


def synthetic_delta(base: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}


def write_file(comfy, fmt: str, model, dw: dict[str, torch.Tensor], base, path: Path) -> None:
    """dW (model keys) written in one of the loader's formats."""
    c2d = {
        "diffusion_model." + v: k
        for k, v in comfy.utils.unet_to_diffusers(model.model.model_config.unet_config).items()
    }
    if fmt == "perflow_delta":
        save_delta(path, dw, parameterization="diff_eps", num_windows=4, base_architecture="sd15", base_hash="0" * 64)
    elif fmt == "diffusers_delta":
        save_file({c2d[k]: t for k, t in dw.items()}, str(path))
    elif fmt == "diffusers_merged":
        save_file({c2d[k]: base[k] + t for k, t in dw.items()}, str(path))
    elif fmt == "ldm_merged":
        save_file(
            {"model." + k: base[k] + t for k, t in dw.items()} | {"first_stage_model.x": torch.ones(1)}, str(path)
        )
    elif fmt == "ldm_delta":
        save_file(dw, str(path))


FORMATS = ("perflow_delta", "diffusers_delta", "diffusers_merged", "ldm_merged", "ldm_delta")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_patched_weights_are_w_plus_s_dw(comfy, tmp_path, arch, fmt):
    c, loader, _, _ = comfy
    base = tiny_model(c, arch)
    w = unet_weights(base)
    dw = synthetic_delta(w)
    path = tmp_path / f"{fmt}.safetensors"
    write_file(c, fmt, base, dw, w, path)
    if fmt.endswith("merged"):  # what the loader can recover: merged - W
        merged = {k: w[k] + t for k, t in dw.items()}
        dw = {k: merged[k] - w[k] for k in dw}
    for s in (1.0, 0.5):
        out, summary = loader.load_delta(base, str(path), s, "diff_eps", 0)
        assert f"{fmt}, " in summary and f"{len(w)} weights patched" in summary
        got = weights_as_run(out)
        for k in w:
            torch.testing.assert_close(got[k], w[k] + s * dw[k], rtol=0, atol=1e-6, msg=k)
        assert type(out.get_model_object("model_sampling")).__name__ == "PeRFlowModelSampling"
    assert not base.patches
    for k, v in unet_weights(base).items():
        assert torch.equal(v, w[k]), k


@pytest.mark.parametrize(
    "file_arch, model_arch, match", [("sd15", "sd21", "differ in shape"), ("sdxl", "sd15", "no counterpart")]
)
def test_wrong_architecture_is_refused_with_nothing_patched(comfy, tmp_path, file_arch, model_arch, match):
    c, loader, _, _ = comfy
    src, dst = tiny_model(c, file_arch), tiny_model(c, model_arch)
    w = unet_weights(dst)
    path = tmp_path / "d.safetensors"
    write_file(c, "diffusers_delta", src, synthetic_delta(unet_weights(src)), None, path)
    with pytest.raises(loader.DeltaFileError, match=match) as e:
        loader.load_delta(dst, str(path), 1.0, "diff_eps", 0)
    names = {"sd15": "SD1.5", "sd21": "SD2.1", "sdxl": "SDXL"}
    assert f"looks like {names[file_arch]}, the model is {names[model_arch]}; nothing was applied" in str(e.value)
    assert not dst.patches and all(torch.equal(v, w[k]) for k, v in weights_as_run(dst).items())


def test_kohya_lora_matches_stock_lora_loader(comfy, tmp_path):
    c, loader, nodes, folder_paths = comfy
    base = tiny_model(c, "sd15")
    w = unet_weights(base)
    g = torch.Generator().manual_seed(3)
    lora = {}
    for k, v in w.items():
        if v.ndim < 2 or not k.endswith(".weight"):
            continue
        name = "lora_unet_" + k.removeprefix("diffusion_model.").removesuffix(".weight").replace(".", "_")
        tail = (1,) * (v.ndim - 2)
        lora[f"{name}.lora_down.weight"] = 0.1 * torch.randn((4, *v.shape[1:]), generator=g)
        lora[f"{name}.lora_up.weight"] = 0.1 * torch.randn((v.shape[0], 4, *tail), generator=g)
        lora[f"{name}.alpha"] = torch.tensor(2.0)
    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    save_file(lora, str(lora_dir / "style.safetensors"))
    folder_paths.add_model_folder_path("loras", str(lora_dir), is_default=True)
    assert "loras/style.safetensors" in loader.file_choices()
    ours, summary = loader.PeRFlowDeltaLoader().load(base, "loras/style.safetensors", 0.7, "ddim_eps", 0)
    (stock,) = nodes.LoraLoaderModelOnly().load_lora_model_only(base, "style.safetensors", 0.7)
    n = len(lora) // 3
    assert f"kohya_lora, SD1.5 file on SD1.5 model; {n} weights patched" in summary
    got, want = weights_as_run(ours), weights_as_run(stock)
    changed = 0
    for k in w:
        assert torch.equal(got[k], want[k]), k
        changed += not torch.equal(got[k], w[k])
    assert changed == n


def test_pickle_file_in_lora_folder_is_refused(comfy, tmp_path):
    c, loader, _, _ = comfy
    base = tiny_model(c, "sd15")
    path = tmp_path / "evil.pt"
    torch.save({"a": torch.ones(1)}, path)
    with pytest.raises(loader.DeltaFileError, match="pickle"):
        loader.load_delta(base, str(path), 1.0, "auto", 0)
    assert not base.patches


def test_four_step_sampling_through_the_loader(comfy, tmp_path):
    c, loader, nodes, _ = comfy
    base = tiny_model(c, "sd15")
    path = tmp_path / "d.safetensors"
    write_file(c, "diffusers_delta", base, synthetic_delta(unet_weights(base)), None, path)
    model, _ = loader.load_delta(base, str(path), 1.0, "auto", 0)
    cond = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(0)), {}]]
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    (out,) = nodes.common_ksampler(model, 0, 4, 1.0, "euler", "simple", cond, cond, latent)
    assert out["samples"].shape == (1, 4, 8, 8) and torch.isfinite(out["samples"]).all()
