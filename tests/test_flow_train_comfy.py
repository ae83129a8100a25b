"""The comfy training backend on the small random SD3 (MMDiT) and Flux models of tests/flow_checkpoints.py (needs
COMFYUI_PATH): a few LoRA steps of `training.train --backend comfy` give a LoRA with time_kind flow and the model's
own shift, which the PeRFlow Delta Loader applies exactly as stock LoraLoaderModelOnly does.

The transformer, its model sampling, the LoRA adapters, the flow teacher solve and the loader are the real ones.
The text encoders and the VAE are not: these families' encoders are fixed full-size (T5-XXL alone is 4.7 B
parameters), so `load_components` is replaced by the small model as UNETLoader loads it plus seeded stand-ins that
return embeddings and latents of the real shapes (SD3: context 154 x 4096, pooled 2048; Flux: 256 x 4096, 768;
16-channel latents at 1/8 of the image size)."""

import hashlib
import json
import sys

import pytest
import torch
from PIL import Image
from safetensors import safe_open

import comfy_env
from training.train import train

NAMES = {"sd3": "SD3 (MMDiT)", "flux": "Flux"}
SHIFT = {"sd3": "3", "flux": None}  # Flux: exp(1.15), compared numerically


class StandInClip:
    """Embeddings of a family's real text-encoder shapes, seeded by the caption (tokenize + encode_from_tokens)."""

    def __init__(self, family: str):
        import flow_checkpoints as fc

        (self.tokens, self.width), self.pooled = fc.COND_SHAPES[family]

    def tokenize(self, caption: str) -> dict:
        return {"t5xxl": [[caption]]}

    def encode_from_tokens(self, tokens: dict, return_pooled: bool = False):
        seed = int(hashlib.sha256(tokens["t5xxl"][0][0].encode()).hexdigest()[:8], 16)
        g = torch.Generator().manual_seed(seed)
        return torch.randn(1, self.tokens, self.width, generator=g), torch.randn(1, self.pooled, generator=g)


class StandInVae:
    """16-channel latents at 1/8 of the image size (a fixed random projection of 8x8 pixel blocks) and back."""

    def __init__(self):
        self.proj = torch.randn(16, 3 * 64, generator=torch.Generator().manual_seed(0)) / 8

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = pixels.shape
        blocks = pixels.movedim(-1, 1).unfold(2, 8, 8).unfold(3, 8, 8)  # [B, 3, h/8, w/8, 8, 8]
        flat = blocks.permute(0, 2, 3, 1, 4, 5).reshape(b, h // 8, w // 8, -1)
        return (flat @ self.proj.T).permute(0, 3, 1, 2) * 2 - 1

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        up = torch.nn.functional.interpolate(latents[:, :3], scale_factor=8)
        return (up.movedim(1, -1).tanh() + 1) / 2


@pytest.fixture(scope="module")
def comfy():
    comfy_env.require_comfyui()
    comfy_env.setup_comfyui()
    comfy_env.load_pack()
    import nodes

    sys.modules[nodes.NODE_CLASS_MAPPINGS["PeRFlowDeltaLoader"].__module__].register_folder()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    g = torch.Generator().manual_seed(0)
    for i, caption in enumerate(["a red square", "a blue circle", "a green field at night", "a cat"]):
        Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).byte().numpy()).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(caption)
    return folder


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_lora_steps_on_a_flow_model_give_a_lora_the_delta_loader_applies(comfy, images, tmp_path, family, monkeypatch):
    import flow_checkpoints as fc

    import training.backends.comfy as backend

    model = fc.load_model(family)
    monkeypatch.setattr(backend, "load_components", lambda path: (fc.load_model(family), StandInClip(family),
                                                                     StandInVae()))  # fmt: skip
    out = tmp_path / "run"
    argv = [
        "--backend", "comfy", "--checkpoint", str(fc.model_path(family)), "--data", str(images), "--out", str(out),
        "--resolution", "64", "--batch-size", "2", "--steps", "3", "--solver-steps", "2", "--lora-rank", "4",
        "--cpu", "--threads", "1", "--ema-decay", "0", "--lr", "1e-2", "--warmup", "0", "--sample-teacher-steps", "4",
    ]  # fmt: skip
    train(argv)
    lora_path = out / "perflow_lora.safetensors"
    with safe_open(str(lora_path), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["time_kind"] == "flow" and meta["base_architecture"] == family
    assert meta["parameterization"] == "velocity" and meta["num_windows"] == "4" and meta["steps_trained"] == "3"
    shift = float(meta["flow_shift"])
    expected_shift = 3.0 if family == "sd3" else float(torch.tensor(1.15, dtype=torch.float64).exp())
    assert shift == pytest.approx(expected_shift, rel=1e-9)  # the model sampling's own shift
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values() if isinstance(v, float))

    name = comfy_env.add_model_file("loras", lora_path, f"perflow-test-flow-{family}.safetensors")
    ours, text = comfy_env.call(
        "PeRFlowDeltaLoader", model=model, delta_name="loras/" + name, strength=1.0, parameterization="auto",
        num_windows=0,
    )  # fmt: skip
    assert f"kohya_lora, {NAMES[family]} file on {NAMES[family]} model" in text and "trained at flow shift" not in text
    (stock,) = comfy_env.call("LoraLoaderModelOnly", model=model, lora_name=name, strength_model=1.0)
    base = {k: v.clone() for k, v in model.model_state_dict().items()}
    got, want = [], []
    for patched, into in ((ours, got), (stock, want)):
        patched.patch_model()
        try:
            into.append({k: v.clone() for k, v in patched.model_state_dict().items()})
        finally:
            patched.unpatch_model()
    assert all(torch.equal(got[0][k], want[0][k]) for k in base)
    changed = [k for k in base if not torch.equal(got[0][k], base[k])]
    assert len(changed) == len(keys) // 3  # every adapted layer moved off the base


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_teacher_is_the_models_own_velocity_as_comfyui_evaluates_it(comfy, images, tmp_path, family, monkeypatch):
    """backend.teacher_eps(x, sigma, cond) = (x - denoised) / sigma of ComfyUI's own apply_model (CONST): the
    transformer gets the same timestep, context, pooled y and Flux guidance as in ComfyUI's sampling."""
    import flow_checkpoints as fc

    import training.backends.comfy as backend
    from training.train import build_parser

    model = fc.load_model(family)
    monkeypatch.setattr(backend, "load_components", lambda path: (model, StandInClip(family), StandInVae()))
    argv = ["--backend", "comfy", "--checkpoint", str(fc.model_path(family)), "--data", str(images), "--out",
            str(tmp_path / "run"), "--resolution", "64", "--batch-size", "2", "--lora-rank", "4", "--cpu"]  # fmt: skip
    b = backend.ComfyBackend(build_parser().parse_args(argv), torch.device("cpu"))
    assert b.time_kind == "flow" and b.architecture == family
    latents, cond, _ = b.batch(torch.arange(2))
    g = torch.Generator().manual_seed(4)
    sigma = torch.tensor([0.9, 0.35])
    x = latents + sigma[:, None, None, None] * (torch.randn(latents.shape, generator=g) - latents)
    ours = b.teacher_eps(x, sigma, cond)
    extra = {"guidance": cond["guidance"]} if family == "flux" else {}
    with torch.no_grad():
        denoised = b.base.apply_model(x, sigma, c_crossattn=cond["context"], y=cond["y"], **extra)
    torch.testing.assert_close(ours, (x - denoised) / sigma[:, None, None, None], atol=1e-5, rtol=1e-4)
    if family == "flux":
        assert torch.equal(cond["guidance"], torch.full((2,), backend.FLUX_GUIDANCE))


def test_gradient_checkpointing_on_flux_is_refused_naming_the_fix(comfy, images, tmp_path, monkeypatch):
    import flow_checkpoints as fc

    import training.backends.comfy as backend
    from training.cli import UserError
    from training.train import build_parser

    monkeypatch.setattr(backend, "load_components", lambda path: (fc.load_model("flux"), StandInClip("flux"),
                                                                     StandInVae()))  # fmt: skip
    argv = ["--backend", "comfy", "--checkpoint", str(fc.model_path("flux")), "--data", str(images), "--out",
            str(tmp_path / "run"), "--gradient-checkpointing", "--cpu"]  # fmt: skip
    with pytest.raises(UserError, match="--gradient-checkpointing does not work with ComfyUI's Flux blocks"):
        backend.ComfyBackend(build_parser().parse_args(argv), torch.device("cpu"))
