"""Comfy backend on a random tiny SD1.5 checkpoint (needs COMFYUI_PATH): a few steps give an applicable delta."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from training.train import train

comfy_env = pytest.importorskip("tests.comfy_env", reason="tests/comfy_env.py (branch comfyenv) not merged")


@pytest.fixture(scope="module")
def tiny_sd15():
    comfy_env.setup_comfyui()
    from tests.checkpoints import checkpoint_path

    return checkpoint_path("sd15")


def make_images(folder):
    from PIL import Image

    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i, caption in enumerate(["a red square", "a blue circle", "a green field at night"]):
        pixels = (torch.rand(80 + 8 * i, 64, 3, generator=g) * 255).byte().numpy()
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(caption)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (folder / "broken.txt").write_text("a corrupt file")


def test_comfy_backend_trains_a_delta_the_checkpoint_accepts(tiny_sd15, tmp_path):
    import comfy.sd

    make_images(tmp_path / "data")
    out = tmp_path / "run"
    argv = ["--backend", "comfy", "--checkpoint", str(tiny_sd15), "--data", str(tmp_path / "data"), "--out", str(out)]
    argv += ["--resolution", "64", "--batch-size", "2", "--steps", "2", "--solver-steps", "1", "--no-samples"]
    summary = train([*argv, "--threads", "2", "--cache-latents", "--gradient-checkpointing", "--ema-decay", "0"])
    assert summary["step"] == 2
    log = (out / "train.log").read_text()
    assert "3 images, 1 skipped as unreadable (sd15)" in log
    delta = load_file(out / "perflow_delta.safetensors")
    with safe_open(out / "perflow_delta.safetensors", "pt") as f:
        assert f.metadata()["base_architecture"] == "sd15"
    patcher = comfy.sd.load_checkpoint_guess_config(str(tiny_sd15), output_vae=False, output_clip=False)[0]
    sd = patcher.model.state_dict()
    assert delta and all(k in sd and sd[k].shape == v.shape for k, v in delta.items())
    assert any(v.abs().max() > 0 for v in delta.values())
    patched = patcher.add_patches({k: ("diff", (v,)) for k, v in delta.items()}, 1.0)
    assert len(patched) == len(delta)
    key = "diffusion_model.out.2.weight"
    before = sd[key].float().clone()
    patcher.patch_model()
    after = patcher.model.state_dict()[key].float()
    torch.testing.assert_close(after, before + delta[key].float(), atol=2e-3, rtol=1e-2)
