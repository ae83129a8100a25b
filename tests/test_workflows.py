"""The shipped workflows: UI graphs in workflows/, API twins in workflows/api/.

Always: every file parses, UI and API files pair up, links are consistent, twins have the same nodes, and each UI
graph documents its models. With COMFYUI_PATH: ComfyUI's own validate_prompt accepts every API workflow (placeholder
model files), and each UI graph converts to exactly its API twin using the real node definitions.
"""

import json
import os
from pathlib import Path

import pytest

from tools import workflows_tool as wt

UI_FILES = sorted(wt.WORKFLOWS.glob("*.json"))
API_FILES = sorted(wt.API_DIR.glob("*.json"))
NAMES = [p.stem for p in UI_FILES]
# Which model folder each loader widget reads (LoadImage reads the input directory).
MODEL_INPUTS = {
    ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
    ("LoraLoader", "lora_name"): "loras",
    ("PeRFlowDeltaLoader", "delta_name"): "perflow",
    ("ControlNetLoader", "control_net_name"): "controlnet",
    ("UNETLoader", "unet_name"): "diffusion_models",
    ("CLIPLoader", "clip_name"): "text_encoders",
    ("VAELoader", "vae_name"): "vae",
    ("LoadImage", "image"): "input",
    ("ADE_LoadAnimateDiffModel", "model_name"): "animatediff_models",
}


def needs_animatediff(api: dict) -> bool:
    """Whether a workflow uses AnimateDiff-Evolved's nodes (validated only when ANIMATEDIFF_PATH is set)."""
    return any(e["class_type"].startswith("ADE_") for e in api.values())


def load(path):
    return json.loads(Path(path).read_text())


def test_every_file_parses_and_pairs_up():
    assert len(UI_FILES) >= 8, "expected the eight shipped workflows"
    for p in UI_FILES + API_FILES:
        load(p)
    found, problems = wt.pairs()
    assert not problems
    assert len(found) == len(UI_FILES)


@pytest.mark.parametrize("name", NAMES)
def test_links_are_consistent(name):
    ui, api = load(wt.WORKFLOWS / f"{name}.json"), load(wt.API_DIR / f"{name}.json")
    assert ui["version"] == 0.4
    assert wt.link_problems(ui) == []
    assert wt.api_link_problems(api) == []


@pytest.mark.parametrize("name", NAMES)
def test_twins_have_the_same_nodes(name):
    ui, api = load(wt.WORKFLOWS / f"{name}.json"), load(wt.API_DIR / f"{name}.json")
    assert {str(n["id"]): n["type"] for n in wt.real_nodes(ui)} == {k: v["class_type"] for k, v in api.items()}


@pytest.mark.parametrize("name", NAMES)
def test_note_names_every_model_with_url_folder_and_licence(name):
    ui = load(wt.WORKFLOWS / f"{name}.json")
    notes = [n for n in ui["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1
    text = notes[0]["widgets_values"][0]
    models = [m for n in ui["nodes"] for m in n.get("properties", {}).get("models", [])]
    assert models, "loader nodes carry properties.models for the missing-model dialog"
    for m in models:
        assert m["url"].startswith("https://huggingface.co/") and m["url"] in text
        assert f"models/{m['directory']}/{m['name']}" in text
    assert "CC-BY-NC-4.0" in text and "licence" in text


@pytest.mark.parametrize("name", NAMES)
def test_opens_with_everything_visible(name):
    """At the saved zoom in a 1920x1080 window: Note top-left, every node on screen, none under another or the
    minimap (node sizes as the frontend draws them; tools/workflows_tool.py view_problems)."""
    assert wt.view_problems(load(wt.WORKFLOWS / f"{name}.json")) == []


@pytest.mark.parametrize("name", NAMES)
def test_delta_loader_summary_is_shown(name):
    api = load(wt.API_DIR / f"{name}.json")
    loaders = [nid for nid, e in api.items() if e["class_type"] == "PeRFlowDeltaLoader"]
    previews = [e["inputs"]["source"] for e in api.values() if e["class_type"] == "PreviewAny"]
    assert all([nid, 1] in previews for nid in loaders)


# ---------------------------------------------------------------- with a real ComfyUI


@pytest.fixture(scope="module")
def comfy():
    """ComfyUI in-process (tests/comfy_env.py) with this pack loaded and placeholder model and input files."""
    import comfy_env

    base = comfy_env.setup_comfyui()  # skips without COMFYUI_PATH
    comfy_env.load_pack()
    with_animatediff = bool(os.environ.get("ANIMATEDIFF_PATH"))
    if with_animatediff:
        comfy_env.load_animatediff()
    import folder_paths

    import nodes

    for cls in {e["class_type"] for p in API_FILES for e in load(p).values()} & set(nodes.NODE_CLASS_MAPPINGS):
        nodes.NODE_CLASS_MAPPINGS[cls].INPUT_TYPES()  # the delta loader registers models/perflow on first use
    for api_path in API_FILES:
        if needs_animatediff(load(api_path)) and not with_animatediff:
            continue
        for entry in load(api_path).values():
            for (cls, inp), folder in MODEL_INPUTS.items():
                if entry["class_type"] == cls and inp in entry["inputs"]:
                    target = base / "input" if folder == "input" else comfy_env.model_dir(folder)
                    (target / entry["inputs"][inp]).touch()
    folder_paths.filename_list_cache.clear()
    return nodes, comfy_env


def _require_classes(nodes, api):
    if needs_animatediff(api):
        import comfy_env

        comfy_env.require_animatediff()  # skips, naming ANIMATEDIFF_PATH
    missing = sorted({e["class_type"] for e in api.values()} - set(nodes.NODE_CLASS_MAPPINGS))
    assert not missing, f"unknown node classes (did this pack fail to import?): {missing}"


@pytest.mark.parametrize("name", NAMES)
def test_comfyui_validates_the_api_workflow(comfy, name):
    nodes, comfy_env = comfy
    api = load(wt.API_DIR / f"{name}.json")
    _require_classes(nodes, api)
    ok, error, outputs, node_errors = comfy_env.validate_prompt(api)
    assert ok is True, (error, node_errors)
    assert outputs


@pytest.mark.parametrize("name", NAMES)
def test_ui_graph_converts_to_its_api_twin(comfy, name):
    nodes, _ = comfy
    ui, api = load(wt.WORKFLOWS / f"{name}.json"), load(wt.API_DIR / f"{name}.json")
    _require_classes(nodes, api)
    schema = wt.object_info(nodes.NODE_CLASS_MAPPINGS, {e["class_type"] for e in api.values()})
    assert wt.compare(ui, api, schema) == []
    for n in wt.real_nodes(ui):  # the UI sockets are exactly the node's socket inputs, in order
        assert [(i["name"], i["type"]) for i in n["inputs"]] == [
            (name, typ) for name, typ, _ in wt.socket_inputs(schema[n["type"]])
        ], n["type"]


# The shipped SD1.5 workflows whose models a test can stand in for: the tiny random SD1.5 checkpoint under the
# workflow's checkpoint name, and a diffusers-format dW (no metadata, like the published delta) under the delta name.
RUNNABLE = ["sd15_delta_t2i_4step", "sd15_cfg_schedule", "sd15_sampler_custom_advanced"]


@pytest.fixture(scope="module")
def tiny_sd15_as_shipped(comfy):
    import folder_paths
    import torch
    from comfy.utils import unet_to_diffusers
    from safetensors import safe_open
    from safetensors.torch import save_file

    import checkpoints

    _, comfy_env = comfy
    names = {e["class_type"]: e["inputs"] for n in RUNNABLE for e in load(wt.API_DIR / f"{n}.json").values()}
    ckpt = comfy_env.model_dir("checkpoints") / names["CheckpointLoaderSimple"]["ckpt_name"]
    ckpt.unlink(missing_ok=True)  # the placeholder of the validation tests
    ckpt.symlink_to(checkpoints.checkpoint_path("sd15"))
    to_diffusers = {v: k for k, v in unet_to_diffusers(checkpoints.unet_config("sd15")).items()}
    with safe_open(str(ckpt), "pt") as f:
        keys = [k for k in f.keys() if k.startswith("model.diffusion_model.") and "transformer_blocks.0.attn2" in k]
        g = torch.Generator().manual_seed(0)
        dw = {
            to_diffusers[k.removeprefix("model.diffusion_model.")]: 0.01
            * torch.randn(f.get_slice(k).get_shape(), generator=g)
            for k in keys
        }  # noqa: E501
    save_file(dw, str(comfy_env.model_dir("perflow") / names["PeRFlowDeltaLoader"]["delta_name"]))
    folder_paths.filename_list_cache.clear()
    return len(dw)


@pytest.mark.parametrize("name", RUNNABLE)
def test_sd15_workflow_runs_and_shows_the_summary(comfy, tiny_sd15_as_shipped, name):
    _, comfy_env = comfy
    api = load(wt.API_DIR / f"{name}.json")
    for entry in api.values():
        if entry["class_type"] == "EmptyLatentImage":
            entry["inputs"].update(width=64, height=64)  # the tiny model at 512x512 would take minutes on a CPU
    outputs = comfy_env.run_prompt(api)
    [summary] = [outputs[nid]["text"][0] for nid, e in api.items() if e["class_type"] == "PreviewAny"]
    assert f"diffusers_delta, SD1.5 file on SD1.5 model; {tiny_sd15_as_shipped} weights patched" in summary
    assert "parameterization diff_eps, 4 windows" in summary
    [images] = [outputs[nid]["images"] for nid, e in api.items() if e["class_type"] == "SaveImage"]
    assert len(images) == 1
