"""Real-ComfyUI fixtures: tiny random SD1.5/SD2.1/SDXL checkpoints load, are detected and sample (COMFYUI_PATH)."""

import logging

import checkpoints
import comfy_env
import pytest
import torch

PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def comfy():
    """ComfyUI imported in-process (skips without COMFYUI_PATH)."""
    return comfy_env.setup_comfyui()


@pytest.fixture(scope="module", params=checkpoints.FAMILIES)
def loaded(request, comfy):
    """(family, file name, (model, clip, vae), warning messages logged while loading) per family."""
    name = comfy_env.add_model_file("checkpoints", checkpoints.checkpoint_path(request.param))
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger().addHandler(handler)
    try:
        out = comfy_env.call("CheckpointLoaderSimple", ckpt_name=name)
    finally:
        logging.getLogger().removeHandler(handler)
    return request.param, name, out, [r.getMessage() for r in records]


def test_require_comfyui_skips_naming_the_variable(monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    with pytest.raises(pytest.skip.Exception, match="COMFYUI_PATH"):
        comfy_env.require_comfyui()


def test_checkpoint_is_detected_as_its_family(loaded):
    family, _, (model, clip, vae), _ = loaded
    config = model.model.model_config
    assert type(config).__name__ == checkpoints.MODEL_CONFIG_CLASS[family]
    assert {k: v for k, v in config.unet_config.items() if k != "dtype"} == checkpoints.unet_config(family)
    assert clip is not None and vae.first_stage_model is not None


def test_checkpoint_has_every_key(loaded):
    family, name, (model, _, vae), warnings = loaded
    assert not [w for w in warnings if "missing" in w.lower()], warnings
    from safetensors import safe_open

    with safe_open(str(comfy_env.model_dir("checkpoints") / name), "pt") as f:
        conv_in = f.get_tensor("model.diffusion_model.input_blocks.0.0.weight").float()
        vae_in = f.get_tensor("first_stage_model.decoder.conv_in.weight").float()
    assert torch.equal(model.model.diffusion_model.input_blocks[0][0].weight.float(), conv_in)
    assert torch.equal(vae.first_stage_model.decoder.conv_in.weight.float(), vae_in)


def test_one_step_ksampler_is_finite(loaded):
    family, _, (model, clip, vae), _ = loaded
    positive = comfy_env.call("CLIPTextEncode", clip=clip, text=PROMPT)[0]
    assert torch.isfinite(positive[0][0]).all()
    negative = positive  # one text encode per family (the encoders dominate CPU time); cfg 7 still batches two
    latent = comfy_env.call("EmptyLatentImage", width=64, height=64, batch_size=1)[0]
    kwargs = dict(seed=0, steps=1, cfg=7.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    out = comfy_env.call("KSampler", model=model, positive=positive, negative=negative, latent_image=latent, **kwargs)[
        0
    ]["samples"]
    assert out.shape == (1, 4, 8, 8)
    assert torch.isfinite(out).all() and out.std() > 0
    image = comfy_env.call("VAEDecode", vae=vae, samples={"samples": out})[0]
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all()


def api_prompt(ckpt_name: str) -> dict:
    """Checkpoint -> two prompts -> 1-step KSampler -> VAEDecode -> SaveImage, in API format."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": PROMPT}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
                "seed": 0, "steps": 1, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            },
        },
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "fixture"}},
    }  # fmt: skip


def test_prompt_validates_and_runs(comfy):
    name = comfy_env.add_model_file("checkpoints", checkpoints.checkpoint_path("sd15"))
    outputs = comfy_env.run_prompt(api_prompt(name))
    images = outputs["7"]["images"]
    assert len(images) == 1 and (comfy / "output" / images[0]["subfolder"] / images[0]["filename"]).is_file()


def test_prompt_validation_reports_bad_values(comfy):
    prompt = api_prompt("no-such-model.safetensors")
    prompt["5"]["inputs"]["steps"] = 0
    ok, _, _, node_errors = comfy_env.validate_prompt(prompt)
    assert not ok
    kinds = {e["type"] for errs in node_errors.values() for e in errs["errors"]}
    assert {"value_not_in_list", "value_smaller_than_min"} <= kinds


def write_pack(root, body: str):
    """A one-file node pack at `root` with the given __init__.py."""
    root.mkdir()
    (root / "__init__.py").write_text(body)
    return root


PROBE = """
class Probe:
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = "test"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"x": ("INT", {"default": 1})}}

    def run(self, x):
        return (x + 1,)

NODE_CLASS_MAPPINGS = {"PerflowEnvProbe": Probe}
"""


def test_load_pack_registers_its_nodes(comfy, tmp_path):
    added = comfy_env.load_pack(write_pack(tmp_path / "probe", PROBE), name="perflow-env-probe")
    assert added == {"PerflowEnvProbe"}
    assert comfy_env.call("PerflowEnvProbe", x=2) == (3,)


def test_load_pack_raises_on_import_failure(comfy, tmp_path):
    broken = write_pack(tmp_path / "broken", "raise ImportError('boom')\n")
    with pytest.raises(RuntimeError, match="IMPORT FAILED"):
        comfy_env.load_pack(broken, name="perflow-env-broken")


def test_this_pack_imports(comfy):
    if not (comfy_env.REPO_ROOT / "__init__.py").is_file():
        pytest.skip("the pack's __init__.py is not on this branch yet")
    assert comfy_env.load_pack()
