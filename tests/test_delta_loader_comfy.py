"""The PeRFlow Delta Loader inside a real ComfyUI (skips without COMFYUI_PATH), on the random-initialised
SD1.5 / SD2.1 / SDXL checkpoints of tests/checkpoints.py, each loaded once per module by CheckpointLoaderSimple.

Weights are read the way ComfyUI runs them: patch the shared model, read its state dict, unpatch.
"""

import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import checkpoints
import comfy_env
from perflow_core.delta_format import save_delta

FORMATS = ("perflow_delta", "diffusers_delta", "diffusers_merged", "ldm_merged", "ldm_delta")
DELTA_FORMATS = ("perflow_delta", "diffusers_delta", "ldm_delta")
ARCH_NAMES = {"sd15": "SD1.5", "sd21": "SD2.1", "sdxl": "SDXL"}
UNET = "diffusion_model."
# model family -> (family of the diffusers delta put on it, the reason it is refused)
REFUSALS = {"sd21": ("sd15", "differ in shape"), "sd15": ("sdxl", "no counterpart")}
ATOL = 1e-6
CHUNK = 128  # keys per batch of foreach ops


@pytest.fixture(scope="module")
def loader():
    """ComfyUI (CPU) with this pack loaded by comfy_env; returns the pack's delta_loader module."""
    comfy_env.require_comfyui()
    comfy_env.setup_comfyui()
    comfy_env.load_pack()
    import nodes

    module = sys.modules[nodes.NODE_CLASS_MAPPINGS["PeRFlowDeltaLoader"].__module__]
    module.register_folder()
    return module


def unet_weights(patcher) -> dict[str, torch.Tensor]:
    """The model's UNet tensors, by reference."""
    return {k: v for k, v in patcher.model_state_dict().items() if k.startswith(UNET)}


@contextmanager
def weights_as_run(patcher) -> Iterator[dict[str, torch.Tensor]]:
    """The UNet weights ComfyUI actually runs: patch the shared model, yield its weights, restore."""
    patcher.patch_model()
    try:
        yield unet_weights(patcher)
    finally:
        patcher.unpatch_model()


def keys_off(got: dict, base: dict, delta: dict, s: float) -> dict[str, float]:
    """Keys where max |got - (base + s * delta)| > ATOL (every key checked, with foreach ops in batches; fp32)."""
    keys = list(base)
    assert set(got) == set(keys)
    errors = []
    for i in range(0, len(keys), CHUNK):
        ks = keys[i : i + CHUNK]
        want = torch._foreach_add([base[k] for k in ks], [delta[k] for k in ks], alpha=s)
        torch._foreach_sub_(want, [got[k] for k in ks])
        errors += torch._foreach_norm(want, float("inf"))
    return {k: e for k, e in zip(keys, torch.stack(errors).tolist(), strict=True) if e > ATOL}


def diffusers_names(family: str) -> dict[str, str]:
    """Model key -> diffusers key, from ComfyUI's own table for the family's unet_config."""
    import comfy.utils

    return {UNET + v: k for k, v in comfy.utils.unet_to_diffusers(checkpoints.unet_config(family)).items()}


@cache
def synthetic_delta(family: str) -> dict[str, torch.Tensor]:
    """dW for every UNet key of the family's checkpoint (model key names, fp16, 0.01 * randn); made once.

    Each key gets its own copy of a window at a random offset into one shared random pool: cheap, and no two keys
    of the same shape get the same values (a swapped key mapping would show).
    """
    with safe_open(str(checkpoints.checkpoint_path(family)), "pt") as f:
        shapes = {
            k.removeprefix("model."): f.get_slice(k).get_shape() for k in f.keys() if k.startswith("model." + UNET)
        }
    g = torch.Generator().manual_seed(1)
    sizes = {k: math.prod(shape) for k, shape in shapes.items()}
    pool = (0.01 * torch.randn(2 * max(sizes.values()), generator=g)).half()
    offsets = torch.randint(0, max(sizes.values()), (len(shapes),), generator=g).tolist()
    return {
        k: pool[off : off + sizes[k]].view(shapes[k]).clone() for k, off in zip(sorted(shapes), offsets, strict=True)
    }


def write_model_file(kind: str, name: str, tensors: dict) -> str:
    """Save tensors into ComfyUI's model folder `kind`; return the name the nodes take."""
    import folder_paths

    save_file(tensors, str(comfy_env.model_dir(kind) / name))
    folder_paths.filename_list_cache.clear()
    return name


@cache
def delta_file(family: str, fmt: str) -> str:
    """The family's synthetic dW as a file in models/perflow, in one of the delta formats; written once."""
    dw = synthetic_delta(family)
    name = f"{family}-{fmt}.safetensors"
    if fmt == "perflow_delta":
        path = comfy_env.model_dir("perflow") / name
        save_delta(path, dw, parameterization="diff_eps", num_windows=4, base_architecture=family, base_hash="0" * 64)
        return name
    if fmt == "diffusers_delta":
        names = diffusers_names(family)
        return write_model_file("perflow", name, {names[k]: t for k, t in dw.items()})
    assert fmt == "ldm_delta"
    return write_model_file("perflow", name, dw)


@dataclass
class Family:
    name: str
    model: object  # ModelPatcher from CheckpointLoaderSimple; the tests patch only clones of it
    clip: object  # kept for SD1.5 only (sampling); the SD2.1/SDXL text encoders are dropped to save memory
    w: dict[str, torch.Tensor]  # a copy of the model's UNet weights as loaded
    deltas: dict[str, dict[str, torch.Tensor]]  # format -> the dW (fp32) a correct loader applies at strength 1
    files: dict[str, str]  # format -> models/perflow file name


@pytest.fixture(scope="module", params=checkpoints.FAMILIES)
def family(request, loader) -> Iterator[Family]:
    """One family's checkpoint loaded by CheckpointLoaderSimple, with its synthetic dW in every format."""
    name = request.param
    ckpt = comfy_env.add_model_file("checkpoints", checkpoints.checkpoint_path(name))
    model, clip, _ = comfy_env.call("CheckpointLoaderSimple", ckpt_name=ckpt)[:3]
    w = {k: v.detach().clone() for k, v in unet_weights(model).items()}
    dw = synthetic_delta(name)
    assert set(dw) == set(w)
    files = {fmt: delta_file(name, fmt) for fmt in DELTA_FORMATS}
    # merged = W + dW (fp32); what the loader can recover from it is merged - W
    merged = torch._foreach_add([w[k].float() for k in dw], [t.float() for t in dw.values()])
    names = diffusers_names(name)
    files["diffusers_merged"] = write_model_file(
        "perflow", f"{name}-merged-diffusers.safetensors", {names[k]: t for k, t in zip(dw, merged, strict=True)}
    )
    ldm = {"model." + k: t for k, t in zip(dw, merged, strict=True)} | {"first_stage_model.x": torch.ones(1)}
    files["ldm_merged"] = write_model_file("perflow", f"{name}-merged-ldm.safetensors", ldm)
    torch._foreach_sub_(merged, [w[k].float() for k in dw])
    merged_dw = dict(zip(dw, merged, strict=True))
    dw32 = {k: t.float() for k, t in dw.items()}  # converted once, not per comparison
    deltas = {fmt: merged_dw if fmt.endswith("merged") else dw32 for fmt in FORMATS}
    clip = clip if name == "sd15" else None  # the generator frame would keep the big text encoders alive
    yield Family(name, model, clip, w, deltas, files)
    for fmt in ("diffusers_merged", "ldm_merged"):
        (comfy_env.model_dir("perflow") / files[fmt]).unlink()


def load(model, delta_name: str, strength: float, parameterization: str = "diff_eps"):
    """The PeRFlow Delta Loader node, called as ComfyUI calls it: (model, summary)."""
    return comfy_env.call(
        "PeRFlowDeltaLoader",
        model=model,
        delta_name=delta_name,
        strength=strength,
        parameterization=parameterization,
        num_windows=0,
    )


def assert_untouched(f: Family) -> None:
    assert not f.model.patches
    now = unet_weights(f.model)
    assert now.keys() == f.w.keys()
    changed = [k for k in f.w if not torch.equal(now[k], f.w[k])]
    assert not changed, changed[:3]


@pytest.mark.parametrize("fmt", FORMATS)
def test_patched_weights_are_w_plus_s_dw(family, fmt):
    f, arch = family, ARCH_NAMES[family.name]
    for s in (1.0, 0.5):
        out, summary = load(f.model, f.files[fmt], s)
        assert f"{fmt}, {arch} file on {arch} model; {len(f.w)} weights patched at strength {s:g}" in summary
        assert type(out.get_model_object("model_sampling")).__name__ == "PeRFlowModelSampling"
        with weights_as_run(out) as got:
            off = keys_off(got, f.w, f.deltas[fmt], s)
        assert not off, f"{len(off)} of {len(f.w)} weights are not W + {s} dW, e.g. {list(off.items())[:3]}"
        del out
    assert_untouched(f)


@pytest.mark.parametrize("family", list(REFUSALS), indirect=True)
def test_wrong_architecture_is_refused_with_nothing_patched(loader, family):
    file_family, match = REFUSALS[family.name]
    with pytest.raises(loader.DeltaFileError, match=match) as e:
        load(family.model, delta_file(file_family, "diffusers_delta"), 1.0)
    names = f"looks like {ARCH_NAMES[file_family]}, the model is {ARCH_NAMES[family.name]}; nothing was applied"
    assert names in str(e.value)
    assert_untouched(family)


@pytest.mark.parametrize("family", ["sd15"], indirect=True)
def test_kohya_lora_matches_stock_lora_loader(loader, family, tmp_path):
    g = torch.Generator().manual_seed(3)
    lora = {}
    for k, v in family.w.items():
        if v.ndim < 2 or not k.endswith(".weight"):
            continue
        name = "lora_unet_" + k.removeprefix(UNET).removesuffix(".weight").replace(".", "_")
        tail = (1,) * (v.ndim - 2)
        lora[f"{name}.lora_down.weight"] = 0.1 * torch.randn((4, *v.shape[1:]), generator=g)
        lora[f"{name}.lora_up.weight"] = 0.1 * torch.randn((v.shape[0], 4, *tail), generator=g)
        lora[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(lora, str(tmp_path / "perflow-test-style.safetensors"))
    name = comfy_env.add_model_file("loras", tmp_path / "perflow-test-style.safetensors")
    assert "loras/" + name in comfy_env.node("PeRFlowDeltaLoader").INPUT_TYPES()["required"]["delta_name"][1]["options"]
    ours, summary = load(family.model, "loras/" + name, 0.7, "ddim_eps")
    (stock,) = comfy_env.call("LoraLoaderModelOnly", model=family.model, lora_name=name, strength_model=0.7)
    n = len(lora) // 3
    assert f"kohya_lora, SD1.5 file on SD1.5 model; {n} weights patched" in summary
    with weights_as_run(ours) as run:
        got = {k: v.clone() for k, v in run.items()}
    with weights_as_run(stock) as want:
        differ = [k for k in family.w if not torch.equal(got[k], want[k])]
    assert not differ, differ[:3]
    assert sum(not torch.equal(got[k], family.w[k]) for k in family.w) == n
    assert_untouched(family)


@pytest.mark.parametrize("family", ["sd15"], indirect=True)
def test_pickle_file_in_lora_folder_is_refused(loader, family, tmp_path):
    torch.save({"a": torch.ones(1)}, tmp_path / "perflow-test-evil.pt")
    name = comfy_env.add_model_file("loras", tmp_path / "perflow-test-evil.pt")
    assert "loras/" + name not in loader.file_choices()
    with pytest.raises(loader.DeltaFileError, match="pickle"):
        load(family.model, "loras/" + name, 1.0, "auto")
    assert not family.model.patches


@pytest.mark.parametrize("family", ["sd15"], indirect=True)
def test_four_step_ksampler_through_the_loader(family):
    import comfy.model_management

    model, summary = load(family.model, family.files["diffusers_delta"], 1.0, "auto")
    assert "parameterization diff_eps, 4 windows" in summary
    positive = comfy_env.call("CLIPTextEncode", clip=family.clip, text="a photo of a cat")[0]
    negative = comfy_env.call("CLIPTextEncode", clip=family.clip, text="blurry")[0]
    latent = comfy_env.call("EmptyLatentImage", width=64, height=64, batch_size=1)[0]
    try:
        out = comfy_env.call(
            "KSampler", model=model, seed=0, steps=4, cfg=4.5, sampler_name="perflow", scheduler="perflow",
            positive=positive, negative=negative, latent_image=latent, denoise=1.0,
        )[0]["samples"]  # fmt: skip
    finally:
        comfy.model_management.unload_all_models()  # restores the shared weights the sampler patched
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
    assert_untouched(family)
