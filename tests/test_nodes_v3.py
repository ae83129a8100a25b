"""The pack as ComfyUI loads it (skips without COMFYUI_PATH): V3 only, today's categories and tooltips, search
aliases only where ComfyUI knows them, models/perflow created on load, one log line on a too-old ComfyUI, and what
the Delta Loader reports (summary shown by Preview Any, skipped text-encoder modules, when it logs a guess)."""

import asyncio
import dataclasses
import importlib.util
import logging
import sys

import pytest
import tomllib
import torch
from safetensors.torch import save_file

import checkpoints
import comfy_env
from perflow_core.delta_format import save_delta

IDS = {"PeRFlowModelSampling", "PeRFlowDeltaLoader", "PeRFlowScheduler", "PeRFlowSampler", "PeRFlowCFGSchedule"}
UNET = "diffusion_model."


@pytest.fixture(scope="module")
def pack():
    """(node ids added, the pack's root module, its nodes.common module) with this pack loaded by ComfyUI."""
    comfy_env.setup_comfyui()  # before load_pack, whose `import nodes` must find ComfyUI's nodes.py
    ids = comfy_env.load_pack()
    root = next(m for n, m in sys.modules.items() if n.endswith("ComfyUI-PeRFlow") and hasattr(m, "__path__"))
    return ids, root, sys.modules[root.__name__ + ".nodes.common"]


def test_pack_is_v3_only(pack):
    from comfy_api.latest import io

    import nodes

    ids, root, _ = pack
    assert ids == IDS
    assert hasattr(root, "comfy_entrypoint") and not hasattr(root, "NODE_CLASS_MAPPINGS")
    assert all(issubclass(nodes.NODE_CLASS_MAPPINGS[i], io.ComfyNode) for i in IDS)


def test_categories_tooltips_and_descriptions(pack):
    import nodes

    for node_id in IDS:
        info = nodes.NODE_CLASS_MAPPINGS[node_id].GET_NODE_INFO_V1()
        assert info["category"].startswith("model/sampling/"), node_id
        assert info["description"] and info["display_name"].startswith("PeRFlow "), node_id
        assert all(spec[1].get("tooltip") for spec in info["input"]["required"].values()), node_id
        assert all(info["output_tooltips"]), node_id


def test_search_aliases_only_where_schema_has_the_field(pack, monkeypatch):
    from comfy_api.latest import io

    import nodes

    _, _, common = pack
    cls = nodes.NODE_CLASS_MAPPINGS["PeRFlowDeltaLoader"]
    assert "search_aliases" not in {f.name for f in dataclasses.fields(cls.define_schema())}  # 0.3.64: no field

    @dataclasses.dataclass
    class NewerSchema(io.Schema):
        search_aliases: list = None

    monkeypatch.setattr(io, "Schema", NewerSchema)
    aliases = cls.define_schema().search_aliases
    assert aliases[: len(common.SEARCH_ALIASES)] == common.SEARCH_ALIASES and "lora" in aliases


def test_models_perflow_is_created_on_load(pack, tmp_path, monkeypatch):
    import folder_paths

    _, root, _ = pack
    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path))
    asyncio.run(root.comfy_entrypoint())
    assert (tmp_path / "perflow").is_dir()
    assert str(tmp_path / "perflow") in folder_paths.get_folder_paths("perflow")


def test_too_old_comfyui_gets_one_log_line_and_no_nodes(pack, monkeypatch, caplog):
    import comfy.patcher_extension

    _, root, common = pack
    monkeypatch.delattr(comfy.patcher_extension.WrappersMP, "PREDICT_NOISE")
    spec = importlib.util.spec_from_file_location(
        "perflow_on_old_comfyui", comfy_env.REPO_ROOT / "__init__.py", submodule_search_locations=[]
    )
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    with caplog.at_level(logging.ERROR, logger="perflow"):
        spec.loader.exec_module(module)
    [line] = [r.getMessage() for r in caplog.records if r.name == "perflow"]
    assert f"needs ComfyUI >= {common.MIN_COMFYUI}" in line and "0.3.64" in line
    assert not hasattr(module, "comfy_entrypoint")
    pyproject = tomllib.loads((comfy_env.REPO_ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["comfy"]["requires-comfyui"] == ">=" + common.MIN_COMFYUI


# ---------------------------------------------------------------- the Delta Loader's report


@pytest.fixture(scope="module")
def sd15(pack):
    """(checkpoint name, {UNet key: shape}) of the tiny random SD1.5 checkpoint, registered with ComfyUI."""
    from safetensors import safe_open

    path = checkpoints.checkpoint_path("sd15")
    with safe_open(str(path), "pt") as f:
        shapes = {
            k.removeprefix("model."): f.get_slice(k).get_shape() for k in f.keys() if k.startswith("model." + UNET)
        }
    comfy_env.model_dir("perflow")
    return comfy_env.add_model_file("checkpoints", path), shapes


def small_delta(shapes: dict) -> dict[str, torch.Tensor]:
    """dW for three UNet keys, one of them a cross-attention to_k (its width tells the architecture)."""
    keys = sorted(shapes)[:2] + [next(k for k in sorted(shapes) if k.endswith("attn2.to_k.weight"))]
    g = torch.Generator().manual_seed(0)
    return {k: 0.01 * torch.randn(shapes[k], generator=g) for k in keys}


def test_summary_is_what_preview_any_shows(sd15):
    ckpt, shapes = sd15
    save_delta(
        comfy_env.model_dir("perflow") / "nodes3-summary.safetensors", small_delta(shapes),
        parameterization="diff_eps", num_windows=4, base_architecture="sd15", base_hash="0" * 64,
    )  # fmt: skip
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {
            "class_type": "PeRFlowDeltaLoader",
            "inputs": {
                "model": ["1", 0],
                "delta_name": "nodes3-summary.safetensors",
                "strength": 1.0,
                "parameterization": "auto",
                "num_windows": 0,
            },
        },  # fmt: skip
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}},
    }
    [text] = comfy_env.run_prompt(prompt)["3"]["text"]
    assert text.startswith("nodes3-summary.safetensors: perflow_delta, SD1.5 file on SD1.5 model; 3 weights patched")
    assert "parameterization diff_eps, 4 windows" in text


@pytest.fixture(scope="module")
def model(sd15):
    return comfy_env.call("CheckpointLoaderSimple", ckpt_name=sd15[0])[0]


def loaded_with_auto(model, name, caplog):
    with caplog.at_level(logging.WARNING, logger="perflow"):
        _, summary = comfy_env.call(
            "PeRFlowDeltaLoader", model=model, delta_name=name, strength=1.0, parameterization="auto", num_windows=0
        )
    return summary, [r.getMessage() for r in caplog.records if r.name == "perflow"]


def test_auto_parameterization_warns_only_when_it_guesses(sd15, model, caplog):
    import comfy.utils

    _, shapes = sd15
    dw = small_delta(shapes)
    save_delta(
        comfy_env.model_dir("perflow") / "nodes3-meta.safetensors", dw, parameterization="ddim_eps", num_windows=4,
        base_architecture="sd15", base_hash="0" * 64,
    )  # fmt: skip
    summary, logged = loaded_with_auto(model, "nodes3-meta.safetensors", caplog)
    assert "parameterization ddim_eps" in summary and not [m for m in logged if "diff_eps" in m]
    assert "diff_eps" not in summary
    caplog.clear()
    to_diffusers = {UNET + v: k for k, v in comfy.utils.unet_to_diffusers(checkpoints.unet_config("sd15")).items()}
    save_file(
        {to_diffusers[k]: t for k, t in dw.items()}, str(comfy_env.model_dir("perflow") / "nodes3-pub.safetensors")
    )
    summary, logged = loaded_with_auto(model, "nodes3-pub.safetensors", caplog)
    assert "parameterization diff_eps" in summary and [m for m in logged if "uses diff_eps" in m]
    assert summary.endswith("; the published SD1.5 delta uses diff_eps")  # the user sees the guess too


def test_kohya_lora_summary_names_skipped_text_encoder_modules(sd15, model):
    _, shapes = sd15
    key = next(k for k in sorted(shapes) if k.endswith("proj_in.weight") and len(shapes[k]) == 4)
    out_ch, in_ch = shapes[key][:2]
    unet = "lora_unet_" + key.removeprefix(UNET).removesuffix(".weight").replace(".", "_")
    te = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    g = torch.Generator().manual_seed(0)
    lora = {
        f"{unet}.lora_down.weight": torch.randn(4, in_ch, 1, 1, generator=g),
        f"{unet}.lora_up.weight": torch.randn(out_ch, 4, 1, 1, generator=g),
        f"{unet}.alpha": torch.tensor(4.0),
        f"{te}.lora_down.weight": torch.randn(4, 768, generator=g),
        f"{te}.lora_up.weight": torch.randn(3072, 4, generator=g),
        f"{te}.alpha": torch.tensor(4.0),
    }
    save_file(lora, str(comfy_env.model_dir("perflow") / "nodes3-kohya.safetensors"))
    _, summary = comfy_env.call(
        "PeRFlowDeltaLoader", model=model, delta_name="nodes3-kohya.safetensors", strength=1.0,
        parameterization="diff_eps", num_windows=4,
    )  # fmt: skip
    assert "kohya_lora" in summary and "1 weights patched" in summary
    assert "1 text-encoder LoRA modules skipped" in summary
