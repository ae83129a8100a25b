"""Comfy backend on a random tiny SD1.5 checkpoint (needs COMFYUI_PATH): a few steps give an applicable delta."""

import json
import math
import sys

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import comfy_env
from training.train import train


@pytest.fixture(scope="module")
def tiny_sd15():
    comfy_env.require_comfyui()
    comfy_env.setup_comfyui()
    comfy_env.load_pack()
    import nodes

    # models/perflow is registered on first use of the loader's file list; this test symlinks into it before that
    sys.modules[nodes.NODE_CLASS_MAPPINGS["PeRFlowDeltaLoader"].__module__].register_folder()
    from checkpoints import checkpoint_path

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
    argv += ["--resolution", "64", "--batch-size", "2", "--steps", "2", "--solver-steps", "1"]
    argv += ["--sample-teacher-steps", "8"]  # grid rows: teacher DDIM-8, DDIM-4, PeRFlow-4 at the default cfg 2
    argv += ["--cache-latents", str(tmp_path / "cache"), "--data-workers", "0"]
    summary = train([*argv, "--threads", "2", "--gradient-checkpointing", "--ema-decay", "0"])
    assert summary["step"] == 2
    log = (out / "train.log").read_text()
    assert "about 3 samples (sd15)" in log
    skipped = json.loads((out / "skipped.json").read_text())
    assert [(e["key"].endswith("broken.png"), e["kind"]) for e in skipped["samples"]] == [(True, "unreadable image")]
    with Image.open(out / "comparison.png") as grid:  # 3 rows (DDIM-8, DDIM-4, PeRFlow-4) x 3 captions, 2 px pads
        assert grid.size == (3 * (64 + 2) + 2, 3 * (64 + 2) + 2) and grid.mode == "RGB"
        grid.load()
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("mse_perflow4_vs_teacher", "mse_ddim4_vs_teacher"):
        assert math.isfinite(metrics[key]) and metrics[key] >= 0, (key, metrics)
    delta = load_file(out / "perflow_delta.safetensors")
    with safe_open(out / "perflow_delta.safetensors", "pt") as f:
        assert f.metadata()["base_architecture"] == "sd15"
    patcher = comfy.sd.load_checkpoint_guess_config(str(tiny_sd15), output_vae=False, output_clip=False)[0]
    base = {k: v.float().clone() for k, v in patcher.model.state_dict().items()}
    name = comfy_env.add_model_file("perflow", out / "perflow_delta.safetensors", "perflow-test-comfy-run.safetensors")
    loaded, summary = comfy_env.call(
        "PeRFlowDeltaLoader", model=patcher, delta_name=name, strength=1.0, parameterization="auto", num_windows=0
    )
    assert f"perflow_delta, SD1.5 file on SD1.5 model; {len(delta)} weights patched" in summary
    assert any(v.abs().max() > 0 for v in delta.values())
    loaded.patch_model()
    try:
        after = loaded.model.state_dict()
        for k, v in delta.items():  # the checkpoint is fp16: ComfyUI rounds W + dW back to it
            torch.testing.assert_close(after[k].float(), base[k] + v.float(), atol=2e-3, rtol=1e-2, msg=k)
    finally:
        loaded.unpatch_model()
