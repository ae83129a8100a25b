"""The example FSDP config (docs/fsdp_sdxl_8gpu.yaml) against a real ComfyUI UNet (needs COMFYUI_PATH): the settings
accelerate's launcher derives from it build accelerate's FSDP plugin, whose wrap policy finds every class the config
names in the UNet. FSDP itself cannot run on CPUs (docs/training-multi-gpu.md), so this is as far as a CPU gets."""

from pathlib import Path

import pytest

import comfy_env

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sdxl_unet():
    comfy_env.require_comfyui()
    comfy_env.setup_comfyui()
    import comfy.sd

    from checkpoints import checkpoint_path

    path = str(checkpoint_path("sdxl"))
    return comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=False)[0].model.diffusion_model


def test_fsdp_example_config_wraps_the_comfy_unet_blocks(sdxl_unet, monkeypatch):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    config = str(REPO / "docs" / "fsdp_sdxl_8gpu.yaml")
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", config, "train.py"]))
    assert args.use_fsdp and args.num_processes == 8
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD"
    for key, value in env.items():
        if key.startswith("FSDP_"):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("FSDP_SYNC_MODULE_STATES", "false")  # broadcasting the weights needs a GPU to build the plugin
    plugin = FullyShardedDataParallelPlugin()
    plugin.set_auto_wrap_policy(sdxl_unet)
    wrapped = plugin.auto_wrap_policy.keywords["transformer_layer_cls"]
    assert {c.__name__ for c in wrapped} == {"ResBlock", "SpatialTransformer"}
    assert all(any(isinstance(m, c) for m in sdxl_unet.modules()) for c in wrapped)
